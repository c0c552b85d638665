"""Random draws keyed by cell instead of by batch, for outputs that must not depend on how cells are batched.

Training draws every random number of a batch from one generator seeded by (seed, epoch, batch index)
(`sampler.batch_rng`), in one call per kind of draw over the batch's cells in order. Inference wants the opposite:
a cell's tokenization (scGPT's random tie-breaking between equal bin edges, the random gene subset of a cell longer
than max_seq_len) must be the same whatever batch, batch size or rank it lands in, so that an embedding is a
function of the cell alone. `CellKeyedRandom` gives each cell its own generator, seeded by (seed, cell index), and
`draw_uniforms` serves both: the collators ask it for "counts[b] uniforms for cell b, cells in order" and get either
one call on the batch generator (the training path, bit for bit what it was) or each cell's next draws.
"""
from __future__ import annotations

import numpy as np


class CellKeyedRandom:
    """One generator per cell, ``np.random.default_rng((seed, cell_index))``, created when first drawn from; successive
    `draw_uniforms` calls continue each cell's own stream. cell_index: (B,) int64 global store positions."""

    def __init__(self, seed: int, cell_index: np.ndarray):
        self.seed = int(seed)
        self.cell_index = np.asarray(cell_index, dtype=np.int64)
        self._gens: dict[int, np.random.Generator] = {}

    def cell(self, b: int) -> np.random.Generator:
        gen = self._gens.get(b)
        if gen is None:
            gen = self._gens[b] = np.random.default_rng((self.seed, int(self.cell_index[b])))
        return gen


def draw_uniforms(rng: np.random.Generator | CellKeyedRandom, counts: np.ndarray) -> np.ndarray:
    """(sum(counts),) float64 uniforms in [0, 1), ``counts[b]`` of them for cell b, cells in order."""
    counts = np.asarray(counts, dtype=np.int64)
    if not isinstance(rng, CellKeyedRandom):
        return rng.random(int(counts.sum()))
    out = np.empty(int(counts.sum()), dtype=np.float64)
    pos = 0
    for b, n in enumerate(counts.tolist()):
        if n:
            out[pos:pos + n] = rng.cell(b).random(n)
            pos += n
    return out
