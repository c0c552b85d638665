"""The backbone registry with the built-in backbones registered: scGPT-, scFoundation- and scPaLM-style.

`get_backbone(name)`, `backbone_names()`, `register_backbone` (for plug-ins) live in `backbone_base`; importing this
module registers the built-in ones (each in its own file, flat in this folder and imported as `from .x import Y`: a
saved model's code copy follows exactly those same-folder relative imports).
"""
from __future__ import annotations

from .backbone_base import Backbone, backbone_names, get_backbone, register_backbone
from .backbone_scfoundation import ScFoundationBackbone
from .backbone_scgpt import ScGPTBackbone
from .backbone_scpalm import ScPaLMBackbone

__all__ = ["Backbone", "ScFoundationBackbone", "ScGPTBackbone", "ScPaLMBackbone", "backbone_names", "get_backbone",
           "register_backbone"]
