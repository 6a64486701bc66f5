# Sourced: defines pick_python, which prints the interpreter the scripts use:
# Python 3.12 when the machine has it (from pyenv or PATH), otherwise python3.
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
