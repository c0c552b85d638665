#!/usr/bin/env bash
# On the lent GPU (see prepare_gpu_bench.sh): install the carried wheels next to the image's packages and run the
# h100 plan of bench_pretrain_gpu.py within the call's time, results to $OUT/bench.json (written after every run).
# Extra arguments go to the benchmark (e.g. --only 1,2 --steps 30).
set -euo pipefail
export TORCH_CUDA_ARCH_LIST=9.0 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
python -m pip install -q --no-deps --no-index --target .gpu_bench/site .gpu_bench/wheels/*.whl
export PYTHONPATH="$PWD/.gpu_bench/site:$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch, transformers, torch_geometric, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'pyg', torch_geometric.__version__, 'deepspeed', deepspeed.__version__)"
OUT="${OUT:-.}"
python launchers/benchmarks/bench_pretrain_gpu.py --plan h100 --demo-store .gpu_bench/stores/demo \
    --wide-store .gpu_bench/stores/wide_work/wide_store --budget-s "${BUDGET_S:-430}" --out "$OUT/bench.json" "$@"
