# Sourced by the other scripts: makes ./.venv with the project installed.
#   IRPE_EXTRAS  extras to install (default: test,experiments,docs,lint)
#   IRPE_VENV    where the virtual environment lives (default: ./.venv)
#   IRPE_PYTHON  the interpreter for a new venv (default: 3.12 if present)
#   IRPE_UNLOCKED=1  install the newest versions setup.cfg allows instead of
#                the exact versions of requirements/lock-pyX.Y.txt (to test
#                against new releases; scripts/update_lock.sh refreshes a lock)
# Python 3.12 is preferred (jax 0.12, flax 0.12); any Python >= 3.11 works.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${IRPE_VENV:-$repo_root/.venv}"
extras="${IRPE_EXTRAS:-test,experiments,docs,lint}"

source "$repo_root/scripts/pick_python.sh"

if [[ ! -x "$venv/bin/python" ]]; then
  python="${IRPE_PYTHON:-$(pick_python)}"
  echo "Creating $venv with $("$python" --version 2>&1)" >&2
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
fi
py_version="$("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
lock="$repo_root/requirements/lock-py$py_version.txt"
constraint=()
if [[ "${IRPE_UNLOCKED:-0}" != 1 ]]; then
  if [[ -f "$lock" ]]; then
    constraint=(-c "$lock")
  else
    echo "No lock file for Python $py_version ($lock): installing the newest versions setup.cfg allows." >&2
  fi
fi
stamp="$venv/.installed-$extras-${IRPE_UNLOCKED:-0}"
if [[ ! -f "$stamp" || "$repo_root/setup.cfg" -nt "$stamp" || ( -f "$lock" && "$lock" -nt "$stamp" ) ]]; then
  echo "Installing irpe_jax[$extras] into $venv${constraint:+ (exact versions of ${lock#$repo_root/})}; the first install downloads about 600 MB and takes 2-3 minutes" >&2
  # pip's own "Collecting ..." lines are the progress report; the whole log is kept.
  set +o pipefail
  "$venv/bin/python" -m pip install --progress-bar off "${constraint[@]}" -e "$repo_root[$extras]" 2>&1 \
    | tee "$venv/pip-install.log" | grep --line-buffered -E '^(Collecting|Successfully|ERROR)' >&2
  pip_status=${PIPESTATUS[0]}
  set -o pipefail
  if [[ $pip_status != 0 ]]; then
    echo "pip failed (exit $pip_status); its whole output is in $venv/pip-install.log" >&2
    exit 1
  fi
  touch "$stamp"
fi
PY="$venv/bin/python"
cd "$repo_root"
