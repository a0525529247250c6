#!/usr/bin/env bash
# Set up the peer-library environment that bench/peers.py runs: FuxiCTR 2.3.10 and DeepCTR-Torch
# 0.3.0 (the libraries ctrkit's DeepFM figures are compared with), driven by the harness scripts
# in ../shared/peers. Nothing from the peers is installed into ctrkit's own .venv or copied into
# this repository; everything goes to two folders outside it:
#
#   $PEERS_VENV (default /tmp/peers)      Python 3.11 venv: torch 2.13.0 (CPU), fuxictr 2.3.10,
#                                          deepctr-torch 0.3.0 and what they pull in (ray, polars, ...)
#   $PEERBENCH  (default /tmp/peerbench)  scratch: polars1/ (polars 1.44.2 overlay), fuxictr_zoo/
#                                          (FuxiCTR's DeepFM, DCNv2 and FinalMLP model-zoo source), whl/
#
# Why a polars 1.x overlay: fuxictr's metadata does not pin polars, so pip installs polars 2.x,
# but FuxiCTR 2.3.10's FeatureProcessor.read_data calls pl.scan_csv(dtypes=...), an argument that
# polars 2.0 removed (ArgumentRemovedError at the first CSV read). Rather than downgrading polars
# inside the venv, polars 1.44.2 is installed into $PEERBENCH/polars1 and put first on PYTHONPATH
# for every FuxiCTR run (bench/peers.py does that).
#
# torch is installed first and then pinned with a constraints file, so that installing fuxictr
# and deepctr-torch (which only ask for torch>=...) never replaces it with another build.
#
# The model-zoo source (DeepFM, DCNv2, FinalMLP) is not part of the fuxictr wheel; it is taken from a git clone of
# reczoo/FuxiCTR (the figures in ../shared/peers/README.md used commit 0245987) with `git archive`.
#
# Usage: bench/setup_peers.sh [FUXICTR_GIT_DIR]
#   FUXICTR_GIT_DIR  git dir (or work tree) of a reczoo/FuxiCTR clone; needed only while
#                    $PEERBENCH/fuxictr_zoo does not exist yet.
# Environment: PEERS_VENV, PEERBENCH, PYTHON311 (interpreter that creates the venv, default
# python3.11), PEERS_HARNESS (default ../shared/peers next to this checkout).
# Idempotent: every step that is already done is skipped; run it again after a partial failure.
set -euo pipefail

PEERS_VENV=${PEERS_VENV:-/tmp/peers}
PEERBENCH=${PEERBENCH:-/tmp/peerbench}
PYTHON311=${PYTHON311:-python3.11}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEERS_HARNESS=${PEERS_HARNESS:-$(cd "$ROOT/.." && pwd)/shared/peers}
FUXICTR_GIT=${1:-}

TORCH_VERSION=2.13.0
FUXICTR_VERSION=2.3.10
DEEPCTR_VERSION=0.3.0
POLARS1_VERSION=1.44.2

PY=$PEERS_VENV/bin/python
OVERLAY=$PEERBENCH/polars1
ZOO=$PEERBENCH/fuxictr_zoo
say() { printf '[setup_peers] %s\n' "$*"; }

mkdir -p "$PEERBENCH"

# 1. venv (Python 3.11)
if [ -x "$PY" ]; then
    say "venv $PEERS_VENV exists ($("$PY" -V 2>&1))"
else
    say "creating venv $PEERS_VENV with $PYTHON311"
    "$PYTHON311" -m venv "$PEERS_VENV"
fi
"$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
    || { say "error: $PEERS_VENV is not Python 3.11"; exit 1; }

# 2. torch first (the CPU build), so that nothing later picks a CUDA build
if "$PY" -c "import torch, sys; sys.exit(not torch.__version__.startswith('$TORCH_VERSION'))" 2>/dev/null; then
    say "torch $("$PY" -c 'import torch; print(torch.__version__)') already installed"
else
    say "installing torch==$TORCH_VERSION"
    "$PY" -m pip install -q "torch==$TORCH_VERSION"
fi
TORCH_INSTALLED=$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null)

# 3. fuxictr + deepctr-torch, with the installed torch pinned exactly
if "$PY" - "$FUXICTR_VERSION" "$DEEPCTR_VERSION" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(not (version("fuxictr") == sys.argv[1] and version("deepctr-torch") == sys.argv[2]))
EOF
then
    say "fuxictr $FUXICTR_VERSION and deepctr-torch $DEEPCTR_VERSION already installed"
else
    say "installing fuxictr==$FUXICTR_VERSION deepctr-torch==$DEEPCTR_VERSION (torch pinned to $TORCH_INSTALLED)"
    echo "torch==$TORCH_INSTALLED" > "$PEERBENCH/torch-constraint.txt"
    "$PY" -m pip install -q -c "$PEERBENCH/torch-constraint.txt" \
        "fuxictr==$FUXICTR_VERSION" "deepctr-torch==$DEEPCTR_VERSION"
fi
TORCH_AFTER=$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null)
[ "$TORCH_AFTER" = "$TORCH_INSTALLED" ] \
    || { say "error: torch changed from $TORCH_INSTALLED to $TORCH_AFTER"; exit 1; }

# 4. polars 1.x overlay for FuxiCTR (see the header)
if PYTHONPATH=$OVERLAY "$PY" -c "import polars, sys; sys.exit(polars.__version__ != '$POLARS1_VERSION' or not polars.__file__.startswith('$OVERLAY'))" 2>/dev/null; then
    say "polars $POLARS1_VERSION overlay $OVERLAY exists"
else
    say "installing polars $POLARS1_VERSION into the overlay $OVERLAY"
    "$PY" -m pip download -q --no-deps -d "$PEERBENCH/whl" \
        "polars==$POLARS1_VERSION" "polars-runtime-32==$POLARS1_VERSION"
    rm -rf "$OVERLAY"
    "$PY" -m pip install -q --no-deps --target "$OVERLAY" "$PEERBENCH"/whl/polars*"$POLARS1_VERSION"*.whl
fi

# 5. FuxiCTR model-zoo source: DeepFM (bench_frappe, bench_criteo), DCNv2 and FinalMLP (bench_zoo --peers)
need_git() {
    if [ -z "$FUXICTR_GIT" ]; then
        say "error: $1 is missing; pass the git dir of a reczoo/FuxiCTR clone: $0 /path/to/FuxiCTR[/.git]"
        exit 2
    fi
    git -C "$FUXICTR_GIT" rev-parse HEAD >/dev/null \
        || { say "error: $FUXICTR_GIT is not a git repository"; exit 2; }
}
if [ -f "$ZOO/DeepFM_torch/src/DeepFM.py" ]; then
    say "model-zoo source $ZOO/DeepFM_torch exists"
else
    need_git "$ZOO/DeepFM_torch"
    if [ -f "$PEERS_HARNESS/extract_fuxictr_zoo.sh" ]; then
        sh "$PEERS_HARNESS/extract_fuxictr_zoo.sh" "$ZOO" "$FUXICTR_GIT"   # usage: DEST SNAPSHOT_GIT_DIR
    else
        mkdir -p "$ZOO"
        git -C "$FUXICTR_GIT" archive HEAD model_zoo/DeepFM/DeepFM_torch | tar -x -C "$ZOO" --strip-components=2
    fi
fi
for model in DCNv2 FinalMLP; do
    if [ -f "$ZOO/$model/src/$model.py" ]; then
        say "model-zoo source $ZOO/$model exists"
    else
        need_git "$ZOO/$model"
        mkdir -p "$ZOO"
        git -C "$FUXICTR_GIT" archive HEAD "model_zoo/$model/src" | tar -x -C "$ZOO" --strip-components=1
        say "extracted $(git -C "$FUXICTR_GIT" rev-parse --short HEAD):model_zoo/$model/src -> $ZOO/$model/src"
    fi
done

# 6. smoke check: fuxictr imports with the overlay, and the overlay's scan_csv still takes dtypes=
PYTHONPATH=$OVERLAY "$PY" - <<'EOF'
import warnings
import polars as pl, fuxictr, torch, deepctr_torch
from fuxictr.preprocess import FeatureProcessor  # noqa: F401
import os, tempfile
with tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False) as fh:
    fh.write("a,b\n1,x\n")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pl.scan_csv(fh.name, dtypes={"a": pl.Float64}).collect()
os.unlink(fh.name)
print(f"[setup_peers] ok: fuxictr {fuxictr.__version__}, deepctr-torch {deepctr_torch.__version__}, "
      f"torch {torch.__version__}, polars {pl.__version__} (overlay)")
EOF
