"""Importing scFoundation's models.ckpt: the imported model equals scFoundation's own MaeAutobin (the code the omicverse
2.3.2 wheel ships) on the same inputs — masked-value predictions over every gene and get_embedding's cell embedding
within 1e-4, fp32, eval — with its Performer decoder (FAVOR+ with the checkpoint's projection matrices) and with a
transformer decoder, on the padded and the packed layout; the Performer itself converges to exact softmax attention;
variants and bad files."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from scfoundation_reference import (  # tests/ is on sys.path
    make_maeautobin,
    reference_cell,
    scfoundation_config,
    write_gene_list,
    write_models_ckpt,
)

from grnformer_ds.data.packing import pack_padded_batch
from grnformer_ds.errors import UserInputError
from grnformer_ds.modeling import GRNFormerForMaskedLM
from grnformer_ds.modeling.performer import PerformerAttention, exact_softmax_attention
from grnformer_ds.training.importing import build_imported_model, import_checkpoint

torch.set_num_threads(1)
N_GENES = 30
GENES = [f"GENE{i}" for i in range(N_GENES)]


def _checkpoint(tmp_path, decoder="performer", variants=("cell",), gene_file=True) -> str:
    config = scfoundation_config(N_GENES, decoder)
    models = {v: (make_maeautobin(config, seed=i), config) for i, v in enumerate(variants)}
    path = write_models_ckpt(tmp_path / "models.ckpt", models)
    if gene_file:
        write_gene_list(tmp_path / "OS_scRNA_gene_index.19264.tsv", GENES)
    return path


def _cells(n_cells=4, seed=3):
    """values (B, G) with zeros, masked (B, G) (nonzero and zero genes, as scFoundation masks both), (T, S) (B, 2)."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.rand(n_cells, N_GENES, generator=gen) * 4
    values[torch.rand(n_cells, N_GENES, generator=gen) < 0.45] = 0.0
    masked = torch.rand(n_cells, N_GENES, generator=gen) < 0.25
    masked[:, 0] = True
    total = torch.rand(n_cells, 2, generator=gen) + 3
    return values, masked, total


def _our_batch(values, masked, total, config) -> dict:
    """The scfoundation collator's batch for those cells: encoder slots = nonzero unmasked genes (ids = columns)."""
    enc = (values > 0) & ~masked
    n_cells, length = values.shape[0], int(enc.sum(1).max())
    ids = torch.full((n_cells, length), config.pad_token_id, dtype=torch.long)
    vals = torch.full((n_cells, length), config.pad_value)
    mask = torch.zeros(n_cells, length, dtype=torch.bool)
    for b in range(n_cells):
        cols = enc[b].nonzero().flatten()
        ids[b, :len(cols)], vals[b, :len(cols)], mask[b, :len(cols)] = cols, values[b, cols], True
    return dict(input_ids=ids, values=vals, attention_mask=mask, total_counts=total,
                decoder_values=torch.where(masked, torch.full_like(values, config.mask_value), values),
                decoder_input_ids=torch.arange(N_GENES),
                labels=torch.where(masked, values, torch.full_like(values, -100.0)))


@pytest.mark.parametrize("decoder", ["performer", "transformer"])
def test_imported_scfoundation_equals_maeautobin(tmp_path, decoder):
    path = _checkpoint(tmp_path, decoder)
    lines = []
    out = import_checkpoint("scfoundation", path, str(tmp_path / "hf"), say=lines.append)
    assert not any(ln.startswith("not used:") for ln in lines), lines
    vocab = json.load(open(os.path.join(out, "vocab.json")))
    assert vocab == {**{g: i for i, g in enumerate(GENES)}, "<pad>": N_GENES, "<cls>": N_GENES + 1}
    model = GRNFormerForMaskedLM.from_pretrained(out).eval()
    cfg = model.config
    assert cfg.decoder_attention == ("performer" if decoder == "performer" else "exact")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.decoder_hidden_size, cfg.decoder_num_attention_heads,
            cfg.use_graph) == (32, 2, 24, 3, False)
    ref = make_maeautobin(scfoundation_config(N_GENES, decoder), seed=0)
    values, masked, total = _cells()
    expected = [reference_cell(ref, values[b], masked[b], total[b]) for b in range(values.shape[0])]
    exp_pred = torch.stack([e[0] for e in expected])
    exp_cell = torch.stack([e[1] for e in expected])
    padded = _our_batch(values, masked, total, cfg)
    packed = pack_padded_batch(padded, lead=2, pad_id=cfg.pad_token_id, pad_value=cfg.pad_value)
    for batch in (padded, packed):
        with torch.no_grad():
            got = model(**batch)
        # every gene's prediction (the masked ones are the loss's), computed cell by cell in the reference
        torch.testing.assert_close(got.predictions, exp_pred, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got.cell_embedding, exp_cell, atol=1e-4, rtol=1e-4)
        assert torch.isfinite(got.loss)


def test_variants_and_their_errors(tmp_path):
    path = _checkpoint(tmp_path, variants=("gene", "cell"))
    cell, ckpt = build_imported_model("scfoundation", path)
    assert ckpt.source.endswith("[cell]")
    gene, _ = build_imported_model("scfoundation", path, variant="gene")
    ref_gene = make_maeautobin(scfoundation_config(N_GENES), seed=0)  # "gene" was written first (seed 0)
    torch.testing.assert_close(gene.decoder.to_final.weight, ref_gene.to_final.weight)
    assert not torch.equal(cell.decoder.to_final.weight, gene.decoder.to_final.weight)
    with pytest.raises(UserInputError, match=r"has no 'rde' model \(--variant one of \['cell', 'gene'\]\)"):
        build_imported_model("scfoundation", path, variant="rde")


def _damaged(tmp_path, name, damage) -> str:
    d = tmp_path / name
    d.mkdir()
    path = _checkpoint(d)
    damage(d, path)
    return path


def _edit_ckpt(fn):
    def damage(d, path):
        ckpt = torch.load(path, weights_only=True)
        fn(ckpt["cell"])
        torch.save(ckpt, path)
    return damage


def test_bad_checkpoints_fail_in_one_line(tmp_path):
    cases = {
        "missing": (lambda d, p: os.remove(p), "models.ckpt: missing"),
        "garbage": (lambda d, p: open(p, "wb").write(b"not a checkpoint"), "cannot be read as a torch checkpoint"),
        "no_genes": (lambda d, p: os.remove(d / "OS_scRNA_gene_index.19264.tsv"), "--gene-list"),
        "gene_count": (lambda d, p: write_gene_list(d / "OS_scRNA_gene_index.19264.tsv", GENES[:-1]),
                       "lists 29 genes but"),
        "layout": (_edit_ckpt(lambda e: e["state_dict"].pop("model.token_emb.emb.weight")),
                   "not an scFoundation MaeAutobin state dict (no token_emb.emb.weight)"),
        "depth": (_edit_ckpt(lambda e: e["config"]["model_config"]["mae_autobin"]["encoder"].update(depth=3)),
                  "encoder.depth=3 but the weights have 2 encoder layers"),
        "shape": (_edit_ckpt(lambda e: e["state_dict"].update({"model.to_final.weight": torch.zeros(1, 7)})),
                  "decoder.to_final.weight has shape (1, 7) but the config gives (1, 24)"),
        "no_config": (_edit_ckpt(lambda e: e.pop("config")), "expected config and state_dict entries"),
    }
    for name, (damage, needle) in cases.items():
        path = _damaged(tmp_path, name, damage)
        with pytest.raises(UserInputError) as exc:
            build_imported_model("scfoundation", path)
        assert needle in str(exc.value) and "\n" not in str(exc.value), (name, str(exc.value))


def test_import_command_line_with_a_gene_list_elsewhere(tmp_path):
    path = _checkpoint(tmp_path, gene_file=False)
    genes = write_gene_list(tmp_path / "genes.tsv", GENES)
    cmd = [sys.executable, os.path.join(os.path.dirname(__file__), "..", "launchers", "import_checkpoint.py"),
           "--from", "scfoundation", path, "--out", str(tmp_path / "hf")]
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--gene-list" in bad.stderr, \
        bad.stderr
    p = subprocess.run(cmd + ["--gene-list", genes, "--variant", "cell"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and "--init-from" in p.stdout, p.stderr[-2000:]
    shutil.rmtree(tmp_path / "hf")


# ------------------------------------------------------------------------------------------- the Performer itself
def _attention_inputs(n=48, heads=2, head_dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(1, heads, n, head_dim, generator=gen) * 0.5 for _ in range(3))


@pytest.mark.parametrize("seed", [0, 1])
def test_favor_converges_to_exact_softmax_attention(seed):
    """FAVOR+ is an unbiased estimator of softmax attention: its error against the exact attention falls as the number
    of random features grows (and is small at 16k features)."""
    from grnformer_ds.modeling.performer import favor_features, gaussian_orthogonal_random_matrix, linear_attention

    q, k, v = _attention_inputs(seed=seed)
    exact = exact_softmax_attention(q, k, v)
    errors = []
    for m in (16, 256, 16384):
        w = gaussian_orthogonal_random_matrix(m, 8, torch.Generator().manual_seed(seed))
        approx = linear_attention(favor_features(q, w, True), favor_features(k, w, False), v)
        errors.append(float((approx - exact).abs().mean() / exact.abs().mean()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.03, errors


def test_performer_ignores_padded_keys_and_other_cells():
    """A padded key changes nothing (zero features, not in the stabiliser) and each cell's output is its own (the key
    stabiliser is per cell, not scFoundation's per batch)."""
    torch.manual_seed(0)
    attn = PerformerAttention(16, 2, num_features=32).eval()
    attn.projection_matrix.copy_(attn.draw_projection(torch.Generator().manual_seed(0)))
    x = torch.randn(2, 10, 16)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 7:] = False
    with torch.no_grad():
        both = attn(x * 3, mask)[0]  # x 3: a large spread of key logits between the cells
        first = attn(x[:1] * 3)[0]
        second = attn(x[1:, :7] * 3)[0]
    torch.testing.assert_close(both[0], first[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[1, :7], second[0], atol=1e-5, rtol=1e-5)


def test_a_new_performer_decoder_draws_its_projections_and_saves_them(tmp_path):
    """decoder_attention="performer" on a new model: each layer draws its own projection at init (rows marginally
    N(0, I): mean squared entry ~1), the buffer is saved and reloaded, and packed batches give the padded outputs."""
    from grnformer_ds.modeling import GRNFormerConfig, make_dummy_batch

    cfg = GRNFormerConfig.from_preset("debug", backbone="scfoundation", vocab_size=70, use_graph=False,
                                      decoder_attention="performer", decoder_num_hidden_layers=2)
    torch.manual_seed(0)
    model = GRNFormerForMaskedLM(cfg).eval()
    w = [layer.self_attn.projection_matrix for layer in model.decoder.layers]
    assert w[0].shape == (16, 8) and not torch.equal(w[0], w[1])  # int(d ln d) features, d = 16 / 2 heads
    assert 0.5 < float(torch.cat(w).square().mean()) < 1.5
    model.save_pretrained(tmp_path / "m")
    again = GRNFormerForMaskedLM.from_pretrained(tmp_path / "m").eval()
    padded = make_dummy_batch(cfg, batch_size=3, seq_len=10, lengths=[10, 4, 7], seed=1)
    packed = pack_padded_batch(padded, lead=2, pad_id=cfg.pad_token_id, pad_value=cfg.pad_value)
    with torch.no_grad():
        ref = model(**padded)
        for got in (again(**padded), model(**packed)):
            torch.testing.assert_close(got.predictions, ref.predictions, atol=2e-5, rtol=2e-5)
            torch.testing.assert_close(got.loss, ref.loss, atol=2e-5, rtol=2e-5)
