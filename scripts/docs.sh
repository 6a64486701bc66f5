#!/usr/bin/env bash
# Builds the documentation (docs/, Sphinx with MyST and autodoc) into
# docs/_build/html; any warning fails the build. Extra arguments go to
# sphinx-build, e.g. scripts/docs.sh -b linkcheck
export IRPE_EXTRAS="${IRPE_EXTRAS:-test,experiments,docs,lint}"
source "$(dirname "$0")/env.sh"
exec "$PY" -m sphinx -E -W --keep-going -q -b html "$@" docs docs/_build/html
