"""Progress bar (tqdm: cells done, cells/s) and the end-of-build summary."""
from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


def progress_bar(total: int, desc: str, enabled: bool = True) -> tqdm:
    return tqdm(total=total, desc=desc, unit=" cells", unit_scale=True, disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, smoothing=0.1)


def summary_lines(manifest: dict, store: str, seconds: float) -> list[str]:
    n_in = sum(i["n_cells"] for i in manifest["inputs"])
    lines = [
        f"store {store}: {manifest['n_cells']:,} cells in {len(manifest['shards'])} shard(s), "
        f"{manifest['n_genes']:,} genes, {manifest['nnz']:,} nonzeros, vocab_size {manifest['vocab_size']:,}",
        f"  read {n_in:,} cells from {len(manifest['inputs'])} input(s); dropped "
        f"{manifest['n_zero_cells_dropped']:,} zero-count cell(s)",
    ]
    for i in manifest["inputs"]:
        lines.append(f"  {i['name']}: {i['n_cells_kept']:,}/{i['n_cells']:,} cells kept, "
                     f"{i['n_genes_mapped']:,}/{i['n_genes']:,} genes mapped, "
                     f"{i['count_fraction_mapped']:.1%} of counts mapped")
    if seconds > 0:
        lines.append(f"  {seconds:.1f} s, {n_in / seconds:,.0f} cells/s")
    return lines


class Timer:
    def __enter__(self) -> "Timer":
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
