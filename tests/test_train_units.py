"""Unit tests of grnformer_ds.training that need no store: config resolution (one source of truth, batch layouts), the
LR schedule, checkpoint atomics, and a single-rank ZeRO-3 engine (in this process) driving a toy model through the
real Trainer: the non-finite guard, the no-NaN-checkpoint rule, exact resume; and a small GRNFormer through the same
engine: accumulating two packed micro-batches gives the gradient of one step over both."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from grnformer_ds.errors import UserInputError
from grnformer_ds.training import checkpoint as ckpt
from grnformer_ds.training.ds_config import load_ds_config, resolve_ds_config
from grnformer_ds.training.schedule import LRSchedule, warmup_cosine_factor
from grnformer_ds.training.settings import BatchSettings, OptimSettings, RunSettings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZERO3 = os.path.join(REPO, "ds_configs", "zero3.json")


def _settings(tmp_path, **kw):
    batch = BatchSettings(kw.pop("micro", None), kw.pop("accum", None), kw.pop("max_tokens", None))
    optim = OptimSettings(lr=kw.pop("lr", 1e-4), grad_clip=kw.pop("clip", None))
    return RunSettings(output_dir=str(tmp_path), batch=batch, optim=optim, **kw)


# ------------------------------------------------------------------ config resolution
def test_auto_fields_filled_from_settings(tmp_path):
    r = resolve_ds_config(load_ds_config(ZERO3), _settings(tmp_path, micro=4, accum=3), world_size=2)
    c = r.ds_config
    assert (c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"], c["train_batch_size"]) == (4, 3, 24)
    assert c["bf16"]["enabled"] is True and c["fp16"]["enabled"] is False
    assert c["gradient_clipping"] == 1.0 and r.zero_stage == 3 and r.client_optimizer
    assert c["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_json_values_are_used_when_cli_is_silent(tmp_path):
    cfg = {"train_micro_batch_size_per_gpu": 5, "train_batch_size": 40, "bf16": {"enabled": False},
           "fp16": {"enabled": False}, "gradient_clipping": 0.5}
    r = resolve_ds_config(cfg, _settings(tmp_path), world_size=2)
    assert (r.micro_batch_size, r.grad_accum, r.precision) == (5, 4, "fp32")  # accum derived like DeepSpeed does
    assert r.ds_config["gradient_clipping"] == 0.5


@pytest.mark.parametrize("cfg,kw,needle", [
    ({"train_micro_batch_size_per_gpu": 8}, {"micro": 4}, "--micro-batch-size"),
    ({"gradient_accumulation_steps": 2}, {"accum": 3}, "--grad-accum"),
    ({"train_batch_size": 10}, {"micro": 4, "accum": 1}, "train_batch_size"),
    ({"gradient_clipping": 1.0}, {"clip": 2.0}, "--grad-clip"),
    ({"bf16": {"enabled": True}}, {"precision": "fp32"}, "--precision"),
    ({"scheduler": {"type": "WarmupLR"}}, {}, "scheduler"),
    ({"zero_optimization": {"stage": 7}}, {}, "stage"),
])
def test_disagreement_is_refused(tmp_path, cfg, kw, needle):
    with pytest.raises(UserInputError, match=needle) as ei:
        resolve_ds_config(cfg, _settings(tmp_path, **kw), world_size=1, path="my.json")
    assert "my.json" in str(ei.value) and "\n" not in str(ei.value)


def test_batch_layout_packed_unless_a_micro_batch_size_is_given(tmp_path):
    r = resolve_ds_config(load_ds_config(ZERO3), _settings(tmp_path, accum=2), world_size=2)
    assert r.packed and r.micro_batch_size == 1 and r.ds_config["train_batch_size"] == 4
    r = resolve_ds_config({"train_micro_batch_size_per_gpu": 8}, _settings(tmp_path), world_size=1)
    assert not r.packed and r.micro_batch_size == 8
    with pytest.raises(UserInputError, match="max-tokens"):
        resolve_ds_config({"train_micro_batch_size_per_gpu": 8}, _settings(tmp_path, max_tokens=4096), world_size=1,
                          path="my.json")
    with pytest.raises(UserInputError, match="give one of them"):
        BatchSettings(micro_batch_size=8, max_tokens=4096)


def test_offload_config_resolves_for_cpu(tmp_path):
    path = os.path.join(REPO, "ds_configs", "zero3_offload.json")
    r = resolve_ds_config(load_ds_config(path), _settings(tmp_path, lr=3e-4), world_size=1, has_gpu=False)
    p = r.ds_config["optimizer"]["params"]
    assert p["lr"] == 3e-4 and p["torch_adam"] is True and not r.client_optimizer
    assert r.ds_config["zero_optimization"]["offload_param"]["pin_memory"] is False


def test_precision_falls_back_clearly_only_when_nobody_chose(tmp_path):
    r = resolve_ds_config(load_ds_config(ZERO3), _settings(tmp_path), world_size=1, bf16_supported=False)
    assert r.precision == "fp32" and r.ds_config["bf16"]["enabled"] is False and "falling back" in r.notes[0]
    with pytest.raises(UserInputError, match="bf16 is not supported"):
        resolve_ds_config(load_ds_config(ZERO3), _settings(tmp_path, precision="bf16"), world_size=1,
                          bf16_supported=False)
    with pytest.raises(UserInputError, match="fp16 mixed precision needs a GPU"):
        resolve_ds_config(load_ds_config(ZERO3), _settings(tmp_path, precision="fp16"), world_size=1)


def test_bad_json_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_micro_batch_size_per_gpu": 4,,}')
    with pytest.raises(UserInputError, match=r"bad.json: invalid JSON at line 1"):
        load_ds_config(str(bad))
    with pytest.raises(UserInputError, match="not found"):
        load_ds_config(str(tmp_path / "missing.json"))


# ------------------------------------------------------------------ schedule
def test_warmup_cosine_reference_points():
    f = [warmup_cosine_factor(s, 10, 110, 0.1) for s in range(0, 130)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warmup to the peak
    assert f[10] == pytest.approx(1.0)
    assert f[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # half way down the cosine
    assert f[110] == pytest.approx(0.1) and f[129] == pytest.approx(0.1)  # floor after max_steps
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # monotone decay


def _max_jump(schedule, steps):
    lrs = [schedule.lr_at(s) for s in steps]
    return max(abs(a - b) for a, b in zip(lrs, lrs[1:]))


@pytest.mark.parametrize("resume_step", [3, 20, 100, 150])
def test_resume_with_a_longer_schedule_continues_the_lr_smoothly(resume_step):
    """--resume with --max-steps 100 → 200 at step 20 (past warmup), 3 (inside it), 100 (at the floor), 150 (after the
    old end): the LR at the resume step is the old run's, then decays to the new floor at the new end, no jump."""
    old = LRSchedule.warmup_cosine(3e-3, 5, 100, 0.1)
    new = LRSchedule.warmup_cosine(3e-3, 10, 200, 0.1)
    note = new.continue_from(old, resume_step)
    assert note is not None and "max_steps 100 → 200" in note and "warmup_steps 5 → 10" in note
    assert [new.lr_at(s) for s in range(resume_step + 1)] == [old.lr_at(s) for s in range(resume_step + 1)]
    assert new.lr_at(200) == pytest.approx(3e-4) and new.lr_at(250) == pytest.approx(3e-4)
    typical = _max_jump(old, range(0, 100))  # the largest step-to-step change of the original curve
    assert _max_jump(new, range(resume_step, 201)) <= typical + 1e-12
    # the segments round-trip through the checkpoint, and an unchanged resume adds nothing
    again = LRSchedule.warmup_cosine(3e-3, 10, 200, 0.1)
    assert again.continue_from(LRSchedule.from_state(new.state_dict()), 180) is None
    assert [again.lr_at(s) for s in range(0, 210, 7)] == [new.lr_at(s) for s in range(0, 210, 7)]


def test_extending_a_finished_run_stays_at_its_floor_instead_of_jumping_up():
    """The issue's case: a run that ended at its floor (3e-4), resumed with a longer --max-steps, used to jump back
    up the new cosine (to 2.8e-3 here) at the next step."""
    old = LRSchedule.warmup_cosine(3e-3, 1, 20, 0.1)
    new = LRSchedule.warmup_cosine(3e-3, 5, 100, 0.1)
    assert new.lr_at(20) - old.lr_at(20) > 2e-3  # without continuing
    new.continue_from(old, 20)
    assert all(new.lr_at(s) == pytest.approx(3e-4) for s in range(20, 120))


def test_resume_with_a_new_peak_lr_inside_the_warmup_ramps_to_it():
    old = LRSchedule.warmup_cosine(1e-3, 10, 100, 0.1)
    new = LRSchedule.warmup_cosine(2e-3, 10, 100, 0.1)
    assert "lr 0.001 → 0.002" in new.continue_from(old, 4)
    assert new.lr_at(4) == old.lr_at(4) and new.lr_at(10) == pytest.approx(2e-3)
    ramp = [new.lr_at(s) for s in range(4, 11)]
    assert all(b > a for a, b in zip(ramp, ramp[1:]))
    assert new.lr_at(100) == pytest.approx(2e-4)


# ------------------------------------------------------------------ checkpoint atomics
def test_find_latest_ignores_interrupted_save(tmp_path):
    root = str(tmp_path)
    for step, complete in ((10, True), (20, True), (30, False)):
        d = tmp_path / ckpt.tag_for_step(step)
        d.mkdir()
        (d / "mp_rank_00_model_states.pt").write_bytes(b"x")
        if complete:
            (d / ckpt.COMPLETE).write_text("ok")
    assert ckpt.find_latest(root) == "global_step20"  # no `latest` file: newest complete tag
    (tmp_path / ckpt.LATEST).write_text("global_step30")  # a pointer to an unfinished tag is not trusted
    assert ckpt.find_latest(root) == "global_step20"
    (tmp_path / ckpt.LATEST).write_text("global_step10")
    assert ckpt.find_latest(root) == "global_step10"
    assert ckpt.complete_tags(root) == ["global_step10", "global_step20"]


# ------------------------------------------------------------------ a real single-rank ZeRO-3 engine
class ToyMLM(torch.nn.Module):
    """Regress `labels` from `values`; a batch whose `poison` flag is set produces a NaN loss."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Dropout(0.1),
                                       torch.nn.Linear(32, 8))

    def forward(self, input_ids, values, attention_mask=None, labels=None, poison=None):
        pred = self.net(values.to(self.net[0].weight.dtype)).float()
        loss = ((pred - labels) ** 2).mean()
        if poison is not None and bool(poison.any()):
            loss = loss * float("nan")
        return {"loss": loss}


class ListBatches:
    """A resumable source over a fixed list of batches."""

    def __init__(self, batches):
        self.batches, self.pos = batches, 0

    def __iter__(self):
        while self.pos < len(self.batches):
            self.pos += 1
            yield self.batches[self.pos - 1]
        self.pos = 0

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, s):
        self.pos = s["pos"]


class ToyBatches(ListBatches):
    """Resumable source of 64 fixed random batches; `poison` marks batches that yield a NaN loss."""

    def __init__(self, n=64, poison=()):
        g = torch.Generator().manual_seed(0)
        data = []
        for i in range(n):
            v = torch.randn(4, 8, generator=g)
            data.append({"input_ids": torch.zeros(4, 8, dtype=torch.long), "values": v,
                         "attention_mask": torch.ones(4, 8, dtype=torch.bool), "labels": v.flip(1) * 2,
                         "cell_index": torch.arange(4 * i, 4 * i + 4), "poison": torch.tensor([i in poison])})
        super().__init__(data)


@pytest.fixture(scope="module")
def dist_info():
    from grnformer_ds.training.engine import init_distributed

    return init_distributed()


def _trainer(tmp_path, dist_info, max_steps, poison=(), resume=False, max_nonfinite=3, save_every=100,
             on_save_error="stop", accum=2):
    from grnformer_ds.training.engine import build_engine
    from grnformer_ds.training.schedule import LRSchedule, build_scheduler
    from grnformer_ds.training.tracking import Tracker
    from grnformer_ds.training.trainer import Trainer

    s = _settings(tmp_path, micro=4, accum=accum, lr=1e-2, max_steps=max_steps, save_every=save_every, eval_every=1000,
                  resume=resume, max_nonfinite=max_nonfinite, progress=False, precision="bf16",
                  on_save_error=on_save_error)
    r = resolve_ds_config(load_ds_config(ZERO3), s, dist_info.world_size)
    torch.manual_seed(0)
    eng = build_engine(ToyMLM(), r, 1e-2, 0.0, (0.9, 0.999), 1e-8,
                       lambda o: build_scheduler(o, LRSchedule.warmup_cosine(1e-2, 2, max_steps, 0.1)), has_gpu=False)
    return Trainer(eng, s, r, ToyBatches(poison=poison), None, Tracker(False, "", ""), is_main=True)


def _metrics(tmp_path):
    with open(tmp_path / "metrics.jsonl") as fh:
        return [json.loads(x) for x in fh]


@pytest.mark.e2e  # worker processes / subprocesses / DeepSpeed engine / MLflow
def test_nonfinite_loss_is_skipped_counted_and_stops(tmp_path, dist_info):
    from grnformer_ds.training.guards import NonFiniteLossError

    t = _trainer(tmp_path / "a", dist_info, max_steps=4, poison={1, 2})
    t.train()
    m = _metrics(tmp_path / "a")
    # step 1 used batches 0 and 3 (1 and 2 skipped), step 2 batches 4, 5, ...: 8 finite + 2 skipped micro-batches
    assert [x["step"] for x in m] == [1, 2, 3, 4] and m[-1]["skipped_nonfinite"] == 2
    assert t.state.micro_batches == 10 and all(math.isfinite(x["loss"]) for x in m)
    t = _trainer(tmp_path / "b", dist_info, max_steps=4, poison={2, 3, 4}, max_nonfinite=3)
    with pytest.raises(NonFiniteLossError, match="3 non-finite"):
        t.train()


@pytest.mark.e2e  # worker processes / subprocesses / DeepSpeed engine / MLflow
def test_checkpoint_never_holds_nonfinite_weights(tmp_path, dist_info):
    t = _trainer(tmp_path, dist_info, max_steps=1)
    t.train()
    assert ckpt.find_latest(str(tmp_path / "checkpoints")) == "global_step1"
    p = next(t.engine.module.parameters())
    p.ds_tensor.data[0] = float("nan")  # ZeRO-3: this rank's partition
    t.state.step = 2
    assert t.save() is None
    assert ckpt.find_latest(str(tmp_path / "checkpoints")) == "global_step1"
    assert not (tmp_path / "checkpoints" / "global_step2").exists()


@pytest.mark.e2e  # worker processes / subprocesses / DeepSpeed engine / MLflow
def test_resume_reproduces_losses_and_data_order(tmp_path, dist_info):
    full = _trainer(tmp_path / "full", dist_info, max_steps=6)
    full.train()
    part = _trainer(tmp_path / "part", dist_info, max_steps=6, save_every=3)
    part.s.max_steps = 3  # stop after the checkpoint at step 3, as a killed run would have
    part.train()
    # the same ranks and micro-batch with another accumulation: neither exact nor re-planned (data.elastic), refused
    with pytest.raises(UserInputError, match="grad_accum=2 but this run has 3"):
        _trainer(tmp_path / "part", dist_info, max_steps=6, resume=True, accum=3).maybe_resume()
    resumed = _trainer(tmp_path / "part", dist_info, max_steps=6, resume=True)
    resumed.maybe_resume()
    assert resumed.state.step == 3
    resumed.train()
    a, b = _metrics(tmp_path / "full"), _metrics(tmp_path / "part")
    assert [x["step"] for x in b] == list(range(1, 7))
    assert [x["data_digest"] for x in a] == [x["data_digest"] for x in b]
    for x, y in zip(a, b):  # same dropout masks and optimizer state → same losses (bitwise on one CPU rank)
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-6)
        assert y["lr"] == pytest.approx(x["lr"], rel=1e-9)


@pytest.mark.e2e  # worker processes / subprocesses / DeepSpeed engine / MLflow
def test_interrupted_save_never_becomes_latest(tmp_path, dist_info, monkeypatch):
    t = _trainer(tmp_path, dist_info, max_steps=1)
    t.train()
    root = str(tmp_path / "checkpoints")
    assert ckpt.find_latest(root) == "global_step1"

    def crash(*a, **k):  # dies after DeepSpeed wrote its files, before the rank state and COMPLETE
        raise RuntimeError("simulated crash mid-save")

    monkeypatch.setattr(ckpt, "_atomic_torch_save", crash)
    t.state.step = 2
    with pytest.raises(ckpt.CheckpointSaveError, match="mid-save"):
        t.save()
    # the half-written tag is removed (a process killed mid-save leaves it on disk, and find_latest skips it: the
    # kill -9 test of test_train_pretrain.py) ...
    assert not os.path.exists(tmp_path / "checkpoints" / "global_step2")
    assert ckpt.find_latest(root) == "global_step1"  # ... and is not what a resume would use
    assert (tmp_path / "checkpoints" / "latest").read_text() == "global_step1"
    monkeypatch.undo()
    assert t.save() == "global_step2"  # the next save replaces the leftover
    assert ckpt.find_latest(root) == "global_step2" and ckpt.is_complete(root, "global_step2")


@pytest.mark.e2e  # worker processes / subprocesses / DeepSpeed engine / MLflow
def test_sqlite_tracking_keeps_artifacts_beside_the_database(tmp_path, monkeypatch):
    """MLflow's default for a sqlite store is ./mlruns of the current directory; ours is <db dir>/mlartifacts."""
    from grnformer_ds.training.tracking import Tracker, default_tracking_uri

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "run"
    out.mkdir()
    (out / "note.json").write_text("{}")
    tracker = Tracker(True, default_tracking_uri(str(out)), "exp")
    tracker.log_artifact(str(out / "note.json"), "configs")
    tracker.end()
    assert list(out.glob("mlartifacts/*/artifacts/configs/note.json"))
    assert not (cwd / "mlruns").exists()


@pytest.mark.e2e  # worker processes / subprocesses / DeepSpeed engine / MLflow
def test_accumulating_two_micro_batches_equals_one_step_over_both(tmp_path, dist_info):
    """Through the real Trainer and a ZeRO-3 engine: the gradient of one optimizer step over two packed micro-batches
    of unequal size (grad_accum 2) equals that of one micro-batch holding both (grad_accum 1): each micro-batch's
    loss is divided by the masked positions of the whole step (`num_items_in_batch`)."""
    from deepspeed.utils import safe_get_full_grad

    from grnformer_ds.data.packing import pack_padded_batch
    from grnformer_ds.modeling import GRNFormerConfig, GRNFormerForMaskedLM, make_dummy_batch
    from grnformer_ds.training.engine import build_engine
    from grnformer_ds.training.schedule import LRSchedule, build_scheduler
    from grnformer_ds.training.tracking import Tracker
    from grnformer_ds.training.trainer import Trainer

    cfg = GRNFormerConfig.from_preset("debug", vocab_size=67, use_mvc=True)
    padded = make_dummy_batch(cfg, batch_size=6, seq_len=12, lengths=[12, 4, 9, 3, 12, 7], seed=2)

    def part(rows):  # (no graphs: cutting them per cell is not the point here)
        return pack_padded_batch({k: v[rows] for k, v in padded.items() if v.shape[0] == 6})

    a, b, both = part([0, 1]), part([2, 3, 4, 5]), part(list(range(6)))

    def step_gradient(batches, accum, out):
        s = _settings(tmp_path / out, accum=accum, lr=1e-3, max_steps=1, save_every=100, eval_every=1000,
                      progress=False, precision="fp32")
        r = resolve_ds_config(load_ds_config(ZERO3), s, dist_info.world_size)
        torch.manual_seed(0)
        eng = build_engine(GRNFormerForMaskedLM(cfg), r, 1e-3, 0.0, (0.9, 0.999), 1e-8,
                           lambda o: build_scheduler(o, LRSchedule.warmup_cosine(1e-3, 1, 1, 0.1)), has_gpu=False)
        grads, real_step = {}, eng.step

        def step():  # the accumulated gradient, before the optimizer consumes it
            if eng.is_gradient_accumulation_boundary():
                grads.update({n: safe_get_full_grad(p).clone() for n, p in eng.module.named_parameters()})
            real_step()

        eng.step = step
        trainer = Trainer(eng, s, r, ListBatches(batches), None, Tracker(False, "", ""), is_main=True)
        assert trainer.global_normalization
        metrics = trainer.train()
        return grads, metrics["loss"]

    two, loss_two = step_gradient([a, b], 2, "two")
    one, loss_one = step_gradient([both], 1, "one")
    assert loss_two == pytest.approx(loss_one, rel=1e-5)  # the logged loss is the step's, not a mean of means
    assert one.keys() == two.keys() and len(one) > 20
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ trivial baselines
def test_trivial_baselines_are_the_training_means_on_the_masked_targets():
    """Global and per-gene means of the masked targets (labels != -100) by gene token, against numpy; the gene of a
    label is input_ids (padded or packed) or, for scFoundation's all-gene decoder, decoder_input_ids; an unseen gene
    is predicted by the global mean."""
    import numpy as np

    from grnformer_ds.training.baselines import TrivialBaselines, masked_targets

    ids = torch.tensor([[1, 5, 6, 7, 0], [1, 6, 7, 8, 0]])
    labels = torch.tensor([[-100.0, 3.0, 5.0, -100.0, -100.0], [-100.0, 7.0, 2.0, 4.0, -100.0]])
    train = {"input_ids": ids, "labels": labels}
    b = TrivialBaselines(10).fit([train], 1)
    y = np.array([3.0, 5.0, 7.0, 2.0, 4.0])
    assert b.global_mean == pytest.approx(y.mean()) and b.n_targets == 5
    assert b.gene_mean[6].item() == pytest.approx(6.0) and b.gene_mean[5].item() == pytest.approx(3.0)
    assert b.gene_mean[9].item() == pytest.approx(y.mean())  # never seen
    test = {"input_ids": torch.tensor([[1, 6, 9]]), "labels": torch.tensor([[-100.0, 4.0, 1.0]])}
    g, p, k = b.score(test)
    assert k == 2 and g == pytest.approx((4 - y.mean()) ** 2 + (1 - y.mean()) ** 2)
    assert p == pytest.approx((4 - 6.0) ** 2 + (1 - y.mean()) ** 2)
    packed = {"input_ids": ids.reshape(1, -1), "labels": labels.reshape(1, -1)}
    assert [t.tolist() for t in masked_targets(packed)] == [t.tolist() for t in masked_targets(train)]
    scf = {"input_ids": torch.tensor([[5, 6]]), "decoder_values": torch.zeros(1, 3),
           "decoder_input_ids": torch.tensor([4, 5, 6]), "labels": torch.tensor([[2.0, -100.0, 1.0]])}
    assert [t.tolist() for t in masked_targets(scf)] == [[4, 6], [2.0, 1.0]]


def _fail_once(monkeypatch, where: str, step_tag: str):
    """Make the save of `step_tag` fail at one point (disk full), once."""
    import errno

    armed = {"on": True}

    def boom():
        armed["on"] = False
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "deepspeed":  # part-way through DeepSpeed's own files
        def patch_engine(trainer):
            original = trainer.engine.save_checkpoint

            def save(root, tag=None, **kw):
                if tag == step_tag and armed["on"]:
                    os.makedirs(os.path.join(root, tag), exist_ok=True)
                    with open(os.path.join(root, tag, "mp_rank_00_model_states.pt"), "wb") as fh:
                        fh.write(b"half")
                    boom()
                return original(root, tag=tag, **kw)

            monkeypatch.setattr(trainer.engine, "save_checkpoint", save)
        return patch_engine
    if where == "rank-file":
        original = ckpt._atomic_torch_save

        def torch_save(obj, path):
            if step_tag in path and armed["on"]:
                boom()
            return original(obj, path)

        monkeypatch.setattr(ckpt, "_atomic_torch_save", torch_save)
    else:  # "complete" / "latest": the commit's own writes
        name = ckpt.COMPLETE if where == "complete" else ckpt.LATEST
        original = ckpt.atomic_write_text

        def write(path, text):
            if os.path.basename(path) == name and step_tag in (path + text) and armed["on"]:
                boom()
            return original(path, text)

        monkeypatch.setattr(ckpt, "atomic_write_text", write)
    return lambda trainer: None


@pytest.mark.e2e  # worker processes / subprocesses / DeepSpeed engine / MLflow
@pytest.mark.parametrize("where", ["deepspeed", "rank-file", "complete", "latest"])
def test_a_failed_save_leaves_the_previous_checkpoint_latest(tmp_path, dist_info, monkeypatch, where):
    """Disk full at several points of the save of step 4: the half-written tag is gone, step 2 stays latest, one
    line says so; --on-save-error stop ends the run there, continue trains on and saves again at step 6."""
    patch = _fail_once(monkeypatch, where, "global_step4")
    t = _trainer(tmp_path / "stop", dist_info, max_steps=6, save_every=2)
    patch(t)
    with pytest.raises(ckpt.CheckpointSaveError) as ei:
        t.train()
    msg = str(ei.value)
    assert "\n" not in msg and "global_step4 not saved" in msg and "No space left" in msg, msg
    assert "global_step2 stays latest" in msg, msg
    root = str(tmp_path / "stop" / "checkpoints")
    assert ckpt.find_latest(root) == "global_step2" and not os.path.exists(os.path.join(root, "global_step4"))
    with open(os.path.join(root, ckpt.LATEST)) as fh:
        assert fh.read().strip() == "global_step2"

    monkeypatch.undo()
    patch = _fail_once(monkeypatch, where, "global_step4")
    lines = []
    t = _trainer(tmp_path / "go", dist_info, max_steps=6, save_every=2, on_save_error="continue")
    t.say = lines.append
    patch(t)
    t.train()
    root = str(tmp_path / "go" / "checkpoints")
    assert ckpt.complete_tags(root) == ["global_step2", "global_step6"] and t.save_failures == 1
    assert sum("global_step4 not saved" in line for line in lines) == 1 and t.state.step == 6


@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1"])
def test_preemption_handler_takes_the_first_signal_and_notes_the_rest(name):
    """SLURM's SIGTERM and `--signal=USR1@...` alike: the first asks the run to stop, a second one (the launcher
    forwarding it, a second scancel) is noted and changes nothing; uninstall gives back the previous handler."""
    import os
    import signal

    from grnformer_ds.training.preemption import PreemptionHandler

    sig = getattr(signal, name)
    before = signal.getsignal(sig)
    lines: list[str] = []
    handler = PreemptionHandler(say=lines.append).install()
    try:
        assert not handler.should_stop(torch.device("cpu"))
        os.kill(os.getpid(), sig)
        assert handler.requested and handler.signal_name == name
        assert handler.should_stop(torch.device("cpu"))
        os.kill(os.getpid(), sig)
        assert handler.signal_name == name and len(lines) == 2
        assert lines[0].startswith(f"{name} received") and lines[1].startswith(f"{name} again")
    finally:
        handler.uninstall()
    assert signal.getsignal(sig) == before


def test_resume_drops_the_lines_a_killed_run_wrote_after_its_checkpoint(tmp_path):
    """metrics.jsonl and --log-cells records keep the steps up to the checkpoint; a line a kill cut short goes too."""
    import json

    from grnformer_ds.training.trainer import Trainer

    path = tmp_path / "rank_00000.jsonl"
    lines = [json.dumps({"step": s, "cells": [s]}) + "\n" for s in (1, 2, 3, 4)]
    path.write_text("".join(lines) + '{"step": 5, "cel')
    Trainer._truncate_jsonl(str(path), 3)
    assert path.read_text() == "".join(lines[:3])
    Trainer._truncate_jsonl(str(tmp_path / "absent.jsonl"), 3)  # nothing to do


def test_a_checkpoint_that_cannot_be_converted_for_other_ranks_is_one_line(tmp_path):
    """Resuming on another number of ranks converts the tag with DeepSpeed's ds_to_universal: a damaged optimizer file
    stops it with one line naming the checkpoint, and nothing half-converted counts as done."""
    from grnformer_ds.errors import UserInputError
    from grnformer_ds.training import checkpoint as ckpt

    tag = tmp_path / "global_step3"
    tag.mkdir()
    (tag / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserInputError, match="global_step3: cannot resume on another number of ranks") as ei:
        ckpt.universal_checkpoint(str(tmp_path), "global_step3")
    assert "\n" not in str(ei.value)
    assert not ckpt.is_complete(str(tmp_path / ckpt.UNIVERSAL), "global_step3")
