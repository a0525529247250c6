#!/usr/bin/env bash
# Build <checkout>/.peerbench (git-ignored): what `bench/bench_gpu.py --fuxictr .peerbench` needs to run FuxiCTR's
# DeepFM on a GPU machine that has torch, pandas and pyarrow but no package registry. Copy it there with the
# checkout (about 46 MB).
#
#   .peerbench/whl/              cp312 wheels: fuxictr 2.3.10, ray 2.60.0 without its Java jars, rllib, serve,
#                                tune and llm (unused here, and most of its size), and what Ray Data's loader
#                                imports (jsonschema, pydantic and their dependencies)
#   .peerbench/zoo/DeepFM_torch  FuxiCTR's DeepFM model-zoo source (from $PEERBENCH/fuxictr_zoo: setup_peers.sh)
#   .peerbench/harness/          the harness's gpu_bench.py, benchutil.py and gen_synth_criteo.py (../shared/peers)
#   .peerbench/feature_map.json  the feature map FuxiCTR's own preprocessing wrote for the harness's 2M synthetic
#                                rows on this CPU (`python bench/peers.py gen-data` then `fx-preprocess`, which
#                                `bench_criteo.py --stage train` also runs); gpu_bench.py checks its encoding
#                                against it, field by field
#
# Usage: bench/peer_bundle.sh [FEATURE_MAP]
# Environment: PEERS_VENV (default /tmp/peers: its pip downloads the wheels), PEERBENCH (default /tmp/peerbench),
# PEERS_HARNESS (default ../shared/peers next to this checkout).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEERS_VENV=${PEERS_VENV:-/tmp/peers}
PEERBENCH=${PEERBENCH:-/tmp/peerbench}
PEERS_HARNESS=${PEERS_HARNESS:-$(cd "$ROOT/.." && pwd)/shared/peers}
FMAP=${1:-$PEERBENCH/fx/data/synth_criteo_2M_fx/feature_map.json}
B=$ROOT/.peerbench
say() { printf '[peer_bundle] %s\n' "$*"; }

[ -x "$PEERS_VENV/bin/python" ] || { say "error: no venv at $PEERS_VENV: run bench/setup_peers.sh first"; exit 1; }
[ -d "$PEERBENCH/fuxictr_zoo/DeepFM_torch" ] || {
    say "error: no FuxiCTR model zoo in $PEERBENCH/fuxictr_zoo: run bench/setup_peers.sh first"; exit 1; }
[ -f "$FMAP" ] || {
    say "error: no FuxiCTR feature map at $FMAP: run FuxiCTR's preprocessing of the 2M synthetic rows first"
    say "       (python bench/peers.py gen-data && python bench/peers.py fx-preprocess)"; exit 1; }
for f in gpu_bench.py benchutil.py gen_synth_criteo.py; do
    [ -f "$PEERS_HARNESS/$f" ] || { say "error: $PEERS_HARNESS/$f is missing"; exit 1; }
done

rm -rf "$B"
mkdir -p "$B/whl" "$B/zoo" "$B/harness" "$PEERBENCH/whl312"
say "downloading cp312 wheels into $PEERBENCH/whl312"
"$PEERS_VENV/bin/python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$PEERBENCH/whl312" \
    fuxictr==2.3.10 ray==2.60.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 \
    rpds-py==2026.9.1 pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
    typing_extensions==4.16.0
for w in "$PEERBENCH"/whl312/*.whl; do
    case $(basename "$w") in
        ray-*) ;;  # repacked below
        *) cp "$w" "$B/whl/" ;;
    esac
done
"$PEERS_VENV/bin/python" - "$PEERBENCH/whl312" "$B/whl" <<'PY'
import glob, sys, zipfile
src = glob.glob(f"{sys.argv[1]}/ray-2.60.0-cp312-*.whl")[0]
dst = f"{sys.argv[2]}/{src.rsplit('/', 1)[-1]}"
drop = ("ray/jars/", "ray/rllib/", "ray/serve/", "ray/tune/", "ray/llm/")
with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zo:
    for item in zi.infolist():
        if item.filename.startswith(drop):
            continue
        data = zi.read(item.filename)
        if item.filename.endswith(".dist-info/RECORD"):
            data = b"\n".join(line for line in data.split(b"\n") if not line.decode().startswith(drop))
        zo.writestr(item, data)
PY
cp -r "$PEERBENCH/fuxictr_zoo/DeepFM_torch" "$B/zoo/"
cp "$PEERS_HARNESS/gpu_bench.py" "$PEERS_HARNESS/benchutil.py" "$PEERS_HARNESS/gen_synth_criteo.py" "$B/harness/"
cp "$FMAP" "$B/feature_map.json"
say "built $B ($(du -sh "$B" | cut -f1)); copy it to the GPU machine with the checkout"
