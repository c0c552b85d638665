"""grnformer_ds: DeepSpeed pretraining of single-cell RNA foundation models with gene regulatory networks (GRNFormer).

Model classes are imported lazily so the data-prep command-line tools start without loading torch/transformers:
`from grnformer_ds import GRNFormerForMaskedLM` (or `import grnformer_ds.modeling`) loads them and registers
`model_type="grnformer"` with `AutoConfig`, `AutoModel` and `AutoModelForMaskedLM`.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "GRNFormerConfig": "grnformer_ds.modeling",
    "GRNFormerPreTrainedModel": "grnformer_ds.modeling",
    "GRNFormerModel": "grnformer_ds.modeling",
    "GRNFormerForMaskedLM": "grnformer_ds.modeling",
    "StreamingCellDataset": "grnformer_ds.data",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'grnformer_ds' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
