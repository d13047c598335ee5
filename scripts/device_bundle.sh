#!/usr/bin/env bash
# The wheels a lent GPU machine lacks, fetched here into .bundle/ (ignored by git), for its Python 3.12 on
# x86-64. That machine's image has torch, transformers, accelerate, einops, networkx, numpy, tqdm,
# matplotlib, pyarrow, pandas, jaxtyping, pytest, ... but not TransformerLens or this package, and it reaches
# no registry. The bundle holds what a run there imports and nothing else:
#   .bundle/wheels/      transformer-lens 4.x and what it imports that the image lacks (datasets, dill,
#                        multiprocess), gguf, and this project's own wheel (its entry points find `circuits_tasks`)
#   .bundle/reference/   transformer-lens 3.x (the last with HookedTransformer) for the EAP-IG reference run
#   .bundle/EAP-IG/      with --eap-ig DIR: that checkout's src/ and licence (not committed anywhere)
# Versions are the ones this project's .venv tests with. Prints the size, the device tool's `carry` list and
# the one command to run there.
#
#   bash scripts/device_bundle.sh [--eap-ig PATH_TO_EAP-IG_CHECKOUT]
set -euo pipefail
cd "$(dirname "$0")/.."

EAP_IG=""
while [ $# -gt 0 ]; do
  case "$1" in
    --eap-ig) EAP_IG="$2"; shift 2 ;;
    *) echo "usage: bash scripts/device_bundle.sh [--eap-ig PATH]" >&2; exit 2 ;;
  esac
done

PY=${PY:-.venv/bin/python}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}  # the device image's Python
BUNDLE=${BUNDLE:-.bundle}  # where the wheels go (the device tool carries .bundle)
LIMIT_MB=56  # the device tool carries 64 MiB in all; the working tree takes the rest

[ -x "$PY" ] || { echo "no $PY: run 'make setup' first" >&2; exit 1; }
version() { "$PY" -c "from importlib.metadata import version; print(version('$1'))"; }

MAIN=(
  "transformer-lens==$(version transformer-lens)"
  "datasets==$(version datasets)"
  "dill==$(version dill)"
  "multiprocess==$(version multiprocess)"
  "gguf==$(version gguf)"
)
REFERENCE=("transformer-lens==3.9.0" "better-abc==0.0.3")

download() {  # download DEST SPEC...: pure-Python or manylinux x86-64 wheels for the device's Python
  local dest=$1; shift
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$dest" "$@" 2>&1 | grep -v '^WARNING: Location' || true
  for spec in "$@"; do
    local name=${spec%%==*}
    ls "$dest"/"${name//-/_}"-*.whl >/dev/null 2>&1 || { echo "no wheel of $spec for Python $PYTHON_VERSION" >&2; exit 1; }
  done
}

rm -rf "$BUNDLE"
mkdir -p "$BUNDLE/wheels" "$BUNDLE/reference"
download "$BUNDLE/wheels" "${MAIN[@]}"
download "$BUNDLE/reference" "${REFERENCE[@]}"
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$BUNDLE/wheels" . >"$BUNDLE/build.log" 2>&1 ||
  { cat "$BUNDLE/build.log" >&2; exit 1; }
rm "$BUNDLE/build.log"

if [ -n "$EAP_IG" ]; then
  [ -f "$EAP_IG/src/eap/attribute.py" ] || { echo "$EAP_IG is not a checkout of hannamw/EAP-IG" >&2; exit 1; }
  mkdir -p "$BUNDLE/EAP-IG"
  cp -r "$EAP_IG/src" "$BUNDLE/EAP-IG/"
  cp "$EAP_IG/LICENSE" "$BUNDLE/EAP-IG/" 2>/dev/null || true
  find "$BUNDLE/EAP-IG" -name __pycache__ -prune -exec rm -rf {} +
fi

size_kb=$(du -sk "$BUNDLE" | cut -f1)
tree_kb=$(git ls-files -z | xargs -0 du -ck 2>/dev/null | tail -1 | cut -f1)
echo "bundle: $((size_kb / 1024)) MiB ($size_kb KiB) in $(find "$BUNDLE" -type f | wc -l) files; working tree $((tree_kb / 1024)) MiB"
ls -1 "$BUNDLE"/wheels "$BUNDLE"/reference | grep whl | sed 's/^/  /'
if [ $((size_kb + tree_kb)) -gt $((LIMIT_MB * 1024)) ]; then
  echo "too large: the bundle and the working tree must stay under $LIMIT_MB MiB" >&2
  exit 1
fi
echo "carry: [\"$BUNDLE\"]"
echo "command: bash scripts/gpu_check.sh --device cuda"
