#!/usr/bin/env python
"""Import time and peak memory of `launchers/import_checkpoint.py` on scGPT's whole-human layout.

    python launchers/benchmarks/bench_import.py --work /tmp/bench_import --out import_bench.json

Writes a checkpoint folder in scGPT's published format with the whole-human sizes (the 60,697-token vocabulary:
omicverse's census vocabulary + <pad>, <cls>, <eoc>; 512 hidden, 12 layers, 8 heads, 512 FFN; flash-attn naming;
random weights), then runs the import command in a fresh process: wall time and the process's peak RSS
(`getrusage` of the child), and the sizes of the input and output.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/bench_import")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import importlib.util

    from scgpt_reference import make_scgpt, write_scgpt_folder

    spec = importlib.util.find_spec("omicverse")
    path = os.path.join(os.path.dirname(spec.origin), "llm", "scgpt", "tokenizer", "default_census_vocab.json")
    genes = json.load(open(path))
    vocab = {g: i for i, g in enumerate(sorted(genes, key=genes.get))}
    vocab.update({"<pad>": len(vocab), "<cls>": len(vocab) + 1, "<eoc>": len(vocab) + 2})
    src = os.path.join(args.work, "scGPT_human")
    if not os.path.isfile(os.path.join(src, "best_model.pt")):
        write_scgpt_folder(make_scgpt(vocab, d_model=512, nhead=8, d_hid=512, nlayers=12, randomize=False), vocab,
                           src, naming="flash")
    runs = []
    for _ in range(args.repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        t0 = time.perf_counter()
        subprocess.run([sys.executable, os.path.join(REPO, "launchers", "import_checkpoint.py"), "--from", "scgpt",
                        src, "--out", os.path.join(args.work, "hf")], check=True, capture_output=True)
        wall = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB, max over children so far
        runs.append({"wall_s": wall, "peak_rss_mib": peak / 1024, "peak_grew": peak > before})
    size = lambda d: sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)) / 2**20  # noqa: E731
    report = {"date": time.strftime("%Y-%m-%d"), "machine": platform.platform(), "cpu_count": os.cpu_count(),
              "vocab": len(vocab), "input_mib": size(src), "output_mib": size(os.path.join(args.work, "hf")),
              "runs": runs, "median_wall_s": sorted(r["wall_s"] for r in runs)[len(runs) // 2],
              "peak_rss_mib": max(r["peak_rss_mib"] for r in runs)}
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
