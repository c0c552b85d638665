"""save_pretrained -> from_pretrained through the registered Auto classes and through trust_remote_code (auto_map),
offline, in a fresh process where grnformer_ds cannot be imported: identical weights and outputs."""
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from grnformer_ds.modeling import GRNFormerConfig, GRNFormerForMaskedLM, GRNFormerModel, make_dummy_batch

torch.set_num_threads(1)

REMOTE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    try:
        import grnformer_ds  # must be impossible here
        raise SystemExit("grnformer_ds was importable")
    except ImportError:
        pass
    from transformers import AutoConfig, AutoModelForMaskedLM
    from safetensors.torch import load_file
    export, data = sys.argv[1], sys.argv[2]
    config = AutoConfig.from_pretrained(export, trust_remote_code=True)
    model = AutoModelForMaskedLM.from_pretrained(export, trust_remote_code=True).eval()
    saved = load_file(export + "/model.safetensors")
    state = model.state_dict()
    weights_equal = set(saved) == set(state) and all(torch.equal(saved[k], state[k]) for k in saved)
    blob = torch.load(data)
    with torch.no_grad():
        out = model(**blob["batch"])
    print(json.dumps({
        "config_class": type(config).__module__ + "." + type(config).__name__,
        "model_class": type(model).__module__ + "." + type(model).__name__,
        "attn": model.config._attn_implementation,
        "weights_equal": weights_equal,
        "loss_equal": bool(torch.equal(out.loss, blob["loss"])),
        "predictions_equal": bool(torch.equal(out.predictions, blob["predictions"])),
        "cell_embedding_equal": bool(torch.equal(out.cell_embedding, blob["cell_embedding"])),
    }))
    """
)


def _export(tmp_path, backbone):
    cfg = GRNFormerConfig.from_preset("debug", vocab_size=67, backbone=backbone, gnn_type="gat",
                                      gnn_share_weights=False, fusion_beta_init=0.5)
    torch.manual_seed(0)
    model = GRNFormerForMaskedLM(cfg).eval()
    with torch.no_grad():
        model.grnformer.fusion.beta.fill_(0.7)  # a trained-looking value, not the init
    batch = make_dummy_batch(cfg, seed=3)
    with torch.no_grad():
        out = model(**batch)
    export = tmp_path / "export"
    model.save_pretrained(export)
    return model, batch, out, export


@pytest.mark.parametrize("backbone", ["scgpt", "scfoundation", "scpalm"])
def test_registered_auto_classes_roundtrip(tmp_path, backbone):
    model, batch, out, export = _export(tmp_path, backbone)
    conf = json.loads((export / "config.json").read_text())
    assert conf["model_type"] == "grnformer"
    assert conf["auto_map"] == {
        "AutoConfig": "configuration_grnformer.GRNFormerConfig",
        "AutoModel": "modeling_grnformer.GRNFormerModel",
        "AutoModelForMaskedLM": "modeling_grnformer.GRNFormerForMaskedLM",
        # a pretrained folder also loads as the fine-tuning classifier (`from_pretrained(..., num_labels=K)`)
        "AutoModelForSequenceClassification": "modeling_grnformer.GRNFormerForCellClassification",
    }
    copied = sorted(p.name for p in export.glob("*.py"))
    for needed in ("configuration_grnformer.py", "modeling_grnformer.py", "attention.py", "gnn.py", "fusion.py",
                   "presets.py", "layers.py", "embeddings.py", "heads.py", "backbones.py", "backbone_base.py",
                   "backbone_scgpt.py", "backbone_scfoundation.py", "backbone_scpalm.py", "layout.py", "losses.py"):
        assert needed in copied, copied
    for path in export.glob("*.py"):
        assert not re.search(r"^\s*(from|import)\s+grnformer_ds", path.read_text(), re.M), path.name

    assert isinstance(AutoConfig.from_pretrained(export), GRNFormerConfig)
    loaded = AutoModelForMaskedLM.from_pretrained(export).eval()
    assert type(loaded) is GRNFormerForMaskedLM and loaded.config._attn_implementation == "sdpa"
    ref_state, new_state = model.state_dict(), loaded.state_dict()
    assert set(ref_state) == set(new_state)
    assert all(torch.equal(ref_state[k], new_state[k]) for k in ref_state)
    with torch.no_grad():
        again = loaded(**batch)
    assert torch.equal(again.predictions, out.predictions) and torch.equal(again.loss, out.loss)

    base = AutoModel.from_pretrained(export).eval()  # the MLM checkpoint loads into the base model by prefix
    assert type(base) is GRNFormerModel
    enc_batch = {k: v for k, v in batch.items() if k not in ("labels", "decoder_values", "decoder_input_ids")}
    with torch.no_grad():
        assert torch.equal(base(**enc_batch).cell_embedding, out.cell_embedding)

    eager = AutoModelForMaskedLM.from_pretrained(export, attn_implementation="eager").eval()
    assert {m.attn_implementation for m in eager.modules() if hasattr(m, "attn_implementation")} == {"eager"}


@pytest.mark.parametrize("backbone", ["scgpt", "scfoundation", "scpalm"])
@pytest.mark.e2e  # worker processes / subprocesses / DeepSpeed engine / MLflow
def test_trust_remote_code_in_fresh_process_without_grnformer_ds(tmp_path, backbone):
    model, batch, out, export = _export(tmp_path, backbone)
    torch.save({"batch": batch, "loss": out.loss, "predictions": out.predictions,
                "cell_embedding": out.cell_embedding}, tmp_path / "data.pt")
    fake = tmp_path / "fake" / "grnformer_ds"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('grnformer_ds is deliberately unavailable here')\n")
    script = tmp_path / "load_remote.py"
    script.write_text(REMOTE_SCRIPT)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"),
               PYTHONPATH=str(tmp_path / "fake"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script), str(export), str(tmp_path / "data.pt")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["model_class"].startswith("transformers_modules.") and \
        result["model_class"].endswith("modeling_grnformer.GRNFormerForMaskedLM"), result
    assert result["config_class"].endswith("configuration_grnformer.GRNFormerConfig"), result
    assert result["attn"] == "sdpa"
    assert result["weights_equal"] and result["loss_equal"] and result["predictions_equal"], result
    assert result["cell_embedding_equal"], result
    assert any((tmp_path / "modules").rglob("modeling_grnformer.py"))  # the modules cache was the tmp dir
