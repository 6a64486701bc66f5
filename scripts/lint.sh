#!/usr/bin/env bash
# Runs the linter (ruff, configured in pyproject.toml: Google style, 2-space
# indents, 80 columns) over the whole repository; no findings is a pass.
# Extra arguments go to ruff, e.g. scripts/lint.sh --statistics
export IRPE_EXTRAS="${IRPE_EXTRAS:-test,experiments,docs,lint}"
source "$(dirname "$0")/env.sh"
exec "$PY" -m ruff check "$@" .
