"""The collator registry: which tokenization each backbone gets (the data side of `grnformer_ds.modeling`'s backbone
registry, under the same names).

A collator class is a dataclass built by ``for_store(reader, **options)`` and called as
``collator(rows, rng) -> (batch, slot_genes)``; it has ``max_seq_len`` (class default = the backbone's), a
``longest_cell(max_seq_len)`` and a ``cell_tokens(nnz)`` for the packed layout, and ``model_config_fields``: the
options that must equal the model config's fields of the same name (the trainer passes them from the config).
A plug-in registers its own with `register_collator` (docs/backbones.md).
"""
from __future__ import annotations

from ..errors import UserInputError
from .scfoundation_collator import ScFoundationCollator
from .scgpt_collator import ScGPTCollator
from .scpalm_collator import ScPaLMCollator

COLLATORS: dict[str, type] = {}


def register_collator(name: str):
    """Class decorator (or ``register_collator(name)(cls)``): the tokenization of backbone ``name``."""
    def add(cls):
        COLLATORS[name] = cls
        return cls
    return add


def collator_names() -> list[str]:
    return sorted(COLLATORS)


def get_collator(backbone: str) -> type:
    if backbone not in COLLATORS:
        raise UserInputError(f"no tokenization registered for backbone {backbone!r}; registered: "
                             f"{', '.join(collator_names())} (a plug-in registers its own: --plugin MODULE)")
    return COLLATORS[backbone]


register_collator("scgpt")(ScGPTCollator)
register_collator("scfoundation")(ScFoundationCollator)
register_collator("scpalm")(ScPaLMCollator)
