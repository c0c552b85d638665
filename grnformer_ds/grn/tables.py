"""Readers for existing GRN results: TF–target tables, SCENIC+ eRegulons, pySCENIC regulons and adjacencies.

Every reader returns an **edge table**: a pandas DataFrame with columns

    tf (str) | target (str) | weight (float64, ≥ 0) | sign (int8, +1 / -1) | cell_type (str or None)

(gene *names*, not yet mapped to the store; `network.py` maps them and merges duplicates). Missing columns, empty
files and unreadable files raise `UserInputError` naming the file; nothing is silently dropped here except rows with an
empty TF or target name, which are counted in `table.attrs["n_rows_missing_name"]`.

Column names are matched case-insensitively with these aliases:

| meaning | `--tf-targets` | `--scenicplus` | `--pyscenic-adjacencies` |
|---|---|---|---|
| TF | source, tf, regulator | TF | TF |
| target | target, gene | Gene | target |
| weight | weight, mor, importance, score, likelihood | importance_TF2G, TF2G_importance | importance |
| sign | sign, regulation, mode, mor (if ±1), else the sign of weight | see (1) | none: +1 |
| cell type | cell_type, celltype | cell_type, celltype | cell_type, celltype |

(1) `--scenicplus` sign: regulation, TF2G_regulation, else sign of rho_TF2G / TF2G_rho, else the TF2G sign in
eRegulon_name (`_+/+_`).
"""
from __future__ import annotations

import ast
import csv
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from ..errors import UserInputError

EDGE_COLUMNS = ("tf", "target", "weight", "sign", "cell_type")

TF_ALIASES = ("source", "tf", "regulator", "tf_name")
TARGET_ALIASES = ("target", "gene", "target_gene", "targetgene")
WEIGHT_ALIASES = ("weight", "mor", "importance", "score", "likelihood")
SIGN_ALIASES = ("sign", "regulation", "mode", "mode_of_regulation", "effect")
CELLTYPE_ALIASES = ("cell_type", "celltype", "cell type")


# ---------------------------------------------------------------------- generic table reading
def _separator(path: Path) -> str | None:
    name = path.name.lower().removesuffix(".gz")
    if name.endswith((".tsv", ".txt", ".tab")):
        return "\t"
    if name.endswith(".csv"):
        return ","
    return None  # sniff


def read_delimited(path: str | Path, **kwargs) -> pd.DataFrame:
    """Read a TSV/CSV (gzip allowed) into a DataFrame; a missing/empty/unparsable file is a UserInputError."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError("file not found", path=str(path))
    sep = _separator(path)
    if sep is None:
        try:
            import gzip

            opener = gzip.open if path.name.endswith(".gz") else open
            with opener(path, "rt", errors="replace") as fh:
                sep = csv.Sniffer().sniff(fh.readline(), delimiters="\t,;").delimiter
        except (csv.Error, OSError):
            sep = "\t"
    try:
        frame = pd.read_csv(path, sep=sep, **kwargs)
    except pd.errors.EmptyDataError:
        raise UserInputError("file is empty", path=str(path)) from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as exc:
        raise UserInputError(f"cannot parse as a {'TSV' if sep == chr(9) else 'CSV'} table ({exc})".replace("\n", " "),
                             path=str(path)) from None
    if frame.empty:
        raise UserInputError("table has no rows", path=str(path))
    return frame


def find_column(frame: pd.DataFrame, aliases: Sequence[str], *, path: str, what: str,
                required: bool = True) -> str | None:
    """The column of `frame` whose lower-cased name is one of `aliases` (first alias wins)."""
    lower = {str(c).strip().lower(): c for c in frame.columns}
    for alias in aliases:
        if alias.lower() in lower:
            return lower[alias.lower()]
    if required:
        raise UserInputError(f"missing {what} column (expected one of {', '.join(aliases)}; found "
                             f"{', '.join(map(str, frame.columns[:12]))})", path=path)
    return None


def parse_sign(values: Iterable, *, path: str, column: str) -> np.ndarray:
    """±1 from numbers (sign, 0 → +1) or words (+, -, activation/activating, repression/repressing/inhibition)."""
    series = pd.Series(list(values))
    numeric = pd.to_numeric(series, errors="coerce")
    if numeric.notna().all():
        return np.where(numeric.to_numpy() < 0, -1, 1).astype(np.int8)
    words = series.astype(str).str.strip().str.lower()
    neg = words.str.match(r"^(-|-1|neg|repress|inhib|down)")
    pos = words.str.match(r"^(\+|1|\+1|pos|activ|induc|up)")
    bad = ~(neg | pos)
    if bad.any():
        raise UserInputError(f"column {column!r} has values that are not a sign: "
                             f"{', '.join(sorted(set(series[bad].astype(str)))[:5])}", path=path)
    return np.where(neg, -1, 1).astype(np.int8)


def _edge_frame(tf, target, weight, sign, cell_type, *, path: str) -> pd.DataFrame:
    frame = pd.DataFrame({
        "tf": pd.Series(tf, dtype=object).astype(str).str.strip(),
        "target": pd.Series(target, dtype=object).astype(str).str.strip(),
        "weight": np.abs(np.asarray(weight, dtype=np.float64)),
        "sign": np.asarray(sign, dtype=np.int8),
        "cell_type": pd.Series(cell_type, dtype=object) if cell_type is not None else None,
    })
    missing = frame["tf"].isin(("", "nan", "None")) | frame["target"].isin(("", "nan", "None"))
    if missing.all():
        raise UserInputError("every row lacks a TF or target name", path=path)
    frame = frame.loc[~missing].reset_index(drop=True)
    if not np.isfinite(frame["weight"]).all():
        raise UserInputError("weight column has missing or non-numeric values", path=path)
    frame.attrs.update(source=path, n_rows_missing_name=int(missing.sum()))
    return frame


def _numeric(frame: pd.DataFrame, column: str, path: str) -> np.ndarray:
    values = pd.to_numeric(frame[column], errors="coerce")
    if values.isna().any():
        bad = frame.loc[values.isna(), column].astype(str).head(3).tolist()
        raise UserInputError(f"column {column!r} has non-numeric values: {', '.join(bad)}", path=path)
    return values.to_numpy(np.float64)


# ---------------------------------------------------------------------- the four formats
def read_tf_targets(path: str | Path) -> pd.DataFrame:
    """A TF–target table (CollecTRI/DoRothEA/decoupler `source`/`target`/`weight`, or `TF`/`target`)."""
    path = str(path)
    frame = read_delimited(path)
    tf_col = find_column(frame, TF_ALIASES, path=path, what="TF (source)")
    target_col = find_column(frame, TARGET_ALIASES, path=path, what="target")
    weight_col = find_column(frame, WEIGHT_ALIASES, path=path, what="weight", required=False)
    sign_col = find_column(frame, SIGN_ALIASES, path=path, what="sign", required=False)
    ct_col = find_column(frame, CELLTYPE_ALIASES, path=path, what="cell type", required=False)
    weight = _numeric(frame, weight_col, path) if weight_col else np.ones(len(frame))
    if sign_col:
        sign = parse_sign(frame[sign_col], path=path, column=sign_col)
    else:  # decoupler's `weight` carries the mode of regulation (CollecTRI: ±1)
        sign = np.where(weight < 0, -1, 1).astype(np.int8)
    return _edge_frame(frame[tf_col], frame[target_col], weight, sign,
                       frame[ct_col].astype(str) if ct_col else None, path=path)


_EREGULON_SIGN = re.compile(r"_([+-])/([+-])_")


def read_scenicplus(path: str | Path) -> pd.DataFrame:
    """SCENIC+ eRegulon metadata (direct or extended): TF → Region → Gene rows; TF → Gene kept once later.

    Weight = importance_TF2G; sign = `regulation` (±1) else sign of rho_TF2G else the TF→gene sign in eRegulon_name.
    """
    path = str(path)
    frame = read_delimited(path)
    tf_col = find_column(frame, ("TF",), path=path, what="TF")
    gene_col = find_column(frame, ("Gene", "target"), path=path, what="Gene")
    find_column(frame, ("Region",), path=path, what="Region")
    weight_col = find_column(frame, ("importance_TF2G", "TF2G_importance", "importance"), path=path,
                             what="importance_TF2G", required=False)
    sign_col = find_column(frame, ("regulation", "TF2G_regulation"), path=path, what="regulation", required=False)
    rho_col = find_column(frame, ("rho_TF2G", "TF2G_rho"), path=path, what="rho_TF2G", required=False)
    name_col = find_column(frame, ("eRegulon_name", "Consensus_name"), path=path, what="eRegulon_name", required=False)
    ct_col = find_column(frame, CELLTYPE_ALIASES, path=path, what="cell type", required=False)
    if sign_col:
        sign = parse_sign(frame[sign_col], path=path, column=sign_col)
    elif rho_col:
        sign = np.where(_numeric(frame, rho_col, path) < 0, -1, 1).astype(np.int8)
    elif name_col:
        match = frame[name_col].astype(str).str.extract(_EREGULON_SIGN)
        if match[0].isna().any():
            raise UserInputError(f"cannot read the TF→gene sign from {name_col!r} "
                                 "(expected e.g. SPI1_direct_+/+_(12r))", path=path)
        sign = np.where(match[0] == "-", -1, 1).astype(np.int8)
    else:
        raise UserInputError("missing the sign of TF→gene links (regulation, rho_TF2G or eRegulon_name column)",
                             path=path)
    weight = _numeric(frame, weight_col, path) if weight_col else np.ones(len(frame))
    out = _edge_frame(frame[tf_col], frame[gene_col], weight, sign,
                      frame[ct_col].astype(str) if ct_col else None, path=path)
    return out


def read_pyscenic_regulons(path: str | Path) -> pd.DataFrame:
    """`pyscenic ctx` output (regulons.csv: two header rows, index TF/MotifID, Enrichment/TargetGenes, …/Context).

    As pySCENIC's `df2regulons`: rows of one TF whose Context contains "repressing" form `TF(-)`, the others `TF(+)`;
    a target listed by several motifs keeps its largest weight.
    """
    path = str(path)
    if not Path(path).is_file():
        raise UserInputError("file not found", path=path)
    sep = "\t" if _separator(Path(path)) == "\t" else ","
    try:
        frame = pd.read_csv(path, sep=sep, index_col=[0, 1], header=[0, 1], skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError, IndexError) as exc:
        raise UserInputError(f"not a pySCENIC ctx regulons table (two header rows, TF and MotifID index) ({exc})",
                             path=path) from None
    columns = {str(c[-1]).strip().lower(): c for c in frame.columns}
    if "targetgenes" not in columns:
        raise UserInputError("missing Enrichment/TargetGenes column (expected `pyscenic ctx` output)", path=path)
    context_col = columns.get("context")
    tfs, targets, weights, signs = [], [], [], []
    for (tf, _motif), row in frame.iterrows():
        try:
            genes = ast.literal_eval(str(row[columns["targetgenes"]]))
        except (ValueError, SyntaxError):
            raise UserInputError(f"TargetGenes of TF {tf} is not a list of (gene, weight) pairs", path=path) from None
        repressing = context_col is not None and "repressing" in str(row[context_col])
        for item in genes:
            gene, weight = (item if isinstance(item, (tuple, list)) and len(item) == 2 else (item, 1.0))
            tfs.append(tf), targets.append(gene), weights.append(float(weight)), signs.append(-1 if repressing else 1)
    if not tfs:
        raise UserInputError("no TargetGenes in any row", path=path)
    return _edge_frame(tfs, targets, weights, signs, None, path=path)


def read_pyscenic_adjacencies(path: str | Path, *, top_targets: int | None = 50) -> pd.DataFrame:
    """GRNBoost2/GENIE3 adjacencies (`TF target importance`), unsigned (+1).

    Adjacencies list every TF–gene pair with some importance; as pySCENIC's "top50" module rule, each TF keeps its
    `top_targets` most important targets (None keeps all).
    """
    path = str(path)
    frame = read_delimited(path)
    tf_col = find_column(frame, ("TF",) + TF_ALIASES, path=path, what="TF")
    target_col = find_column(frame, TARGET_ALIASES, path=path, what="target")
    imp_col = find_column(frame, ("importance",) + WEIGHT_ALIASES, path=path, what="importance")
    ct_col = find_column(frame, CELLTYPE_ALIASES, path=path, what="cell type", required=False)
    frame = frame.assign(_w=_numeric(frame, imp_col, path))
    if top_targets:
        keys = [tf_col] + ([ct_col] if ct_col else [])
        frame = frame.sort_values("_w", ascending=False, kind="stable").groupby(keys, sort=False).head(top_targets)
    return _edge_frame(frame[tf_col], frame[target_col], frame["_w"].to_numpy(), np.ones(len(frame), np.int8),
                       frame[ct_col].astype(str) if ct_col else None, path=path)


def read_tf_list(path: str | Path) -> list[str]:
    """One TF name per line (pySCENIC's allTFs_*.txt); blank lines and `#` comments ignored."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError("TF list not found", path=str(path))
    names = [line.split("\t")[0].strip() for line in path.read_text(errors="replace").splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    if not names:
        raise UserInputError("TF list is empty", path=str(path))
    return names
