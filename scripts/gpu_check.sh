#!/usr/bin/env bash
# The GPU check in one command, for a lent GPU machine (bare, offline): installs the wheels that
# scripts/device_bundle.sh put in .bundle/ (carried there with the working tree), then runs
# scripts/gpu_check.py: every entry point on the device, the benchmark on GPT-2-small- and
# Llama-3.1-8B-shaped random weights, and, with a bundled or given EAP-IG checkout, the reference beside it.
# Results go to $OUT (the device tool's folder) or outputs/gpu_check: gpu_check.json, gpu_check.md, logs.
#
#   bash scripts/gpu_check.sh --device cuda                              # on the GPU machine
#   bash scripts/gpu_check.sh --device cpu --shape small --tests quick   # here (tests/test_gpu_check.py)
# Any other option goes to scripts/gpu_check.py (--eap-ig PATH, --models, --dtype, ...).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python  # here; the device has no .venv: its python3

SITE=${CIRCUITS_SITE:-/tmp/circuits-site}
REFERENCE_SITE=${CIRCUITS_REFERENCE_SITE:-/tmp/circuits-reference}
extra=()
# The bundle is installed where this package cannot be imported yet (the bare GPU machine), not here.
if ! "$PY" -c "import circuits, transformer_lens" 2>/dev/null && ls .bundle/wheels/*.whl >/dev/null 2>&1; then
  install() { "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$1" "${@:2}"; }
  install "$SITE" .bundle/wheels/*.whl || exit 1
  install "$REFERENCE_SITE" .bundle/reference/*.whl || exit 1
  # the repository's own sources ahead of the installed copy (whose metadata carries the entry points)
  export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
  extra+=(--reference-site "$REFERENCE_SITE")
  [ -d .bundle/EAP-IG ] && extra+=(--eap-ig .bundle/EAP-IG)
fi
"$PY" -c "import circuits, transformer_lens, tasks" || { echo "circuits cannot be imported: run scripts/device_bundle.sh here and carry .bundle" >&2; exit 1; }
exec "$PY" scripts/gpu_check.py "${extra[@]}" "$@"
