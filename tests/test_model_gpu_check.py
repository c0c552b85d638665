"""The GPU attention check script runs end to end on CPU (--small), including its flash-attn code path with
flash-attn's varlen kernel replaced by a per-sequence reference, and fails when flash is required but missing."""
import importlib.util
import json
from pathlib import Path

from flash_reference import reference_varlen  # tests/ is on sys.path (pytest rootdir import)

from grnformer_ds.modeling import attention as attention_mod
from grnformer_ds.modeling import modeling_grnformer

SCRIPT = Path(__file__).resolve().parents[1] / "launchers" / "benchmarks" / "gpu_attention_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_attention_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_script_cpu_smoke_with_reference_flash(tmp_path, monkeypatch):
    script = _load()
    monkeypatch.setattr(script, "flash_status", lambda device: (True, "reference kernel"))
    monkeypatch.setattr(attention_mod, "_flash_varlen_func", lambda: reference_varlen)
    monkeypatch.setattr(modeling_grnformer, "resolve_attn_implementation", lambda impl: impl or "sdpa")
    out = tmp_path / "check.json"
    rc = script.main(["--device", "cpu", "--small", "--backbones", "scgpt", "--json", str(out)])
    report = json.loads(out.read_text())
    assert rc == 0, report["failures"]
    assert set(report["kernel"]["impls"]) == {"flash_attention_2", "sdpa", "eager"}
    assert report["kernel"]["impls"]["flash_attention_2"]["out_max_abs_err_vs_fp32"] < 1e-5
    model = report["model"]["scgpt"]["impls"]
    assert model["sdpa"]["loss_rel_diff_vs_first"] < 1e-5 and model["eager"]["pred_max_abs_diff_vs_first"] < 1e-4


def test_gpu_check_script_requires_flash(tmp_path):
    script = _load()
    rc = script.main(["--device", "cpu", "--small", "--backbones", "scfoundation", "--impls", "flash_attention_2,sdpa",
                      "--require-flash", "--json", str(tmp_path / "c.json")])
    report = json.loads((tmp_path / "c.json").read_text())
    assert rc == 1 and any("flash_attention_2 unavailable" in f for f in report["failures"])
    assert set(report["model"]["scfoundation"]["impls"]) == {"sdpa"}
