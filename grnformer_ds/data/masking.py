"""Masked-value modelling: which token slots to mask, and the labels that go with them.

Like ``scgpt.tokenizer.random_mask_value`` each cell gets exactly ``int(n_candidates * mask_ratio)`` masked slots drawn
without replacement, so the number of training targets per cell does not fluctuate (scGPT's Bernoulli ``DataCollator``
would). Unlike it, ``<cls>`` and padding are never candidates (scGPT's count-based version can mask ``<cls>``).
"""
from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100.0  # labels at unmasked positions (PyTorch / HF ignore_index convention)


def choose_masked(n_candidates: int, mask_ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Indices in ``[0, n_candidates)`` to mask: ``int(n_candidates * mask_ratio)`` of them, sorted. Returns int64."""
    n_mask = int(n_candidates * mask_ratio)
    if n_mask <= 0:
        return np.zeros(0, dtype=np.int64)
    return np.sort(rng.choice(n_candidates, size=n_mask, replace=False)).astype(np.int64)


def apply_mask(values: np.ndarray, masked: np.ndarray, mask_value: float) -> tuple[np.ndarray, np.ndarray]:
    """Mask ``values[masked]``. values: (n,) float32. Returns (masked values (n,), labels (n,) = target at masked
    positions, ``IGNORE_INDEX`` elsewhere), both float32."""
    labels = np.full(values.shape, IGNORE_INDEX, dtype=np.float32)
    labels[masked] = values[masked]
    out = values.astype(np.float32, copy=True)
    out[masked] = mask_value
    return out, labels
