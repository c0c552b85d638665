"""End-to-end tests of the user's main command, `deepspeed launchers/pretrain.py --deepspeed_config ...`, on the
real demo store (built once per session, with GRN graphs): 1 and 2 ranks, token-packed micro-batches (the default,
`--max-tokens`) and padded ones (`--micro-batch-size`), ZeRO-3 / ZeRO-2 / ZeRO-3 offload, loss decrease, kill -9 +
--resume, MLflow read back from a real `mlflow server`, export → offline reload in a fresh process, and one-line
errors for bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from launch_helpers import free_port, launch_cmd, launch_env, read_metrics  # tests/ is on sys.path

pytestmark = pytest.mark.e2e  # the DeepSpeed launcher, MLflow, subprocesses

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = os.path.join(REPO, "launchers", "pretrain.py")
CFG = {k: os.path.join(REPO, "ds_configs", f"{k}.json") for k in ("zero3", "zero2", "zero3_offload")}
STEPS = 30  # the reference run: checkpoints and evaluations at 15 and 30
COMMON = ["--max-steps", str(STEPS), "--save-every", "15", "--eval-every", "15", "--lr", "5e-3", "--no-progress"]





def _cmd(args, ranks: int | None = 1, launcher: bool = True) -> list[str]:
    return launch_cmd(PRETRAIN, args, ranks or 1, launcher)


def _run(args, ranks=1, launcher=True, timeout=240, env=None) -> subprocess.CompletedProcess:
    p = subprocess.run(_cmd(args, ranks, launcher), cwd=REPO, env=env or launch_env(), capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, f"rc={p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    """One demo store (cells + GRN assets) shared by every run in the session."""
    from grnformer_ds.training.integration import ensure_demo

    d = str(tmp_path_factory.mktemp("demo_cache"))
    ensure_demo(d)
    return d


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (random free port), killed (process group) at the end."""
    d = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "mlflow")
    proc = subprocess.Popen([exe, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{d}/mlflow.db", "--artifacts-destination",
                             str(d / "artifacts")], env=launch_env(), cwd=str(d), stdout=subprocess.DEVNULL,
                            stderr=open(d / "server.log", "w"), start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    import urllib.request

    deadline = time.time() + 60
    while True:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"mlflow server did not start: {(d / 'server.log').read_text()[-2000:]}")
        time.sleep(0.3)
    yield uri
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def reference_run(demo_cache, mlflow_server, tmp_path_factory):
    """The README's main command (1 rank, ZeRO-3, bf16) for STEPS steps, logging to the MLflow server."""
    out = str(tmp_path_factory.mktemp("ref") / "run")
    p = _run(["--deepspeed_config", CFG["zero3"], "--demo-cache-dir", demo_cache, "--output-dir", out,
              "--mlflow-tracking-uri", mlflow_server, "--experiment-name", "test-ref", *COMMON])
    return out, p


def test_main_command_trains_on_demo_graphs_and_loss_decreases(reference_run):
    out, p = reference_run
    assert "ZeRO stage 3, bf16" in p.stdout and "graphs True" in p.stdout, p.stdout
    assert "batch: packed micro-batches of <= 2400 tokens" in p.stdout, p.stdout  # 2 x the longest cell on CPU
    m = read_metrics(out)
    assert [x["step"] for x in m] == list(range(1, STEPS + 1))
    losses = [x["loss"] for x in m]
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.7 * first, losses  # a real decrease on the demo data, not noise
    evals = [x["eval_loss"] for x in m if "eval_loss" in x]
    assert len(evals) == 2 and evals[1] < evals[0] and evals[1] < 0.7 * first
    assert all(x["cells_per_s"] > 0 and x["nonpad_tokens_per_s"] > 0 for x in m)
    # the trivial baselines beside every held-out loss: on real cells a gene's own mean beats the global mean
    scored = [x for x in m if "eval_loss" in x]
    assert all(x["eval_baseline_gene_mean"] < x["eval_baseline_global_mean"] for x in scored), scored
    assert all(abs(x["eval_mlm_loss"] - x["eval_loss"]) < 1e-3 * x["eval_loss"] for x in scored)  # scGPT: MSE only
    assert ", gene-mean baseline " in p.stdout and ", global-mean baseline " in p.stdout, p.stdout
    from grnformer_ds.training.checkpoint import complete_tags, find_latest

    ck = os.path.join(out, "checkpoints")
    assert find_latest(ck) == f"global_step{STEPS}" and complete_tags(ck) == ["global_step15", "global_step30"]
    assert os.path.isfile(os.path.join(out, "hf_model", "model.safetensors"))


def test_mlflow_run_read_back_from_server(reference_run, mlflow_server):
    from mlflow.tracking import MlflowClient

    out, _ = reference_run
    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("test-ref")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    params = run.data.params
    assert params["ds.zero_optimization.stage"] == "3" and params["ds.bf16.enabled"] == "true"
    assert params["ds.train_micro_batch_size_per_gpu"] == "1" and params["run.batch.max_tokens"] == "2400"
    assert params["store.n_cells"] == "700"
    assert params["model.hidden_size"] == "32" and params["run.preset"] == "debug"
    history = client.get_metric_history(run.info.run_id, "loss")
    m = read_metrics(out)
    assert sorted((h.step, round(h.value, 4)) for h in history) == [(x["step"], round(x["loss"], 4)) for x in m]
    for key in ("eval_loss", "lr", "grad_norm", "cells_per_s", "nonpad_tokens_per_s", "step_time_s"):
        assert key in run.data.metrics, key
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "hf_model")}
    assert "hf_model/model.safetensors" in arts and "hf_model/config.json" in arts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "configs")} >= {
        "configs/ds_config.resolved.json", "configs/run_settings.resolved.json", "configs/model_config.json",
        "configs/vocab.json"}
    resolved = json.load(open(os.path.join(out, "run_settings.resolved.json")))
    assert resolved["packed"] and resolved["batch.max_tokens"] == 2400 and resolved["attn_implementation"] == "sdpa"


def test_kill9_then_resume_reproduces_the_uninterrupted_run(reference_run, demo_cache, tmp_path):
    ref_out, _ = reference_run
    out = str(tmp_path / "run")
    args = ["--deepspeed_config", CFG["zero3"], "--demo-cache-dir", demo_cache, "--output-dir", out, *COMMON]
    proc = subprocess.Popen(_cmd(args, launcher=False), cwd=REPO, env=launch_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    latest = os.path.join(out, "checkpoints", "latest")
    deadline = time.time() + 180
    while not os.path.exists(latest) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # kill -9 mid-run
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed = read_metrics(out)
    assert 15 <= len(killed) < STEPS  # it got past the first checkpoint and not to the end
    p = _run(args + ["--resume"], launcher=False)
    assert "resumed from" in p.stdout and "at step 15" in p.stdout
    ref, res = read_metrics(ref_out), read_metrics(out)
    assert [x["step"] for x in res] == list(range(1, STEPS + 1))
    assert [x["data_digest"] for x in res] == [x["data_digest"] for x in ref]  # exact data order
    for a, b in zip(ref, res):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-2), (a["step"], a["loss"], b["loss"])
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-6)
    assert res[-1]["eval_loss"] == pytest.approx(ref[-1]["eval_loss"], rel=1e-2)
    # the resumed run continued the killed run's MLflow run (its id is in the checkpoint)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri="sqlite:///" + os.path.join(out, "mlflow.db"))
    runs = client.search_runs([client.get_experiment_by_name("grnformer_ds").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert {h.step for h in client.get_metric_history(runs[0].info.run_id, "loss")} == set(range(1, STEPS + 1))


_RELOAD = textwrap.dedent("""
    import sys, torch
    try:
        import grnformer_ds  # the fake package must shadow any installed one
    except ImportError:
        pass
    else:
        raise SystemExit("grnformer_ds is importable in the reload process")
    from transformers import AutoModelForMaskedLM
    model = AutoModelForMaskedLM.from_pretrained(sys.argv[1], trust_remote_code=True, local_files_only=True).eval()
    assert not type(model).__module__.startswith("grnformer_ds"), type(model).__module__
    got = []
    with torch.no_grad():
        for batch in torch.load(sys.argv[2]):
            out = model(**batch)
            got.append({"predictions": out.predictions, "cell_embedding": out.cell_embedding, "loss": out.loss})
    torch.save(got, sys.argv[3])
""")


def _eval_batches(store, world_size: int, n: int, max_tokens: int | None = 2400) -> list[list[dict]]:
    """The held-out batches each rank evaluates on (same settings as the launcher's: packed, CSR graphs); padded
    batches of 8 cells with ``max_tokens=None``."""
    from grnformer_ds.data import StreamingCellDataset

    out = []
    layout = dict(batch_size=8) if max_tokens is None else dict(max_tokens=max_tokens, graph_layout="csr")
    for r in range(world_size):
        ds = StreamingCellDataset(store, seed=0, rank=r, world_size=world_size, split="eval", **layout)
        it, got = iter(ds), []
        while len(got) < n:
            try:
                got.append(next(it))
            except StopIteration:
                it = iter(ds)
        out.append(got)
    return out


def test_resume_with_a_longer_schedule_continues_the_lr(reference_run, demo_cache, tmp_path):
    """--resume with a larger --max-steps says so in one line and the LR goes on from the finished run's floor
    (it used to jump back up the recomputed cosine)."""
    import shutil

    ref_out, _ = reference_run
    out = str(tmp_path / "run")
    shutil.copytree(ref_out, out, ignore=shutil.ignore_patterns("hf_model", "mlflow.db", "mlartifacts"))
    longer = [a if a != str(STEPS) else str(STEPS + 6) for a in COMMON]
    p = _run(["--deepspeed_config", CFG["zero3"], "--demo-cache-dir", demo_cache, "--output-dir", out, *longer,
              "--resume", "--no-export", "--mlflow-tracking-uri", "none"], launcher=False)
    notes = [ln for ln in p.stdout.splitlines() if "LR schedule changed on resume" in ln]
    assert len(notes) == 1 and f"max_steps {STEPS} → {STEPS + 6}" in notes[0], p.stdout
    lr = {x["step"]: x["lr"] for x in read_metrics(out)}
    assert sorted(lr) == list(range(1, STEPS + 7))
    floor = 0.1 * 5e-3
    assert all(lr[s] == pytest.approx(floor, rel=1e-6) for s in range(STEPS, STEPS + 7)), lr
    state = json.load(open(os.path.join(out, "checkpoints", f"global_step{STEPS + 6}", "trainer_state.json")))
    assert [seg["max_steps"] for seg in state["schedule"]] == [STEPS, STEPS + 6]


def test_export_reloads_offline_in_a_fresh_process_with_identical_outputs(reference_run, demo_cache, tmp_path):
    from grnformer_ds.modeling import GRNFormerConfig, GRNFormerForMaskedLM
    from grnformer_ds.training.engine import consolidate_fp32

    out, _ = reference_run
    hf = os.path.join(out, "hf_model")  # written by the run itself at the end
    assert json.load(open(os.path.join(hf, "config.json")))["auto_map"]["AutoModelForMaskedLM"].startswith(
        "modeling_grnformer.")
    assert json.load(open(os.path.join(hf, "vocab.json"))) == json.load(
        open(os.path.join(demo_cache, "demo_store", "vocab.json")))
    # reference: the trained fp32 master weights in grnformer_ds's own class
    ck = os.path.join(out, "checkpoints")
    ref_model = GRNFormerForMaskedLM(GRNFormerConfig.from_json_file(os.path.join(ck, "model_config.json")))
    ref_model.load_state_dict(consolidate_fp32(ck), strict=True)
    store = os.path.join(demo_cache, "demo_store")
    padded, packed = _eval_batches(store, 1, 1, max_tokens=None)[0][0], _eval_batches(store, 1, 1)[0][0]
    assert padded["cell_edge_index"].shape[1] > 0  # the comparison covers the GRN path too
    with torch.no_grad():
        refs = [ref_model.eval()(**b) for b in (padded, packed)]
    torch.save([padded, packed], tmp_path / "batch.pt")
    fake = tmp_path / "fake" / "grnformer_ds"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('grnformer_ds must not be needed to load the export')\n")
    (tmp_path / "reload.py").write_text(_RELOAD)
    env = launch_env(PYTHONPATH=str(tmp_path / "fake"), HF_MODULES_CACHE=str(tmp_path / "hf_modules"),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    p = subprocess.run([sys.executable, str(tmp_path / "reload.py"), hf, str(tmp_path / "batch.pt"),
                        str(tmp_path / "got.pt")], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    got = torch.load(tmp_path / "got.pt")
    for key in ("predictions", "cell_embedding", "loss"):  # padded: bit for bit
        assert torch.equal(got[0][key], getattr(refs[0], key)), key
    for key in ("predictions", "cell_embedding", "loss"):  # packed: the GEMMs' blocking follows the buffers' alignment
        torch.testing.assert_close(got[1][key], getattr(refs[1], key), rtol=1e-6, atol=1e-5)


def test_two_ranks_zero3_export_reconstructs_the_trained_model(demo_cache, tmp_path):
    """2 CPU ranks via `deepspeed --num_gpus 2`; launchers/export_hf.py consolidates the world-size-2 ZeRO-3
    checkpoint; the exported model's held-out loss equals the run's own final eval loss (bf16 run, fp32 export)."""
    out = str(tmp_path / "run")
    env = launch_env()
    del env["OMP_NUM_THREADS"]  # the thread default of CPU ranks: the cores shared by the node's two ranks
    p = _run(["--deepspeed_config", CFG["zero3"], "--demo-cache-dir", demo_cache, "--output-dir", out,
              "--max-steps", "6", "--eval-every", "6", "--save-every", "6", "--no-progress", "--no-export",
              "--mlflow-tracking-uri", "none", "--max-tokens", "3000"], ranks=2, env=env)
    assert "2 rank(s)" in p.stdout and "packed micro-batches of <= 3000 tokens" in p.stdout
    cores = len(os.sched_getaffinity(0))
    threads = [ln for ln in p.stdout.splitlines() if ln.startswith("threads:")]
    assert len(threads) == 1 and f"({cores} cores" in threads[0] and "2 ranks on this node" in threads[0], p.stdout
    assert threads[0].startswith(f"threads: {max(1, cores // 2)} per rank") or "busy with other work" in threads[0]
    m = read_metrics(out)
    assert [x["step"] for x in m] == list(range(1, 7))
    state_path = os.path.join(out, "checkpoints", "global_step6", "trainer_state.json")
    assert os.path.isfile(state_path), (os.listdir(os.path.join(out, "checkpoints")), p.stdout[-3000:],
                                        p.stderr[-3000:], m[-1])
    state = json.load(open(state_path))
    assert state["world_size"] == 2 and state["max_tokens"] == 3000
    # both ranks' cells of every step: ~11 demo cells of ~250 tokens fill 3,000 tokens
    assert state["cells_seen"] == round(sum(x["cells_per_s"] * x["step_time_s"] for x in m))
    assert 6 * 2 * 9 <= state["cells_seen"] <= 6 * 2 * 14
    hf = str(tmp_path / "hf")
    e = subprocess.run([sys.executable, os.path.join(REPO, "launchers", "export_hf.py"), "--checkpoint", out,
                        "--out", hf], cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=120)
    assert e.returncode == 0 and "exported to" in e.stdout, e.stderr[-2000:]
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(hf, trust_remote_code=True).eval()
    sse, count = 0.0, 0  # the trainer's evaluation: all squared errors over all masked positions of both ranks
    with torch.no_grad():
        for rank_batches in _eval_batches(os.path.join(demo_cache, "demo_store"), 2, 4, max_tokens=3000):
            for b in rank_batches:
                sse += model(**b, num_items_in_batch=torch.tensor(1.0)).loss.item()
                count += int((b["labels"] != -100).sum())
    assert sse / count == pytest.approx(m[-1]["eval_loss"], rel=3e-2)


def test_two_ranks_zero2_padded_batches(demo_cache, tmp_path):
    """The padded layout through the card's command: --micro-batch-size selects it."""
    out = str(tmp_path / "run")
    p = _run(["--deepspeed_config", CFG["zero2"], "--demo-cache-dir", demo_cache, "--output-dir", out,
              "--max-steps", "3", "--save-every", "3", "--eval-every", "3", "--no-progress", "--no-export",
              "--mlflow-tracking-uri", "none", "--micro-batch-size", "8"], ranks=2)
    assert "2 rank(s) on cpu, ZeRO stage 2" in p.stdout and "micro batch 8 cells (padded)" in p.stdout
    m = read_metrics(out)
    assert len(m) == 3 and all(x["padding_fraction"] > 0 for x in m)
    state = json.load(open(os.path.join(out, "checkpoints", "global_step3", "trainer_state.json")))
    assert state["cells_seen"] == 3 * 8 * 2
    assert os.path.isfile(os.path.join(out, "checkpoints", "global_step3", "COMPLETE"))


def test_zero3_offload_with_zero_init_one_rank(demo_cache, reference_run, tmp_path):
    """ZeRO-3 with optimizer + parameter offload, transformer built inside deepspeed.zero.Init (GNN outside)."""
    out = str(tmp_path / "run")
    p = _run(["--deepspeed_config", CFG["zero3_offload"], "--demo-cache-dir", demo_cache, "--output-dir", out,
              "--max-steps", "2", "--save-every", "2", "--eval-every", "2", "--no-progress", "--no-export",
              "--mlflow-tracking-uri", "none", "--zero-init", "on", "--lr", "5e-3"], launcher=False)
    assert "ZeRO stage 3" in p.stdout and "(zero.Init)" in p.stdout
    m, ref = read_metrics(out), read_metrics(reference_run[0])
    assert len(m) == 2
    # same data, same initial weights (initialised on gathered shards): the first loss matches the plain build's
    assert m[0]["loss"] == pytest.approx(ref[0]["loss"], rel=1e-3)
    assert os.path.isfile(os.path.join(out, "checkpoints", "global_step2", "COMPLETE"))


def _bad(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_scfoundation_run_uses_scfoundations_own_tokenization(demo_cache, tmp_path):
    """`--backbone scfoundation` masks 30 % (scFoundation's recipe, not scGPT's 15 %) and packs cells of up to its
    2,048 genes + T and S (2 such cells per micro-batch on CPU); the resolved settings record it."""
    out = str(tmp_path / "run")
    p = _run(["--deepspeed_config", CFG["zero3"], "--demo-cache-dir", demo_cache, "--output-dir", out,
              "--backbone", "scfoundation", "--max-steps", "3", "--eval-every", "3", "--save-every", "3",
              "--no-progress", "--no-export", "--mlflow-tracking-uri", "none"], launcher=False)
    assert "backbone scfoundation" in p.stdout and "packed micro-batches of <= 4100 tokens" in p.stdout, p.stdout
    settings = json.load(open(os.path.join(out, "run_settings.resolved.json")))
    tok = settings["tokenization"]
    assert (tok["mask_ratio"], tok["max_seq_len"], tok["pad_value"]) == (0.3, 2048, -2.0)
    assert [x["step"] for x in read_metrics(out)] == [1, 2, 3]


TOY_PLUGIN = """
# a fourth backbone, registered from outside the package: scGPT's layout with mean pooling and its own masking
from dataclasses import dataclass

from grnformer_ds.data import ScGPTCollator, register_collator
from grnformer_ds.modeling import register_backbone
from grnformer_ds.modeling.backbone_scgpt import ScGPTBackbone


@register_backbone
class ToyBackbone(ScGPTBackbone):
    name = "toy"
    defaults = {"cell_embedding_pooling": "mean"}
    uses_mvc = False


@register_collator("toy")
@dataclass
class ToyCollator(ScGPTCollator):
    mask_ratio: float = 0.4
    max_seq_len: int = 300
"""


def test_a_plugin_backbone_runs_through_the_card_command_and_reloads(demo_cache, tmp_path):
    """A backbone defined in a user's file (model spec + collator) trains through `deepspeed launchers/pretrain.py
    --plugin FILE --backbone NAME` without touching the package; its own defaults reach the run, and the export
    reloads (AutoModelForMaskedLM, trust_remote_code) wherever the plug-in module is importable."""
    plugin = tmp_path / "toy_backbone.py"
    plugin.write_text(TOY_PLUGIN)
    out = str(tmp_path / "run")
    p = _run(["--deepspeed_config", CFG["zero3"], "--demo-cache-dir", demo_cache, "--output-dir", out,
              "--plugin", str(plugin), "--backbone", "toy", "--max-steps", "3", "--eval-every", "3",
              "--save-every", "3", "--no-progress", "--mlflow-tracking-uri", "none"])
    assert "backbone toy" in p.stdout and "packed micro-batches of <= 600 tokens" in p.stdout, p.stdout
    settings = json.load(open(os.path.join(out, "run_settings.resolved.json")))
    assert (settings["tokenization"]["mask_ratio"], settings["tokenization"]["max_seq_len"]) == (0.4, 300)
    assert settings["plugins"] == [str(plugin)]
    config = json.load(open(os.path.join(out, "hf_model", "config.json")))
    assert (config["backbone"], config["backbone_module"], config["cell_embedding_pooling"]) == (
        "toy", "toy_backbone", "mean")
    assert [x["step"] for x in read_metrics(out)] == [1, 2, 3]
    reload = ("import sys, torch\nfrom transformers import AutoModelForMaskedLM\n"
              "m = AutoModelForMaskedLM.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
              "print(type(m.grnformer.backbone_spec).__module__, m.config.cell_embedding_pooling)\n")
    r = subprocess.run([sys.executable, "-c", reload, os.path.join(out, "hf_model")], cwd=str(tmp_path),
                       env=launch_env(PYTHONPATH=f"{tmp_path}:{REPO}", HF_MODULES_CACHE=str(tmp_path / "hf_modules")),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.split()[-2:] == ["toy_backbone", "mean"], r.stderr[-2000:]
    export = [sys.executable, os.path.join(REPO, "launchers", "export_hf.py"), "--checkpoint", out, "--out",
              str(tmp_path / "exp")]
    e = subprocess.run(export, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=120)
    assert e.returncode == 2 and "toy_backbone" in e.stderr and len(e.stderr.splitlines()) == 1, e.stderr
    e = subprocess.run(export + ["--plugin", str(plugin)], cwd=REPO, env=launch_env(), capture_output=True, text=True,
                       timeout=120)
    assert e.returncode == 0 and "exported to" in e.stdout, e.stderr[-2000:]
    bad = subprocess.run(_cmd(["--plugin", str(tmp_path / "missing.py")], launcher=False), cwd=REPO, env=launch_env(),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "plug-in file not found" in bad.stderr and len(bad.stderr.splitlines()) == 1


@pytest.mark.parametrize("ranks", [1, 2])
def test_scpalm_through_the_card_command(demo_cache, tmp_path, ranks):
    """`--backbone scpalm` on 1 and 2 CPU ranks (ZeRO-3, packed): the loss and the held-out loss decrease, the
    codebook stays in use (code-usage perplexity logged per step), whole patches are masked (25 %, the
    tokenization recorded), and the run's export reloads with the run's predictions."""
    out = str(tmp_path / "run")
    steps = 40 if ranks == 1 else 6
    p = _run(["--deepspeed_config", CFG["zero3"], "--demo-cache-dir", demo_cache, "--output-dir", out,
              "--backbone", "scpalm", "--max-steps", str(steps), "--eval-every", str(steps // 2),
              "--save-every", str(steps), "--no-progress", "--mlflow-tracking-uri", "none"], ranks=ranks)
    assert f"{ranks} rank(s)" in p.stdout and "backbone scpalm" in p.stdout, p.stdout
    tok = json.load(open(os.path.join(out, "run_settings.resolved.json")))["tokenization"]
    assert (tok["mask_ratio"], tok["patch_size"]) == (0.25, 16)
    m = read_metrics(out)
    assert [x["step"] for x in m] == list(range(1, steps + 1))
    assert {"loss_mlm", "loss_cell", "loss_codebook", "loss_contrastive", "codebook_perplexity"} <= set(m[0])
    evals = [x["eval_loss"] for x in m if "eval_loss" in x]
    assert evals[-1] < evals[0] and m[-1]["loss"] < m[0]["loss"]
    if ranks == 1:  # 64 codes: not collapsed onto a few
        assert m[-1]["codebook_perplexity"] > 8, [round(x["codebook_perplexity"], 1) for x in m]
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(os.path.join(out, "hf_model"), trust_remote_code=True).eval()
    batch = _eval_batches(os.path.join(demo_cache, "demo_store"), 1, 1)[0][0]
    with torch.no_grad():
        got = model(**batch)
    assert got.token_index is not None and got.last_hidden_state.shape[1] < batch["input_ids"].shape[1] / 8
    assert torch.isfinite(got.loss)


def _scgpt_import(demo_cache, tmp_path):
    """A small scGPT checkpoint in scGPT's own format on the demo store's genes, imported (the HF folder)."""
    from scgpt_reference import make_scgpt, write_scgpt_folder  # tests/ is on sys.path

    from grnformer_ds.training.importing import import_checkpoint

    vocab = json.load(open(os.path.join(demo_cache, "demo_store", "vocab.json")))
    ref = make_scgpt(vocab, d_model=32, nhead=4, d_hid=64, nlayers=2)
    folder = write_scgpt_folder(ref, vocab, tmp_path / "scgpt", naming="flash")
    return import_checkpoint("scgpt", folder, str(tmp_path / "hf"), say=lambda line: None)


def test_init_from_an_import_starts_from_the_foundation_model_exactly(demo_cache, tmp_path):
    """GRN parts added to an imported backbone (after its last layer, beta = 0): on a demo batch with graphs the
    outputs are the imported model's without graphs, bit for bit; a store on another vocabulary is refused."""
    from grnformer_ds.errors import UserInputError
    from grnformer_ds.modeling import GRNFormerForMaskedLM
    from grnformer_ds.store import open_store
    from grnformer_ds.training.importing import init_from_config, load_init_weights

    hf = _scgpt_import(demo_cache, tmp_path)
    store = open_store(os.path.join(demo_cache, "demo_store"))
    lines = []
    config, weights = init_from_config(hf, store, use_graph=True, say=lines.append)
    assert (config.use_graph, config.fusion_position, config.fusion_beta_init) == (True, "after", 0.0)
    model = GRNFormerForMaskedLM(config).eval()
    new = load_init_weights(model, weights, lines.append)
    assert new and all(n.startswith(("grnformer.structure_encoder.", "grnformer.fusion.")) for n in new)
    assert any("store counts on the model's 768-token vocabulary: 100.0%" in ln for ln in lines), lines
    plain = GRNFormerForMaskedLM.from_pretrained(hf).eval()
    batch = _eval_batches(os.path.join(demo_cache, "demo_store"), 1, 1)[0][0]
    with torch.no_grad():
        got, expected = model(**batch), plain(**batch)
    assert got.structure_states is not None and expected.structure_states is None  # the GRN path ran
    assert torch.equal(got.predictions, expected.predictions)
    assert torch.equal(got.cell_embedding, expected.cell_embedding)
    other = tmp_path / "other"
    other.mkdir()
    for name in ("config.json", "model.safetensors"):
        os.symlink(os.path.join(hf, name), other / name)
    vocab = json.load(open(os.path.join(hf, "vocab.json")))
    (other / "vocab.json").write_text(json.dumps({k: (v + 1 if k == "CD3D" else v) for k, v in vocab.items()}))
    with pytest.raises(UserInputError, match=r"rebuild the store with data_prep/build_store.py --gene-vocab .*vocab"):
        init_from_config(str(other), store, use_graph=True, say=lines.append)


@pytest.mark.parametrize("ranks", [1, 2])
def test_init_from_through_the_card_command(demo_cache, tmp_path, ranks):
    """`--init-from` an scGPT import on 1 and 2 CPU ranks (ZeRO-3): finite losses, the export reloads with the GRN
    parts; with --freeze-backbone (2 ranks) every backbone weight of the export is the import's, bit for bit."""
    hf = _scgpt_import(demo_cache, tmp_path)
    out = str(tmp_path / "run")
    extra = ["--freeze-backbone"] if ranks == 2 else ["--new-params-lr", "0.01"]
    p = _run(["--deepspeed_config", CFG["zero3"], "--demo-cache-dir", demo_cache, "--output-dir", out,
              "--init-from", hf, "--max-steps", "4", "--eval-every", "2", "--save-every", "4", "--no-progress",
              "--mlflow-tracking-uri", "none", *extra], ranks=ranks)
    assert "init: 50 tensors from the folder" in p.stdout and "beta = 0" in p.stdout, p.stdout
    assert "for the pretrained parameters" in p.stdout
    if ranks == 2:
        assert "frozen: 0.04M backbone parameters" in p.stdout
    m = read_metrics(out)
    assert [x["step"] for x in m] == [1, 2, 3, 4] and all(np.isfinite(x["loss"]) for x in m)
    from safetensors.torch import load_file
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(os.path.join(out, "hf_model"), trust_remote_code=True)
    assert model.config.use_graph and model.config.fusion_position == "after"
    start, end = load_file(os.path.join(hf, "model.safetensors")), load_file(
        os.path.join(out, "hf_model", "model.safetensors"))
    backbone = [k for k in start if k.startswith("grnformer.")]
    same = [k for k in backbone if torch.equal(start[k], end[k])]
    assert len(same) == (len(backbone) if ranks == 2 else 0), (len(same), len(backbone))


def test_init_from_an_scfoundation_import_with_its_own_store(demo_cache, tmp_path):
    """scFoundation's path end to end on 2 CPU ranks (ZeRO-3): a models.ckpt (Performer decoder) whose genes are the
    demo genes and a few others -> import -> a store built on its vocabulary (build_store --gene-vocab) + GRN assets
    -> `--init-from` for a few steps (finite losses) -> the export reloads with the GRN parts, the Performer decoder
    and the checkpoint's projection matrices (buffers: ZeRO-3 does not partition them, training does not redraw
    them)."""
    from safetensors.torch import load_file
    from scfoundation_reference import make_maeautobin, scfoundation_config, write_gene_list, write_models_ckpt

    from grnformer_ds.grn.demo import ensure_demo_grn
    from grnformer_ds.store.demo import build_demo_store
    from grnformer_ds.store.vocab import vocab_genes
    from grnformer_ds.training.importing import import_checkpoint

    genes = vocab_genes(json.load(open(os.path.join(demo_cache, "demo_store", "vocab.json"))))
    genes = [f"NOTINDATA{i}" for i in range(5)] + genes[::-1]  # another order, and genes the data lacks
    config = scfoundation_config(len(genes), "performer", hidden=32, depth=2, heads=4, dec_hidden=16, dec_depth=1,
                                 dec_heads=2)
    ckpt = write_models_ckpt(tmp_path / "models.ckpt", {"cell": (make_maeautobin(config), config)})
    hf = import_checkpoint("scfoundation", ckpt, str(tmp_path / "hf"), say=lambda line: None,
                           gene_list=write_gene_list(tmp_path / "genes.tsv", genes))
    store = str(tmp_path / "store")
    build_demo_store(store, progress=False, gene_vocab=os.path.join(hf, "vocab.json"))
    ensure_demo_grn(store, log=lambda line: None)
    out = str(tmp_path / "run")
    p = _run(["--deepspeed_config", CFG["zero3"], "--data", store, "--output-dir", out, "--init-from", hf,
              "--max-steps", "3", "--eval-every", "3", "--save-every", "3", "--no-progress",
              "--mlflow-tracking-uri", "none"], ranks=2)
    assert "backbone scfoundation" in p.stdout and "beta = 0" in p.stdout, p.stdout
    m = read_metrics(out)
    assert [x["step"] for x in m] == [1, 2, 3] and all(np.isfinite(x["loss"]) for x in m)
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(os.path.join(out, "hf_model"), trust_remote_code=True)
    assert model.config.use_graph and model.config.decoder_attention == "performer"
    start, end = load_file(os.path.join(hf, "model.safetensors")), load_file(
        os.path.join(out, "hf_model", "model.safetensors"))
    projections = [k for k in start if k.endswith("projection_matrix")]
    assert projections and all(torch.equal(start[k], end[k]) for k in projections)
    assert not torch.equal(start["decoder.to_final.weight"], end["decoder.to_final.weight"])  # it trained


def test_bad_config_file_is_one_line_and_exit_2(tmp_path):
    cfg = _bad(tmp_path, "ds.json", '{"zero_optimization": {"stage": 3,}}')
    p = subprocess.run(_cmd(["--deepspeed_config", cfg, "--output-dir", str(tmp_path / "run")], launcher=False),
                       cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {cfg}: invalid JSON at line 1 column "), p.stderr


@pytest.mark.parametrize("case", ["disagreement", "deepspeed_rejects", "vocab_too_small", "output_dir_taken",
                                  "compile_scpalm", "init_from_and_preset", "freeze_without_init"])
def test_bad_input_is_one_line_and_exit_2(case, demo_cache, tmp_path, capsys):
    """Through the CLI entry point in this process (a process group is already up or started here)."""
    sys.path.insert(0, os.path.join(REPO, "launchers"))
    import pretrain

    args = ["--demo-cache-dir", demo_cache, "--output-dir", str(tmp_path / "run"), "--max-steps", "2",
            "--no-progress", "--mlflow-tracking-uri", "none"]
    if case == "disagreement":
        cfg = _bad(tmp_path, "ds.json", json.dumps({"train_micro_batch_size_per_gpu": 8}))
        args += ["--micro-batch-size", "4"]
        needle = '"train_micro_batch_size_per_gpu" is 8 but --micro-batch-size is 4'
    elif case == "deepspeed_rejects":
        cfg = _bad(tmp_path, "ds.json", json.dumps({"zero_optimization": {"stage": 3, "bogus_key": 1}}))
        needle = "ds.json: invalid DeepSpeed config"
    elif case == "vocab_too_small":
        cfg = CFG["zero3"]
        args += ["--config", _bad(tmp_path, "model.json", json.dumps({"vocab_size": 10}))]
        needle = "vocabulary does not fit"
    elif case == "init_from_and_preset":  # the model comes from the folder: one source of truth
        cfg = CFG["zero3"]
        args += ["--init-from", str(tmp_path), "--model-preset", "debug"]
        needle = f"--init-from takes the model from {tmp_path}: drop --model-preset"
    elif case == "freeze_without_init":
        cfg = CFG["zero3"]
        args += ["--freeze-backbone"]
        needle = "--freeze-backbone needs --init-from"
    elif case == "compile_scpalm":  # its patch layout has no static shapes
        cfg = CFG["zero3"]
        args += ["--backbone", "scpalm", "--compile"]
        needle = "--compile: the scpalm backbone's token layout has a data-dependent length"
    else:  # another run's complete checkpoint is there: refuse rather than interleave two runs
        cfg = CFG["zero3"]
        (tmp_path / "run" / "checkpoints" / "global_step5").mkdir(parents=True)
        (tmp_path / "run" / "checkpoints" / "global_step5" / "COMPLETE").write_text("x")
        needle = "pass --resume to continue it, --overwrite-output-dir to start over"
    capsys.readouterr()
    assert pretrain.main(["--deepspeed_config", cfg, *args]) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], errors
