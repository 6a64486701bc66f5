#!/usr/bin/env bash
# Runs the library's own tests (irpe_jax, not the experiments) on the lowest
# versions setup.cfg allows: the exact versions of requirements/lock-min.txt
# (jax, flax, optax, chex, numpy at their floors) on Python 3.11, in a venv
# of its own (default /tmp/irpe-floors; IRPE_FLOORS_VENV to change it).
#   scripts/test_floors.sh [PYTEST ARGS]    e.g. -x, -k parity
#   IRPE_FLOORS_PYTHON=python3.11          the interpreter for the venv
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${IRPE_FLOORS_VENV:-/tmp/irpe-floors}"
python="${IRPE_FLOORS_PYTHON:-python3.11}"
lock="$repo_root/requirements/lock-min.txt"
if [[ ! -x "$venv/bin/python" ]]; then
  echo "Creating $venv with $("$python" --version 2>&1)" >&2
  "$python" -m venv "$venv"
fi
stamp="$venv/.installed-min"
if [[ ! -f "$stamp" || "$lock" -nt "$stamp" ]]; then
  echo "Installing the exact versions of ${lock#$repo_root/} into $venv" >&2
  "$venv/bin/python" -m pip install --quiet --progress-bar off -r "$lock"
  touch "$stamp"
fi
"$venv/bin/python" -c 'import jax, flax, optax, chex, numpy; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, "chex", chex.__version__, "numpy", numpy.__version__)'
cd "$repo_root"
# The tests of irpe_jax itself: none of these imports experiments/ (whose
# extra is not installed here), and the library is imported from the clone.
exec "$venv/bin/python" -m pytest -n 2 -p no:cacheprovider "$@" \
  tests/test_config.py tests/test_buckets.py tests/test_modules.py \
  tests/test_ops.py tests/test_parity.py tests/test_grid_checks.py \
  tests/test_models.py tests/test_detr_loss.py tests/test_torch_pickle.py \
  tests/test_blockwise.py tests/test_pallas.py
