#!/usr/bin/env python
"""Import time and peak memory of `launchers/import_checkpoint.py` on the real layouts of scGPT (whole-human) and
scFoundation (models.ckpt), and for scFoundation its own loader and a forward beside ours.

    python launchers/benchmarks/bench_import.py --from scgpt --work /tmp/bench_import --out import_scgpt.json
    python launchers/benchmarks/bench_import.py --from scfoundation --work /tmp/bench_import --out import_scf.json

scgpt: a checkpoint folder in scGPT's published format with the whole-human sizes (the 60,697-token vocabulary:
omicverse's census vocabulary + <pad>, <cls>, <eoc>; 512 hidden, 12 layers, 8 heads, 512 FFN; flash-attn naming).
scfoundation: a models.ckpt in BioMap's layout with the published sizes (19,264 genes + T, S; encoder 768 x 12,
12 heads; Performer decoder 512 x 6, 8 heads, 266 random features; 100 bins) and one variant ("cell"; the real file
holds three, so it reads three times the bytes), imported with the real gene list omicverse ships
(OS_scRNA_gene_index.19264.tsv). Random weights (torch's default init) in both.

Each command runs in a fresh process: wall time and its own peak RSS (`wait4`). For scFoundation the
peer is scFoundation's own loading (what omicverse's `load_model_frommmf` does, without its `.cuda()`: torch.load,
`select_model`, `load_state_dict`) in a fresh process, and `--forward` times one cell (2,000 expressed genes) through
scFoundation's MaeAutobin and through the imported model, same inputs, with the largest difference of their
predictions.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_common, when imported from elsewhere

from bench_common import machine_info, write_report  # noqa: E402

PEER_LOAD = """
import sys, torch
sys.path.insert(0, {tests!r})
from scfoundation_reference import flat_config, scfoundation_modules
ckpt = torch.load({path!r}, map_location="cpu", weights_only=True)["cell"]
model = scfoundation_modules().select_model(flat_config(ckpt["config"]))
model.load_state_dict({{k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}})
"""


def _omicverse_file(*parts) -> str:
    import importlib.util

    spec = importlib.util.find_spec("omicverse")
    if spec is None:
        sys.exit("bench_import: needs omicverse==2.3.2 (pip install --no-deps omicverse==2.3.2)")
    return os.path.join(os.path.dirname(spec.origin), "llm", *parts)


def _timed(cmd: list[str]) -> dict:
    """Wall time and peak RSS of one child process (its own rusage, from wait4)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"bench_import: {cmd[:4]} failed: {proc.stderr.read().decode()[-2000:]}")
    return {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024}  # ru_maxrss in KiB on Linux


def _summary(runs: list[dict]) -> dict:
    return {"runs": runs, "median_wall_s": sorted(r["wall_s"] for r in runs)[len(runs) // 2],
            "peak_rss_mib": max(r["peak_rss_mib"] for r in runs)}


def _scgpt_source(work: str) -> tuple[str, list[str]]:
    from scgpt_reference import make_scgpt, write_scgpt_folder

    genes = json.load(open(_omicverse_file("scgpt", "tokenizer", "default_census_vocab.json")))
    vocab = {g: i for i, g in enumerate(sorted(genes, key=genes.get))}
    vocab.update({"<pad>": len(vocab), "<cls>": len(vocab) + 1, "<eoc>": len(vocab) + 2})
    src = os.path.join(work, "scGPT_human")
    if not os.path.isfile(os.path.join(src, "best_model.pt")):
        write_scgpt_folder(make_scgpt(vocab, d_model=512, nhead=8, d_hid=512, nlayers=12, randomize=False), vocab,
                           src, naming="flash")
    return src, []


def _scfoundation_config() -> dict:
    from scfoundation_reference import scfoundation_config

    config = scfoundation_config(19264, "performer", hidden=768, depth=12, heads=12, dec_hidden=512, dec_depth=6,
                                 dec_heads=8)
    config["model_config"]["mae_autobin"]["bin_num"] = config["dataset_config"]["rnaseq"]["bin_num"] = 100
    return config


def _scfoundation_source(work: str) -> tuple[str, list[str]]:
    from scfoundation_reference import make_maeautobin, write_models_ckpt

    src = os.path.join(work, "models.ckpt")
    if not os.path.isfile(src):
        os.makedirs(work, exist_ok=True)
        config = _scfoundation_config()
        write_models_ckpt(src, {"cell": (make_maeautobin(config, randomize=False), config)})
    return src, ["--gene-list", _omicverse_file("scfoundation", "OS_scRNA_gene_index.19264.tsv")]


def _forward(src: str, hf: str) -> dict:
    """One cell through scFoundation's MaeAutobin and through the import (1 thread each, fp32, eval)."""
    import torch
    from scfoundation_reference import make_maeautobin, reference_cell

    from grnformer_ds.modeling import GRNFormerForMaskedLM

    ref = make_maeautobin(_scfoundation_config(), randomize=False)
    ckpt = torch.load(src, map_location="cpu", weights_only=True)["cell"]
    ref.load_state_dict({k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()})
    ours = GRNFormerForMaskedLM.from_pretrained(hf).eval()
    gen = torch.Generator().manual_seed(0)
    n_genes = 19264
    values = torch.zeros(n_genes)
    expressed = torch.randperm(n_genes, generator=gen)[:2000]
    values[expressed] = torch.rand(2000, generator=gen) * 4 + 0.1
    masked = torch.zeros(n_genes, dtype=torch.bool)
    masked[expressed[:300]] = True
    total = torch.tensor([4.0, 3.6])
    t0 = time.perf_counter()
    expected, _ = reference_cell(ref, values, masked, total)
    t_ref = time.perf_counter() - t0
    enc = (values > 0) & ~masked
    cols = enc.nonzero().flatten()
    cfg = ours.config
    batch = dict(input_ids=cols[None], values=values[cols][None],
                 attention_mask=torch.ones(1, len(cols), dtype=torch.bool), total_counts=total[None],
                 decoder_values=torch.where(masked, cfg.mask_value, values)[None],
                 decoder_input_ids=torch.arange(n_genes))
    t0 = time.perf_counter()
    with torch.no_grad():
        got = ours(**batch).predictions[0]
    t_ours = time.perf_counter() - t0
    return {"reference_s": t_ref, "ours_s": t_ours, "max_abs_diff": float((got - expected).abs().max()),
            "encoder_tokens": int(len(cols)) + 2, "decoder_tokens": n_genes + 2}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--from", dest="backbone", choices=("scgpt", "scfoundation"), default="scgpt")
    p.add_argument("--work", default="/tmp/bench_import")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--forward", action="store_true", help="scfoundation: also time one cell's forward")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    work = os.path.join(args.work, args.backbone)
    src, extra = (_scgpt_source if args.backbone == "scgpt" else _scfoundation_source)(work)
    hf = os.path.join(work, "hf")
    cmd = [sys.executable, os.path.join(REPO, "launchers", "import_checkpoint.py"), "--from", args.backbone, src,
           "--out", hf, *extra]
    ours = _summary([_timed(cmd) for _ in range(args.repeats)])
    size = lambda d: sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)) / 2**20  # noqa: E731
    # the commands run in child processes: their threads are OMP_NUM_THREADS's
    input_mib = size(src) if os.path.isdir(src) else os.path.getsize(src) / 2**20
    report = machine_info(threads=os.environ.get("OMP_NUM_THREADS"),
                          **{"from": args.backbone, "input_mib": input_mib, "output_mib": size(hf), "import": ours})
    if args.backbone == "scfoundation":
        peer = [sys.executable, "-c", PEER_LOAD.format(tests=os.path.join(REPO, "tests"), path=src)]
        report["peer_scfoundation_load"] = _summary([_timed(peer) for _ in range(args.repeats)])
        if args.forward:
            report["forward_one_cell"] = _forward(src, hf)
    write_report(report, args.out, show=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
