#!/usr/bin/env bash
# One command for a machine with a GPU or a TPU: makes an environment with
# the jax of that accelerator, prints the backend and its devices, runs the
# parity tests there, times the iRPE attention kernels against blockwise,
# materialised and cuDNN attention (experiments.benchmarks.bench_flash),
# benchmarks every iRPE impl (experiments.benchmarks.bench_rpe) and
# the DeiT-S training step plain / iRPE-K / iRPE-QKV in float32 and bf16
# with each one's peak device memory (experiments.benchmarks.bench_train), and writes a
# markdown report (see experiments/benchmarks/accelerator_check.py).
#
#   scripts/accelerator_check.sh [--venv PATH | --no-install] [--out FILE]
#       [--budget SECONDS] [--quick] [-- more experiments.benchmarks.accelerator_check flags]
#
#   --venv PATH   the virtual environment to use, made if missing (default:
#                 $IRPE_VENV, else ./.venv-accelerator); its jax must see
#                 the accelerator.
#   --no-install  use the python on PATH as it is (its jax must see the
#                 accelerator); only the project itself is installed, with
#                 `pip install --no-deps -e .`.
#   --out FILE    the report (default runs/accelerator_report.md); part logs
#                 go to FILE.logs/.
#   --budget S    seconds for the checks, all parts together (default 420);
#                 each part has its own limit too. A new environment's
#                 install comes on top (at most 300 s, once).
#   --quick       tiny sizes: a smoke run of every part (works on CPU).
#
# The jax extra is chosen by the hardware: nvidia-smi -> jax[cuda13] when the
# driver supports CUDA 13, else jax[cuda12]; a TPU (/dev/accel* or /dev/vfio
# on a TPU VM) -> jax[tpu]. Anything else (ROCm, CPU): give --venv or
# --no-install with a jax that fits.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${IRPE_VENV:-$repo_root/.venv-accelerator}"
install=1
out="runs/accelerator_report.md"
budget=420
extra_args=()

usage() { sed -n '2,30p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --venv) venv="$2"; shift 2 ;;
    --no-install) install=0; shift ;;
    --out) out="$2"; shift 2 ;;
    --budget) budget="$2"; shift 2 ;;
    --quick) extra_args+=(--quick); shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra_args+=("$@"); break ;;
    *) echo "Unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

jax_extra() {
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    local cuda
    cuda="$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p' | head -1)"
    if [[ -n "$cuda" && "$cuda" -ge 13 ]]; then echo cuda13; else echo cuda12; fi
  elif compgen -G '/dev/accel*' >/dev/null || compgen -G '/dev/vfio/[0-9]*' >/dev/null; then
    echo tpu
  fi
}

if [[ $install == 0 ]]; then
  PY="$(command -v python3 || command -v python)"
  echo "Using $PY as it is; installing the project only (--no-deps -e .)." >&2
  "$PY" -m pip install --quiet --no-deps -e "$repo_root"
else
  if [[ ! -x "$venv/bin/python" ]]; then
    extra="$(jax_extra)"
    if [[ -z "$extra" ]]; then
      echo "No NVIDIA GPU or TPU found; pass --venv or --no-install with a jax for this machine." >&2
      exit 2
    fi
    source "$repo_root/scripts/pick_python.sh"
    python="${IRPE_PYTHON:-$(pick_python)}"
    echo "Creating $venv with $("$python" --version 2>&1) and jax[$extra]" >&2
    "$python" -m venv "$venv"
    py_version="$("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    lock="$repo_root/requirements/lock-py$py_version.txt"
    # The lock pins jax and jaxlib; the accelerator plugin follows them.
    constraint=()
    if [[ -f "$lock" ]]; then
      constraint=(-c <(grep -E '^(jax|jaxlib|flax|optax|chex|numpy)==' "$lock"))
    fi
    timeout 300 "$venv/bin/python" -m pip install --quiet --progress-bar off \
      "${constraint[@]}" "jax[$extra]" grain pillow -e "$repo_root[test]" \
      || { rm -rf "$venv"; echo "Install failed or took over 300 s; $venv removed." >&2; exit 1; }
  fi
  PY="$venv/bin/python"
fi

cd "$repo_root"
exec "$PY" -m experiments.benchmarks.accelerator_check --out "$out" --budget "$budget" "${extra_args[@]}"
