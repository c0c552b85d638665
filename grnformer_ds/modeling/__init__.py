"""GRNFormer in HF transformers style.

    from grnformer_ds.modeling import GRNFormerConfig, GRNFormerForMaskedLM
    config = GRNFormerConfig.from_preset("scgpt-base", vocab_size=len(vocab))
    model = GRNFormerForMaskedLM(config)          # attn_implementation="sdpa" by default

Importing this package registers the classes with `AutoConfig`, `AutoModel`, `AutoModelForMaskedLM` and
`AutoModelForSequenceClassification` (the cell classifier), and marks
them with `register_for_auto_class` so that `save_pretrained` writes an `auto_map` and copies these modules next to
the weights (loadable with `trust_remote_code=True` where grnformer_ds is not installed).
"""
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

from .attention import ATTN_IMPLEMENTATIONS, resolve_attn_implementation
from .backbones import Backbone, backbone_names, get_backbone, register_backbone
from .configuration_grnformer import GRNFormerConfig
from .dummy_inputs import make_dummy_batch
from .modeling_grnformer import (
    GRNFormerCellClassifierOutput,
    GRNFormerForCellClassification,
    GRNFormerForMaskedLM,
    GRNFormerMaskedLMOutput,
    GRNFormerModel,
    GRNFormerModelOutput,
    GRNFormerPreTrainedModel,
    masked_mse_loss,
)
from .presets import PRESETS, preset_names

__all__ = [
    "ATTN_IMPLEMENTATIONS",
    "Backbone",
    "AUTO_CLASSES",
    "GRNFormerCellClassifierOutput",
    "GRNFormerConfig",
    "GRNFormerForCellClassification",
    "GRNFormerForMaskedLM",
    "GRNFormerMaskedLMOutput",
    "GRNFormerModel",
    "GRNFormerModelOutput",
    "GRNFormerPreTrainedModel",
    "PRESETS",
    "backbone_names",
    "get_backbone",
    "make_dummy_batch",
    "masked_mse_loss",
    "model_class",
    "preset_names",
    "register_backbone",
    "resolve_attn_implementation",
]


# each model class and the transformers Auto class that loads it (an export's auto_map; `training.export`)
AUTO_CLASSES = {
    GRNFormerModel: "AutoModel",
    GRNFormerForMaskedLM: "AutoModelForMaskedLM",
    GRNFormerForCellClassification: "AutoModelForSequenceClassification",
}


def model_class(name: str):
    """The model class called `name` (a config's `architectures` entry)."""
    for cls in AUTO_CLASSES:
        if cls.__name__ == name:
            return cls
    raise ValueError(f"unknown GRNFormer model class {name!r}; known: {', '.join(c.__name__ for c in AUTO_CLASSES)}")


def _register() -> None:
    # exist_ok: the trust_remote_code copy of these modules may register the same names in the same process
    AutoConfig.register(GRNFormerConfig.model_type, GRNFormerConfig, exist_ok=True)
    AutoModel.register(GRNFormerConfig, GRNFormerModel, exist_ok=True)
    AutoModelForMaskedLM.register(GRNFormerConfig, GRNFormerForMaskedLM, exist_ok=True)
    AutoModelForSequenceClassification.register(GRNFormerConfig, GRNFormerForCellClassification, exist_ok=True)
    GRNFormerConfig.register_for_auto_class()
    for cls, auto in AUTO_CLASSES.items():
        cls.register_for_auto_class(auto)


_register()
