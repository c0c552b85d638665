"""Importing scGPT checkpoints: the imported model equals scGPT 0.2.4's own TransformerModel on the same inputs
(masked-value predictions, cell embeddings, GEPC/MVC predictions within 1e-4, fp32, eval), for both attention namings
(flash-attn's Wqkv, torch's in_proj) and both value-embedding styles; the whole-human layout (60,697 genes,
512 x 12, 8 heads) imports and runs; bad folders fail in one line; starting from an import with GRN parts added at
beta = 0 gives the imported model's outputs exactly."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from scgpt_reference import make_scgpt, scgpt_batch, write_scgpt_folder  # tests/ is on sys.path

from grnformer_ds.errors import UserInputError
from grnformer_ds.modeling import GRNFormerForMaskedLM
from grnformer_ds.training.importing import build_imported_model, import_checkpoint

torch.set_num_threads(1)
VOCAB = {"<pad>": 0, "<cls>": 1, "<eoc>": 2, **{f"G{i}": i + 3 for i in range(40)}}


def _reference(model, ids, values, mask):
    with torch.no_grad():
        return model(ids, values, src_key_padding_mask=~mask, MVC=True)


@pytest.mark.parametrize("naming", ["flash", "torch"])
@pytest.mark.parametrize("style", ["continuous", "category"])
def test_imported_scgpt_equals_scgpt_transformer_model(tmp_path, naming, style):
    ref = make_scgpt(VOCAB, style=style)
    folder = write_scgpt_folder(ref, VOCAB, tmp_path / "scgpt", naming=naming, style=style)
    lines = []
    out = import_checkpoint("scgpt", folder, str(tmp_path / "hf"), say=lines.append)
    assert any(ln.startswith("not used:") and "cls_decoder.*" in ln for ln in lines), lines
    assert json.load(open(os.path.join(out, "vocab.json"))) == VOCAB
    model = GRNFormerForMaskedLM.from_pretrained(out).eval()
    assert (model.config.num_hidden_layers, model.config.use_graph, model.config.use_mvc) == (3, False, True)
    ids, values, mask = scgpt_batch(VOCAB, [12, 7, 9, 3], style=style)
    expected = _reference(ref, ids, values, mask)
    with torch.no_grad():
        got = model(input_ids=ids, values=values, attention_mask=mask)
    torch.testing.assert_close(got.predictions[mask], expected["mlm_output"][mask], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.cell_embedding, expected["cell_emb"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.mvc_predictions[mask], expected["mvc_output"][mask], atol=1e-4, rtol=1e-4)


def test_whole_human_scgpt_layout_imports_and_runs(tmp_path):
    """scGPT's whole-human layout: the 60,697-token vocabulary (the census vocabulary omicverse ships + <pad>,
    <cls>, <eoc>), 512 hidden, 12 layers, 8 heads, 512 FFN, flash-attn naming; random weights."""
    import importlib.util

    spec = importlib.util.find_spec("omicverse")
    if spec is None:
        pytest.skip("omicverse==2.3.2 not installed (pip install --no-deps omicverse==2.3.2)")
    path = os.path.join(os.path.dirname(spec.origin), "llm", "scgpt", "tokenizer", "default_census_vocab.json")
    genes = json.load(open(path))
    vocab = {g: i for i, g in enumerate(sorted(genes, key=genes.get))}
    vocab.update({"<pad>": len(vocab), "<cls>": len(vocab) + 1, "<eoc>": len(vocab) + 2})
    assert len(vocab) == 60697
    ref = make_scgpt(vocab, d_model=512, nhead=8, d_hid=512, nlayers=12, randomize=False)
    folder = write_scgpt_folder(ref, vocab, tmp_path / "scGPT_human", naming="flash")
    model, ckpt = build_imported_model("scgpt", folder)
    assert (model.config.vocab_size, model.config.hidden_size, model.config.num_hidden_layers,
            model.config.num_attention_heads) == (60697, 512, 12, 8)
    assert model.config.pad_token_id == 60694 and model.config.cls_token_id == 60695
    ids, values, mask = scgpt_batch(vocab, [40, 25])
    expected = _reference(ref, ids, values, mask)
    with torch.no_grad():
        got = model(input_ids=ids, values=values, attention_mask=mask)
    torch.testing.assert_close(got.predictions[mask], expected["mlm_output"][mask], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.cell_embedding, expected["cell_emb"], atol=1e-4, rtol=1e-4)


def test_bad_scgpt_folders_fail_in_one_line(tmp_path):
    ref = make_scgpt(VOCAB, randomize=False)
    folder = write_scgpt_folder(ref, VOCAB, tmp_path / "ok")
    cases = {
        "missing": (lambda d: os.remove(os.path.join(d, "args.json")), "args.json: missing"),
        "bad_json": (lambda d: open(os.path.join(d, "vocab.json"), "w").write("{"), "vocab.json: not valid JSON"),
        "not_scgpt": (lambda d: torch.save({"x": torch.zeros(1)}, os.path.join(d, "best_model.pt")),
                      "not an scGPT TransformerModel state dict"),
        "shape": (lambda d: json.dump({**json.load(open(os.path.join(d, "args.json"))), "d_hid": 64},
                                      open(os.path.join(d, "args2.json"), "w"))
                  or os.replace(os.path.join(d, "args2.json"), os.path.join(d, "args.json")),
                  "has shape (48, 32) but the config gives (64, 32)"),
        "layers": (lambda d: json.dump({**json.load(open(os.path.join(d, "args.json"))), "nlayers": 4},
                                       open(os.path.join(d, "args2.json"), "w"))
                   or os.replace(os.path.join(d, "args2.json"), os.path.join(d, "args.json")),
                   "nlayers=4 but"),
    }
    import shutil

    for name, (damage, needle) in cases.items():
        d = str(tmp_path / name)
        shutil.copytree(folder, d)
        damage(d)
        with pytest.raises(UserInputError) as exc:
            build_imported_model("scgpt", d)
        assert needle in str(exc.value) and "\n" not in str(exc.value), (name, str(exc.value))
    with pytest.raises(UserInputError, match="not a directory"):
        build_imported_model("scgpt", str(tmp_path / "nowhere"))


def test_import_checkpoint_command_line(tmp_path):
    import subprocess

    ref = make_scgpt(VOCAB, randomize=False)
    folder = write_scgpt_folder(ref, VOCAB, tmp_path / "scgpt", naming="flash")
    cmd = [sys.executable, os.path.join(os.path.dirname(__file__), "..", "launchers", "import_checkpoint.py")]
    p = subprocess.run(cmd + ["--from", "scgpt", folder, "--out", str(tmp_path / "hf")], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0 and "--init-from" in p.stdout, p.stderr[-2000:]
    bad = subprocess.run(cmd + ["--from", "scgpt", str(tmp_path / "missing"), "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
