"""A human TF–target prior that ships inside a PyPI package, for the demo and for `--builtin-prior`.

The `priori-regulon-enrichment` package (Priori, Yashar et al. 2023, GPL-3.0; `pip install priori-regulon-enrichment`)
ships `priori/data/primary_intx_regulon.pkl`: 122,785 human regulator → target pairs (1,513 regulators) of Pathway
Commons' literature-curated "controls-expression-of" relation (columns UpGene, Type, DownGene; HGNC symbols;
unsigned). It is a *prior*: regulators include some non-TFs (e.g. signalling genes), so GRNFormer's demo uses it
only through `--infer` (each cell type keeps the prior edges its own expression supports).
Nothing is downloaded: the table is read from the installed package (a pandas pickle written by that package; we
read it exactly as the package does).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import UserInputError

BUILTIN_PRIOR = "priori:pathway_commons"
_PACKAGE, _RESOURCE = "priori.data", "primary_intx_regulon.pkl"


def builtin_prior_path():
    """Path of the shipped table, or UserInputError with the install command when the package is missing."""
    import importlib.resources

    try:
        path = importlib.resources.files(_PACKAGE) / _RESOURCE
    except ModuleNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise UserInputError("the built-in human TF–target prior needs the `priori-regulon-enrichment` package "
                             "(pip install priori-regulon-enrichment); or pass your own --tf-targets table")
    return path


def load_builtin_prior() -> pd.DataFrame:
    """The Pathway Commons prior as an edge table (tf, target, weight=1, sign=+1, cell_type=None)."""
    path = builtin_prior_path()
    frame = pd.read_pickle(path)
    if not isinstance(frame, pd.DataFrame) or not {"UpGene", "DownGene"} <= set(frame.columns):
        raise UserInputError("unexpected content (expected columns UpGene, DownGene)", path=str(path))
    out = pd.DataFrame({"tf": frame["UpGene"].astype(str).str.strip(),
                        "target": frame["DownGene"].astype(str).str.strip(),
                        "weight": np.ones(len(frame)), "sign": np.ones(len(frame), np.int8), "cell_type": None})
    out.attrs.update(source=BUILTIN_PRIOR, n_rows_missing_name=0)
    return out
