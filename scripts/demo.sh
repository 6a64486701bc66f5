#!/usr/bin/env bash
# The offline demo: trains small ViTs with and without iRPE on scikit-learn's
# digits, prints a table of test accuracy and writes plots (see README).
# Extra arguments go to the demo, e.g. scripts/demo.sh --out /tmp/demo
source "$(dirname "$0")/env.sh"
exec "$PY" -m experiments.deit.demo "$@"
