"""Gene vocabulary and the gene-matching rules shared by every layer.

Two ways to name a gene (``by``):
  * ``"symbol"``  – the var index (e.g. ``CD3E``); matched exactly after stripping surrounding whitespace
    (case is kept: ``Cd3e`` is a mouse gene, ``CD3E`` a human one).
  * ``"gene_id"`` – an id column such as Ensembl ids (``--gene-id-column gene_ids``); matched after stripping
    whitespace and an Ensembl version suffix (``ENSG00000141510.16`` == ``ENSG00000141510``).

The GRN builder maps TF/target names with the same `GeneMatcher`, so a gene is the same gene everywhere.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from ..errors import UserInputError, load_json_object
from .schema import SPECIAL_TOKENS

GENE_KEY_KINDS = ("symbol", "gene_id")
_ENSEMBL_VERSION = re.compile(r"^(ENS[A-Z]*[0-9]{6,})\.[0-9]+$")


def normalize_gene_key(name: object, by: str = "symbol") -> str:
    """The key a gene name is matched by; ``""`` for a missing name (never matches)."""
    if name is None or (isinstance(name, float) and np.isnan(name)):
        return ""
    key = str(name).strip()
    if by == "gene_id":
        key = _ENSEMBL_VERSION.sub(r"\1", key)
    elif by != "symbol":
        raise ValueError(f"by must be one of {GENE_KEY_KINDS}, got {by!r}")
    return key


def normalize_gene_keys(names: Iterable[object], by: str = "symbol") -> list[str]:
    return [normalize_gene_key(n, by) for n in names]


def check_unique_genes(keys: Sequence[str], source: str, what: str = "gene names") -> None:
    """Raise UserInputError naming `source` when a (non-empty) gene key occurs twice: counts would be ambiguous."""
    dup = [k for k, c in Counter(k for k in keys if k).items() if c > 1]
    if dup:
        shown = ", ".join(sorted(dup)[:5]) + (" …" if len(dup) > 5 else "")
        raise UserInputError(f"duplicate {what} ({len(dup)}): {shown}", path=source)


def build_union_vocab(gene_key_lists: Iterable[Iterable[str]]) -> dict[str, int]:
    """Default vocabulary: ``<pad>``, ``<cls>``, ``<eoc>`` = 0, 1, 2, then every gene key of any input, sorted,
    3…G+2."""
    genes = sorted({k for keys in gene_key_lists for k in keys if k} - set(SPECIAL_TOKENS))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({g: i + len(SPECIAL_TOKENS) for i, g in enumerate(genes)})
    return vocab


def load_vocab(path: str | Path) -> dict[str, int]:
    """Read a ``{token: id}`` JSON vocabulary (e.g. a backbone's ``vocab.json``) and check it."""
    path = Path(path)
    raw = load_json_object(path, "vocabulary")
    if not raw:
        raise UserInputError("vocabulary must be a non-empty JSON object {gene: id}", path=str(path))
    vocab: dict[str, int] = {}
    for tok, idx in raw.items():
        if isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
            raise UserInputError(f"vocabulary id of {tok!r} is {idx!r}, expected a non-negative integer",
                                 path=str(path))
        vocab[str(tok)] = idx
    ids = Counter(vocab.values())
    dup = [i for i, c in ids.items() if c > 1]
    if dup:
        raise UserInputError(f"vocabulary ids used more than once: {sorted(dup)[:5]}", path=str(path))
    return vocab


def complete_vocab(vocab: Mapping[str, int]) -> dict[str, int]:
    """Keep the given ids; append any missing special token after the largest id (in SPECIAL_TOKENS order)."""
    out = dict(vocab)
    nxt = max(out.values()) + 1 if out else 0
    for tok in SPECIAL_TOKENS:
        if tok not in out:
            out[tok] = nxt
            nxt += 1
    return out


def vocab_genes(vocab: Mapping[str, int]) -> list[str]:
    """Gene tokens (non-special) of a vocabulary in id order: the store's gene columns for a fixed vocabulary."""
    return [tok for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if tok not in SPECIAL_TOKENS]


def tokens_off_model_ids(store_vocab: Mapping[str, int], model_vocab: Mapping[str, int]) -> list[str]:
    """The store's tokens whose id is not the model's: a store a model can read has none. Every token a batch uses
    (genes, `<pad>`, `<cls>`) counts; `<eoc>` is never used (a store built on a vocabulary without it appends one)."""
    return [t for t, i in store_vocab.items() if t != "<eoc>" and model_vocab.get(t) != i]


def vocab_sha256(vocab: Mapping[str, int]) -> str:
    """Order-independent hash of a vocabulary (sorted by id, then token)."""
    canon = json.dumps(sorted(((int(i), str(t)) for t, i in vocab.items())), separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


class GeneMatcher:
    """Maps gene names to store gene columns ``j ∈ [0, G)`` with the matching rules of this module.

    >>> m = GeneMatcher(["CD3E", "MS4A1"]); m.columns(["MS4A1", "XIST", " CD3E "]).tolist()
    [1, -1, 0]
    """

    def __init__(self, store_gene_keys: Sequence[str], by: str = "symbol"):
        self.by = by
        self._index = {normalize_gene_key(k, by): j for j, k in enumerate(store_gene_keys)}
        self._index.pop("", None)

    def __len__(self) -> int:
        return len(self._index)

    def column(self, name: object) -> int:
        """Store column of one gene, -1 when it is not in the store."""
        return self._index.get(normalize_gene_key(name, self.by), -1)

    def columns(self, names: Iterable[object]) -> np.ndarray:
        """(n,) int64 store column of each name, -1 where absent."""
        return np.fromiter((self.column(n) for n in names), dtype=np.int64)
