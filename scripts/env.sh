# Sourced by the other scripts: makes ./.venv with the project installed.
#   IRPE_EXTRAS  extras to install (default: test,experiments)
#   IRPE_VENV    where the virtual environment lives (default: ./.venv)
# Python 3.12 is preferred (jax 0.12, flax 0.12); any Python >= 3.11 works.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${IRPE_VENV:-$repo_root/.venv}"
extras="${IRPE_EXTRAS:-test,experiments}"

pick_python() {
  if command -v pyenv >/dev/null 2>&1; then
    local v
    v="$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.[0-9]+)?$' | tail -n 1 || true)"
    if [[ -n "$v" ]]; then
      PYENV_VERSION="$v" pyenv which python3.12 && return
    fi
  fi
  for p in python3.12 python3; do
    if command -v "$p" >/dev/null 2>&1; then command -v "$p"; return; fi
  done
  echo "No python3 found" >&2; return 1
}

if [[ ! -x "$venv/bin/python" ]]; then
  python="$(pick_python)"
  echo "Creating $venv with $("$python" --version 2>&1)" >&2
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
fi
stamp="$venv/.installed-$extras"
if [[ ! -f "$stamp" || "$repo_root/setup.cfg" -nt "$stamp" ]]; then
  echo "Installing irpe_jax[$extras] into $venv" >&2
  "$venv/bin/python" -m pip install --quiet -e "$repo_root[$extras]"
  touch "$stamp"
fi
PY="$venv/bin/python"
cd "$repo_root"
