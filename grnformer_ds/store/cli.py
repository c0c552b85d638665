"""Command line of data_prep/build_store.py (argument parsing only; the work is in builder.py)."""
from __future__ import annotations

import argparse
import gc
import sys
import time

from ..errors import UserInputError, cli_main
from .builder import STAGES, run_stage
from .options import DEFAULT_BLOCK_CELLS, DEFAULT_BLOCK_NNZ, DEFAULT_SHARD_SIZE, BuildOptions
from .progress import summary_lines

EPILOG = """examples:
  build_store.py --demo --out demo_store
  build_store.py --out store a.h5ad b.h5ad --cell-type-key cell_type --workers 8
  build_store.py --out store --gene-vocab scgpt_vocab.json --gene-id-column gene_ids data/*.h5ad
job array (see docs/data_prep.md): --stage plan; --stage scatter / gather --num-shards K
  --shard-index $SLURM_ARRAY_TASK_ID; --finalize
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="build_store.py", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert .h5ad file(s) into one globally shuffled, sharded AnnData-zarr store for streaming.")
    p.add_argument("inputs", nargs="*", help="input .h5ad files")
    p.add_argument("--out", required=True, help="store directory to create")
    p.add_argument("--demo", action="store_true",
                   help="build the pbmc68k_reduced demo store (ships with scanpy; no inputs needed)")
    src = p.add_argument_group("counts and genes")
    src.add_argument("--layer", help="read counts from this layer instead of X (e.g. counts)")
    src.add_argument("--use-raw", action="store_true", help="read counts from raw.X (genes from raw.var)")
    src.add_argument("--allow-non-integer", action="store_true",
                     help="accept non-integer values (normalized data); default: refuse them")
    src.add_argument("--gene-vocab", help="fixed vocabulary JSON {gene: id} (e.g. a backbone's vocab.json); "
                                          "default: union of the inputs' genes")
    src.add_argument("--gene-id-column", help="var column with gene ids (e.g. gene_ids) to match genes by id "
                                              "instead of by symbol")
    src.add_argument("--min-mapped-fraction", type=float, default=0.5,
                     help="fail when an input has less than this fraction of its counts in vocabulary genes "
                          "(default 0.5)")
    src.add_argument("--cell-type-key", help="obs column with cell types (kept as a categorical)")
    lay = p.add_argument_group("layout")
    lay.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                     help=f"cells per output shard (default {DEFAULT_SHARD_SIZE})")
    lay.add_argument("--block-cells", type=int, default=DEFAULT_BLOCK_CELLS,
                     help=f"read inputs in blocks of at most this many cells (default {DEFAULT_BLOCK_CELLS})")
    lay.add_argument("--block-nnz", type=int, default=DEFAULT_BLOCK_NNZ,
                     help=f"... and about this many nonzeros (default {DEFAULT_BLOCK_NNZ}); bounds memory per worker")
    lay.add_argument("--seed", type=int, default=0, help="seed of the global cell shuffle (default 0)")
    run = p.add_argument_group("running")
    run.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default 1)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")
    run.add_argument("--stage", choices=STAGES, default="all",
                     help="run one stage: plan, scatter, gather or finalize (default all)")
    run.add_argument("--num-shards", type=int, default=1, metavar="K",
                     help="job-array mode: number of array tasks")
    run.add_argument("--shard-index", type=int, default=0, metavar="I",
                     help="job-array mode: this task's index in [0, K)")
    run.add_argument("--finalize", action="store_true", help="verify all shards and write the manifest "
                                                             "(same as --stage finalize)")
    run.add_argument("--verify-data", action="store_true",
                     help="finalize also decodes every X chunk (checks its crc32c) and checks column bounds (slower)")
    run.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    t0 = time.perf_counter()
    gc.freeze()  # the imported modules' objects: out of the cyclic GC's reach for the rest of this command
    if args.demo:
        if args.inputs:
            raise UserInputError("--demo takes no input files")
        from .demo import build_demo_store

        build_demo_store(args.out, overwrite=args.overwrite, progress=not args.quiet, workers=args.workers,
                         shard_size=args.shard_size, seed=args.seed)
        return 0
    stage = "finalize" if args.finalize else args.stage
    inputs = args.inputs
    if stage == "finalize" and not inputs:
        inputs = ["<finalize>"]  # finalize reads everything from STORE/_work/plan
    if not inputs:
        raise UserInputError("no input .h5ad files given (or use --demo)")
    opts = BuildOptions(
        inputs=inputs, out=args.out, layer=args.layer, use_raw=args.use_raw, gene_vocab=args.gene_vocab,
        gene_id_column=args.gene_id_column, cell_type_key=args.cell_type_key, shard_size=args.shard_size,
        block_cells=args.block_cells, block_nnz=args.block_nnz,
        seed=args.seed, allow_non_integer=args.allow_non_integer, min_mapped_fraction=args.min_mapped_fraction,
        overwrite=args.overwrite, workers=args.workers, progress=not args.quiet)
    manifest = run_stage(opts, stage, num_tasks=args.num_shards, task_index=args.shard_index,
                         verify_data=args.verify_data)
    if manifest is not None and not args.quiet:
        for line in summary_lines(manifest, args.out, time.perf_counter() - t0 if stage == "all" else 0.0):
            print(line, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
