"""The prepared GPU benchmark runs end to end (its `smoke` plan on CPU: a padded ZeRO-3 row and a packed, compiled
plain-torch row) and reports every column BENCHMARKS.md uses: a lent GPU's few minutes must not go to a broken
script."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e  # a subprocess with DeepSpeed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_plan_runs_and_reports(tmp_path):
    from grnformer_ds.training.integration import ensure_demo

    demo = ensure_demo(str(tmp_path / "cache"))
    out = tmp_path / "bench.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    p = subprocess.run([sys.executable, os.path.join(REPO, "launchers", "benchmarks", "bench_pretrain_gpu.py"),
                        "--plan", "smoke", "--allow-cpu", "--steps", "2", "--warmup", "1", "--demo-store", demo,
                        "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [r["run"] for r in rows] == ["debug/demo/padded/eager/zero3/sdpa", "debug/demo/packed/compile/torch/auto"]
    for r in rows:
        assert "error" not in r, r
        assert r["steps"] == 2 and r["nonpad_tokens_per_s"] > 0 and r["cells_per_s"] > 0
        assert set(r["breakdown_ms"]) == {"data", "embed", "backbone", "gnn", "fusion", "head", "backward",
                                          "optimizer"}
    padded, packed = rows
    assert padded["padding_fraction"] > 0 and padded["cells_per_step"] == 4
    assert packed["attn_implementation"] == "sdpa" and packed["cells_per_step"] > 1
    assert "| 1 | debug/demo/packed/compile/torch/auto" in p.stdout
