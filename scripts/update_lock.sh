#!/usr/bin/env bash
# Refreshes requirements/lock-pyX.Y.txt, the exact versions that scripts/env.sh
# (and so the demo, the tests and CI) installs: resolves the newest versions
# that setup.cfg allows in a scratch venv, runs the tests there, and writes the
# lock only if they pass.
#   scripts/update_lock.sh [PYTHON]    default: the interpreter env.sh picks
# To only try the newest versions without writing a lock:
#   IRPE_UNLOCKED=1 IRPE_VENV=/tmp/irpe-newest ./scripts/test.sh
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo_root/scripts/pick_python.sh"
python="${1:-$(pick_python)}"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
echo "Resolving the newest allowed versions with $("$python" --version 2>&1) in $scratch" >&2
IRPE_UNLOCKED=1 IRPE_VENV="$scratch/venv" IRPE_PYTHON="$python" "$repo_root/scripts/test.sh"
version="$("$scratch/venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
mkdir -p "$repo_root/requirements"
lock="$repo_root/requirements/lock-py$version.txt"
{
  echo "# Exact versions installed by scripts/env.sh on Python $version; the tests passed with them."
  echo "# Made by scripts/update_lock.sh on $(date -u +%Y-%m-%d). setup.cfg keeps the loose ranges for library users."
  "$scratch/venv/bin/python" -m pip freeze --exclude-editable | grep -v '^#'
} > "$lock"
echo "Wrote $lock" >&2
