#!/usr/bin/env bash
# Prepare, on a CPU machine with this checkout installed, what one lent-GPU run of bench_pretrain_gpu.py needs.
#
# The device image (torch 2.11 + CUDA 13, torch-geometric, transformers, numba, tensorstore, Python 3.12) has no
# DeepSpeed, anndata, zarr or pydantic and cannot reach a package index; it cannot build stores either (no scanpy for
# the demo data). So this script puts into .gpu_bench/ (git-ignored, carried to the device):
#   wheels/   DeepSpeed 0.19.8 built here as a pure-Python wheel (DS_BUILD_OPS=0: nothing compiled, torch AdamW is the
#             client optimizer) and the Python 3.12 wheels it and the store readers need (~15 MB);
#   stores/   the demo store and a `wide` store of 6,000 synthetic cells with 750-2,250 expressed genes (both with
#             GRN assets; ~35 MB).
# Then, from the session:  run(command="bash launchers/benchmarks/gpu_bench.sh", carry=[".gpu_bench"], timeout_s=560)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=.gpu_bench
rm -rf "$OUT/wheels" && mkdir -p "$OUT/wheels" "$OUT/stores"

python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$OUT/wheels" hjson pydantic pydantic-core annotated-types typing-inspection "typing-extensions>=4.14" \
    "anndata==0.12.19" "zarr==3.1.6" numcodecs donfig google-crc32c array-api-compat legacy-api-wrap natsort \
    py-cpuinfo msgpack ninja
DS_BUILD_OPS=0 python -m pip wheel -q --no-deps --no-build-isolation "deepspeed==0.19.8" -w "$OUT/wheels"

python - <<'PY'
import shutil, sys
from pathlib import Path
sys.path.insert(0, "launchers/benchmarks")
from grnformer_ds.training.integration import ensure_demo
from bench_pretrain_gpu import wide_store

out = Path(".gpu_bench/stores")
if not (out / "demo" / "grn").exists():
    shutil.rmtree(out / "demo", ignore_errors=True)
    shutil.copytree(ensure_demo(None), out / "demo")
store = wide_store(out / "wide_work", n_cells=6000)
for leftover in ("wide.h5ad",):
    (out / "wide_work" / leftover).unlink(missing_ok=True)
print("stores:", out / "demo", store)
PY
du -sh "$OUT"/*
