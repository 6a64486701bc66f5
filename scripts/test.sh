#!/usr/bin/env bash
# Runs the whole test suite in ./.venv (created and filled on first use).
# Extra arguments go to pytest, e.g. scripts/test.sh -k parity
source "$(dirname "$0")/env.sh"
exec "$PY" -m pytest -n 2 --dist loadfile "$@" tests
