"""Elastic resume end to end (issue 16): a ZeRO-3 run stopped after step 6 on 2 CPU ranks continues on 1, stops
again after step 9 and continues on 4; one stopped on 1 rank continues on 2 — weights and Adam state through
DeepSpeed's universal checkpoint, the rest of the interrupted epoch shared out over the new ranks: the epoch's
`cell_index` multiset (from --log-cells) equals the uninterrupted run's, also when the micro-batch changes with the
ranks. Loading through the universal form on the same number of ranks reproduces the uninterrupted run's losses
exactly (so the conversion loses no weight, moment or per-group hyper-parameter)."""
from __future__ import annotations

import glob
import json
import math
import os
import shutil
import subprocess
from collections import Counter

import pytest
from launch_helpers import launch_cmd, launch_env, read_metrics  # tests/ is on sys.path (pytest rootdir import)

pytestmark = pytest.mark.e2e

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = os.path.join(REPO, "launchers", "pretrain.py")
ZERO3 = os.path.join(REPO, "ds_configs", "zero3.json")
STEPS, CUT, MID = 24, 6, 9  # epoch 0 is ~21 packed micro-batches on 1 rank, ~11 per rank on 2: both cuts are inside it
COMMON = ["--deepspeed_config", ZERO3, "--max-steps", str(STEPS), "--max-tokens", "8000", "--save-every", str(CUT),
          "--keep-last", "4", "--eval-every", "100", "--lr", "5e-3", "--no-progress", "--mlflow-tracking-uri",
          "none", "--no-export", "--log-cells"]


def _run(args, ranks: int) -> subprocess.CompletedProcess:
    p = subprocess.run(launch_cmd(PRETRAIN, args, ranks), cwd=REPO, env=launch_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _epoch_cells(out, epoch: int = 0) -> Counter:
    """The cells every rank trained on in `epoch` (--log-cells)."""
    cells: Counter = Counter()
    for path in glob.glob(os.path.join(out, "cells", "rank_*.jsonl")):
        with open(path) as fh:
            for line in fh:
                rec = json.loads(line)
                if rec["epoch"] == epoch:
                    cells.update(rec["cells"])
    return cells


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """Uninterrupted runs on 1 and 2 ranks ({ranks: run directory}), checkpoints at every CUT steps."""
    from grnformer_ds.training.integration import ensure_demo

    root = tmp_path_factory.mktemp("elastic")
    cache = str(root / "cache")
    ensure_demo(cache, say=lambda line: None)
    runs = {}
    for ranks in (1, 2):
        out = str(root / f"full{ranks}")
        _run([*COMMON, "--demo-cache-dir", cache, "--output-dir", out], ranks)
        runs[ranks] = out
    runs["cache"] = cache
    return runs


def _stopped_copy(full, ranks: int, dest) -> str:
    """The uninterrupted run's directory as if the run had died after the step-CUT checkpoint."""
    out = str(dest / f"from{ranks}")
    shutil.copytree(full[ranks], out)
    _drop_checkpoints_after(out, CUT)
    return out


def _drop_checkpoints_after(out: str, step: int) -> None:
    """As if the run in `out` had died after its step-`step` checkpoint."""
    from grnformer_ds.training import checkpoint as ckpt

    for tag in ckpt.complete_tags(os.path.join(out, "checkpoints")):
        if int(tag.replace("global_step", "")) > step:
            shutil.rmtree(os.path.join(out, "checkpoints", tag))


@pytest.mark.parametrize("chain,max_tokens", [((2, 1, 4), None), ((1, 2), 6000)])
def test_resume_on_other_numbers_of_ranks_trains_the_epoch_once(full, tmp_path, chain, max_tokens):
    """2 -> 1 -> 4 ranks (the 1-rank part dies after its step-MID checkpoint, inside the epoch); 1 -> 2
    also shrinks the packed micro-batch (8000 -> 6000 tokens, as on smaller GPUs): the rest of the epoch is
    re-batched in it."""
    before = chain[0]
    out = _stopped_copy(full, before, tmp_path)
    smaller = ["--max-tokens", str(max_tokens)] if max_tokens else []
    for i, (was, now) in enumerate(zip(chain, chain[1:])):
        last = i == len(chain) - 2
        p = _run([*COMMON, "--demo-cache-dir", full["cache"], "--output-dir", out, "--resume", *smaller,
                  *([] if last else ["--save-every", "3", "--keep-last", "10"])], now)
        assert f"written by {was} rank(s), this run has {now}" in p.stdout, p.stdout[-3000:]
        assert f"at step {MID if i else CUT}" in p.stdout, p.stdout[-3000:]
        if max_tokens:
            assert f"used another micro-batch (max_tokens 8000 -> {max_tokens})" in p.stdout, p.stdout[-3000:]
        if not last:  # the LR schedule stays the uninterrupted run's
            _drop_checkpoints_after(out, MID)
    got = read_metrics(out)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    assert all(math.isfinite(m["loss"]) for m in got)
    # the steps before the cut are the uninterrupted run's; the epoch as a whole holds its cells, each once
    ref = read_metrics(full[before])
    assert [m["data_digest"] for m in got[:CUT]] == [m["data_digest"] for m in ref[:CUT]]
    reference = _epoch_cells(full[before])
    assert sum(reference.values()) > 600 and max(reference.values()) == 1
    assert _epoch_cells(out) == reference
    # training went on from the checkpoint's state: the resumed steps are in the uninterrupted runs' loss range
    # (a fresh model starts near 850 on the demo), and each universal conversion was removed by a later save
    assert got[-1]["loss"] < 1.5 * ref[-1]["loss"]
    assert not os.path.exists(os.path.join(out, "checkpoints", "universal"))


def test_universal_route_on_the_same_ranks_is_exact(full, tmp_path):
    out = _stopped_copy(full, 1, tmp_path)
    p = _run([*COMMON, "--demo-cache-dir", full["cache"], "--output-dir", out, "--resume", "--resume-universal"], 1)
    assert f"at step {CUT}" in p.stdout, p.stdout[-3000:]
    got, ref = read_metrics(out), read_metrics(full[1])
    assert [m["step"] for m in got] == [m["step"] for m in ref]
    for a, b in zip(got, ref):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["data_digest"] == b["data_digest"]
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-6)
