"""Named size presets for `GRNFormerConfig.from_preset(name, **overrides)`.

Each preset only sets sizes (and the dropout the reference model was trained with); every other field keeps the
config default, and any keyword given to `from_preset` overrides the preset.

- `debug`: a few thousand parameters per block, for tests and smoke runs.
- `small`: a quick-to-train model for ablations on one GPU.
- `scgpt-base`: scGPT's whole-human model (512 hidden, 12 layers, 8 heads, 512 FFN, dropout 0.2).
- `base`: BERT-base / scFoundation-encoder size (768 hidden, 12 layers, 12 heads, 3072 FFN); with the scFoundation
  backbone the decoder is scFoundation's 512 hidden, 6 layers, 8 heads.
"""
from __future__ import annotations

PRESETS: dict[str, dict] = {
    "debug": dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        decoder_hidden_size=16,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
        gnn_num_layers=2,
        autobin_num_bins=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    ),
    "small": dict(
        hidden_size=256,
        num_hidden_layers=6,
        num_attention_heads=4,
        intermediate_size=512,
        decoder_hidden_size=256,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=4,
        decoder_intermediate_size=1024,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    ),
    "scgpt-base": dict(
        hidden_size=512,
        num_hidden_layers=12,
        num_attention_heads=8,
        intermediate_size=512,
        decoder_hidden_size=512,
        decoder_num_hidden_layers=6,
        decoder_num_attention_heads=8,
        decoder_intermediate_size=2048,
        hidden_dropout_prob=0.2,
        attention_probs_dropout_prob=0.2,
    ),
    "base": dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        decoder_hidden_size=512,
        decoder_num_hidden_layers=6,
        decoder_num_attention_heads=8,
        decoder_intermediate_size=2048,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    ),
}


def preset_names() -> list[str]:
    return sorted(PRESETS)
