"""Build options (one dataclass shared by the CLI, the Python API and every stage of a build)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserInputError

DEFAULT_SHARD_SIZE = 50_000        # cells per output shard
DEFAULT_BLOCK_NNZ = 16_000_000     # stored entries per scatter unit (≈ 200 MB of float64 + int32 in flight when a
                                   # unit is read with h5py; direct reads use 256 KiB windows); fewer units = fewer
                                   # files for every gather task to open
DEFAULT_BLOCK_CELLS = 65_536       # and at most this many cells per scatter unit


@dataclass
class BuildOptions:
    """Everything that decides the content of a store. Two runs with equal options and unchanged inputs make
    byte-identical X/obs; a rerun with the same options resumes an interrupted build."""

    inputs: list[str]
    out: str
    layer: str | None = None
    use_raw: bool = False
    gene_vocab: str | None = None
    gene_id_column: str | None = None
    cell_type_key: str | None = None
    shard_size: int = DEFAULT_SHARD_SIZE
    block_nnz: int = DEFAULT_BLOCK_NNZ
    block_cells: int = DEFAULT_BLOCK_CELLS
    seed: int = 0
    allow_non_integer: bool = False
    min_mapped_fraction: float = 0.5
    # Not part of the content:
    overwrite: bool = False
    workers: int = 1
    progress: bool = True
    extra: dict = field(default_factory=dict)

    # Options that change the store's content (the plan fingerprint).
    CONTENT_KEYS = ("layer", "use_raw", "gene_vocab", "gene_id_column", "cell_type_key", "shard_size", "block_nnz",
                    "block_cells", "seed", "allow_non_integer", "min_mapped_fraction")

    def __post_init__(self) -> None:
        self.inputs = [str(p) for p in self.inputs]
        self.out = str(self.out)
        if not self.inputs:
            raise UserInputError("no input .h5ad files given")
        if self.shard_size < 1:
            raise UserInputError(f"--shard-size must be >= 1, got {self.shard_size}")
        if self.block_cells < 1 or self.block_nnz < 1:
            raise UserInputError("block sizes must be >= 1")
        if not 0.0 <= self.min_mapped_fraction <= 1.0:
            raise UserInputError(f"--min-mapped-fraction must be in [0, 1], got {self.min_mapped_fraction}")
        if self.workers < 1:
            raise UserInputError(f"--workers must be >= 1, got {self.workers}")
        if self.layer and self.use_raw:
            raise UserInputError("--layer and --use-raw are exclusive")
        seen: set[str] = set()
        for p in self.inputs:
            key = str(Path(p).resolve())
            if key in seen:
                raise UserInputError("input given twice", path=p)
            seen.add(key)

    def content(self) -> dict:
        return {k: getattr(self, k) for k in self.CONTENT_KEYS}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
