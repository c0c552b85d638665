"""Read side: `open_store(path)` → `Store` (validated manifest, vocabulary, genes, cell types, shard paths)."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import UserInputError, load_json_object
from .manifest import read_manifest
from .schema import vocab_path
from .vocab import GeneMatcher, vocab_sha256


@dataclass
class Store:
    """A complete store. Paths are absolute; the gene table is read lazily from shard 0's var (same in all)."""

    path: Path
    manifest: dict[str, Any] = field(repr=False)

    # -- sizes ----------------------------------------------------------------------------------------------------
    @property
    def n_cells(self) -> int:
        return int(self.manifest["n_cells"])

    @property
    def n_genes(self) -> int:
        return int(self.manifest["n_genes"])

    @property
    def nnz(self) -> int:
        return int(self.manifest["nnz"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self.manifest["special_tokens"])

    @property
    def cell_types(self) -> list[str]:
        """Cell-type categories; `cell_type_ids` index into this list (-1 = unknown)."""
        return list(self.manifest["cell_types"])

    # -- shards ---------------------------------------------------------------------------------------------------
    @property
    def shards(self) -> list[dict[str, Any]]:
        """Manifest shard records, each with an extra absolute ``abs_path``."""
        return [{**s, "abs_path": str(self.path / s["path"])} for s in self.manifest["shards"]]

    @property
    def shard_paths(self) -> list[Path]:
        return [self.path / s["path"] for s in self.manifest["shards"]]

    @property
    def cell_offsets(self) -> np.ndarray:
        """(n_shards + 1,) int64: shard i holds global cells [cell_offsets[i], cell_offsets[i+1])."""
        return np.cumsum([0] + [s["n_cells"] for s in self.manifest["shards"]]).astype(np.int64)

    def read_shard(self, i: int):
        """Shard i as an in-memory AnnData (anndata.read_zarr): for inspection, not for streaming."""
        import anndata as ad

        return ad.read_zarr(self.shard_paths[i])

    # -- genes and vocabulary ------------------------------------------------------------------------------------
    @cached_property
    def vocab(self) -> dict[str, int]:
        """{token: id} from vocab.json (checked against the manifest's vocab_sha256)."""
        path = vocab_path(self.path)
        vocab = load_json_object(path, "vocabulary")
        if vocab_sha256(vocab) != self.manifest["vocab_sha256"]:
            raise UserInputError("vocab.json does not match the manifest's vocab_sha256", path=str(path))
        return vocab

    @cached_property
    def var(self) -> pd.DataFrame:
        """The store's gene table (G rows): index = gene symbol, ``token_id``, ``gene_id`` when known."""
        import anndata as ad
        import zarr

        if not self.manifest["shards"]:
            return pd.DataFrame({"token_id": np.zeros(0, np.int32)})
        group = zarr.open_group(self.shard_paths[0], mode="r")
        return ad.io.read_elem(group["var"])

    @property
    def gene_names(self) -> list[str]:
        """(G,) gene symbols in store column order."""
        return [str(g) for g in self.var.index]

    @property
    def gene_ids(self) -> list[str] | None:
        """(G,) gene ids in column order when the store was built with --gene-id-column, else None."""
        return [str(g) for g in self.var["gene_id"]] if "gene_id" in self.var.columns else None

    @property
    def token_ids(self) -> np.ndarray:
        """(G,) int64 vocabulary id of each store column."""
        return self.var["token_id"].to_numpy().astype(np.int64)

    @property
    def gene_key(self) -> str:
        return self.manifest.get("gene_key", "symbol")

    def gene_matcher(self, by: str | None = None) -> GeneMatcher:
        """Map names to store columns with the build's matching rules (by symbol, or by id for id-built stores)."""
        by = by or "symbol"
        if by == "gene_id":
            if self.gene_ids is None:
                raise UserInputError("store was built without --gene-id-column; match by symbol", path=str(self.path))
            return GeneMatcher(self.gene_ids, by="gene_id")
        return GeneMatcher(self.gene_names, by="symbol")

    @property
    def assets(self) -> dict[str, Any]:
        return dict(self.manifest.get("assets", {}))


def open_store(path: str | Path) -> Store:
    """Open a complete store; UserInputError when the manifest is missing, incomplete or of another schema."""
    path = Path(path).resolve()
    manifest = read_manifest(path)
    missing = [s["path"] for s in manifest["shards"] if not (path / s["path"]).is_dir()]
    if missing:
        raise UserInputError(f"{len(missing)} shard(s) listed in the manifest are missing (first: {missing[0]})",
                             path=str(path))
    return Store(path=path, manifest=manifest)
