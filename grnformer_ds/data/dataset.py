"""`StreamingCellDataset`: a grnformer_ds store -> ready-to-train batches (dicts of tensors), resumable."""
from __future__ import annotations

import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import UserInputError
from .cell_random import CellKeyedRandom
from .cells import CellRows
from .collators import get_collator
from .elastic import RemainderPlan, resumed_plan, tokens_digest
from .graphs import GraphBuilder
from .packing import PackedEpochPlan
from .readers import StoreReader
from .row_gather import gather_spans
from .sampler import EpochPlan, batch_rng
from .worker_transport import BatchReceiver, BatchSender

SPLITS = ("train", "eval", "all")


def longest_cell_tokens(backbone: str, max_seq_len: int | None = None) -> int:
    """Tokens of the longest cell a packed micro-batch can hold for this backbone (the least ``max_tokens``);
    ``max_seq_len`` None = the backbone collator's own default (scGPT 1,200, scFoundation 2,048)."""
    collator = get_collator(backbone)
    return collator.longest_cell(collator.max_seq_len if max_seq_len is None else max_seq_len)


def split_range(n_cells: int, split: str, eval_fraction: float) -> tuple[int, int]:
    """Cells ``[lo, hi)`` of a split. The held-out ``eval`` split is the last ``round(eval_fraction * n)`` cells
    (at least one when ``eval_fraction > 0``): the store shuffles cells globally when it is written, so a tail is a
    uniform random sample, it is the same for every seed and world size, and it reads contiguously."""
    if split not in SPLITS:
        raise UserInputError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if not 0.0 <= eval_fraction < 1.0:
        raise UserInputError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n_eval = 0 if eval_fraction == 0 else min(n_cells - 1, max(1, int(round(eval_fraction * n_cells))))
    if split == "all":
        return 0, n_cells
    if split == "train":
        return 0, n_cells - n_eval
    if n_eval == 0:
        raise UserInputError("split='eval' needs eval_fraction > 0")
    return n_cells - n_eval, n_cells


class StreamingCellDataset(IterableDataset):
    """Streams tokenized, masked cells with per-cell multi-scale GRN graphs from a grnformer_ds store.

    Two batch layouts (docs/design.md section 3): ``batch_size=B`` gives padded (B, L) batches of B cells;
    ``max_tokens=N`` gives token-packed micro-batches: whole cells back to back in one (1, T <= N) row with varlen
    keys (``cu_seq_lens_q/k``, ``max_length_q/k``), as many cells as fit (`packing`).

    Pipeline, per batch (docs/design.md sections 1-3):

    1. plan (`sampler.EpochPlan` / `packing.PackedEpochPlan`): block shuffle of the split's cells for (seed, epoch),
       partition over ranks, equal number of batches per rank (``drop_last`` drops the epoch's tail, otherwise it
       pads by repeating cells; packed: see `packing`); DataLoader worker ``w`` of ``N`` builds batches
       ``consumed + w, consumed + w + N, ...`` so the loader's round-robin returns them in order;
    2. read (`readers.StoreReader`): the batch's blocks of contiguous cells (tensorstore ``zarr3``, or zarr-python),
       cached per worker while their shuffle buffer is in use (``lanes`` keeps workers on disjoint buffers);
    3. tokenize (the backbone's registered collator, `collators`): binning or log1p values, gene subset, ``<cls>``,
       masking;
    4. graphs (`graphs.GraphBuilder`, when the store has GRN assets): cell-type GRN and cell-specific GRN (union of
       the active regulons) restricted to the cell's tokens, edge perturbation (training only), PyG batching;
    5. every random choice of a batch comes from a generator seeded by (seed, epoch, global batch index), so
       ``state_dict() == {epoch, batches_consumed, ...}`` resumes exactly, whatever the number of workers.

    Args:
        store: store directory. batch_size: cells per batch (per rank), the padded layout; or max_tokens: token budget
            per micro-batch (per rank), the packed layout (exactly one of the two). pad_to_max_tokens: packed batches
            padded to exactly max_tokens with dummy segments (static shapes for ``torch.compile``).
            seed: data seed. rank, world_size: data parallel position (each rank yields ``len(self)`` batches per
            epoch).
        backbone: a registered backbone (`collators`): ``"scgpt"`` (default), ``"scfoundation"``, ``"scpalm"`` or a
            plug-in's. split: ``"train"`` (default), ``"eval"`` or ``"all"``;
            eval_fraction: held-out tail of the store for ``"eval"`` (default 0.05, see `split_range`).
        training: masking + edge perturbation + reshuffle per epoch (default: ``split != "eval"``); an evaluation
            dataset yields the same batches on every pass.
        shuffle / drop_last: default to ``training``. block_size / buffer_blocks: block-shuffle read unit and
            buffer (defaults 256 cells x 8 blocks: the store is shuffled when written, so
            contiguous cells are already a random sample; blocks of several zarr inner chunks avoid decoding a chunk
            twice). lanes: runs of batches interleaved so that N workers (N dividing
            lanes) read disjoint blocks (default 4; see `sampler`). reader: ``"tensorstore"`` (default) or
            ``"zarr"``.
        graphs: None = on when the store has GRN assets; True without assets is an error. edge_perturbation: alpha.
            graph_layout: ``"coo"`` (edges TF -> target) or ``"csr"`` (the structure encoder's final form: undirected
            when ``undirected_graphs``, sorted by destination; `graphs`).
        cell_keyed_random: each cell's random tokenization draws (binning ties, the gene subset of a long cell,
            masking) come from a generator seeded by (seed, cell index) instead of the batch's, so a cell's tokens do
            not depend on the batching (`cell_random`; inference).
        cells: (n,) int store positions of the samples to stream instead of a split's cells (with ``split="all"``;
            a fine-tuning split, `tasks.splits`). A cell may appear several times (one sample per (cell, drug)
            pair, ...); batches then carry ``sample_index`` (B,), each sample's position in ``cells``. The plan runs
            over the samples sorted by cell; blocks are ``block_size`` of them, each read as the store range it spans.
        sample_labels: (n,) per sample of ``cells``: every batch gets ``labels`` = its samples' values (``(B,)``, in
            place of the collator's masked-value labels; a task's targets; (n, G) gives (B, G)). sample_inputs:
            {batch key: (n, ...) array} per sample, e.g. ``condition_features`` (a drug's fingerprint) or
            ``condition_gene_ids`` (the perturbed genes): batches get each as (B, ...) under its key.
        Collator options (max_seq_len, n_bins, mask_ratio, mask_value, pad_value, pad_to_max_len, ...) pass through
            ``collator_kwargs`` or the keyword arguments of the same name; None leaves the backbone collator's own
            default (e.g. ``mask_ratio`` 0.15 for scGPT, 0.3 for scFoundation).
    """

    def __init__(self, store: str | Path, *, batch_size: int | None = None, max_tokens: int | None = None,
                 pad_to_max_tokens: bool = False, seed: int, rank: int = 0, world_size: int = 1,
                 backbone: str = "scgpt", split: str = "train", eval_fraction: float = 0.05,
                 training: bool | None = None, shuffle: bool | None = None, drop_last: bool | None = None,
                 block_size: int = 256, buffer_blocks: int = 8, lanes: int = 4, reader: str = "tensorstore",
                 graphs: bool | None = None, edge_perturbation: float = 0.2, graph_layout: str = "coo",
                 undirected_graphs: bool = True, max_seq_len: int | None = None, n_bins: int | None = None,
                 mask_ratio: float | None = None, mask_value: float | None = None, pad_value: float | None = None,
                 pad_to_max_len: bool = False, collator_kwargs: dict | None = None, cell_keyed_random: bool = False,
                 cells: np.ndarray | None = None, sample_labels: np.ndarray | None = None,
                 sample_inputs: dict[str, np.ndarray] | None = None):
        super().__init__()
        collator_cls = get_collator(backbone)
        if (batch_size is None) == (max_tokens is None):
            raise UserInputError("give exactly one of batch_size (padded batches) and max_tokens (packed batches)")
        if batch_size is not None and batch_size < 1:
            raise UserInputError(f"batch_size must be >= 1, got {batch_size}")
        if max_tokens is not None and max_tokens < 1:
            raise UserInputError(f"max_tokens must be >= 1, got {max_tokens}")
        if graph_layout not in GraphBuilder.LAYOUTS:
            raise UserInputError(f"unknown graph_layout {graph_layout!r}; choose one of "
                                 f"{', '.join(GraphBuilder.LAYOUTS)}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise UserInputError(f"rank {rank} is not in [0, world_size={world_size})")
        if seed < 0:
            raise UserInputError(f"seed must be >= 0, got {seed}")
        if block_size < 1 or buffer_blocks < 1 or lanes < 1:
            raise UserInputError("block_size, buffer_blocks and lanes must be >= 1")
        if not 0.0 <= edge_perturbation <= 1.0:
            raise UserInputError(f"edge_perturbation must be in [0, 1], got {edge_perturbation}")
        self.store = Path(store)
        self.reader = StoreReader(self.store, backend=reader)
        self.batch_size = None if batch_size is None else int(batch_size)
        self.max_tokens = None if max_tokens is None else int(max_tokens)
        self.packed = self.max_tokens is not None
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.backbone, self.split = backbone, split
        self.lo, self.hi = split_range(self.reader.n_cells, split, eval_fraction)
        # samples (`cells`): their store positions sorted (`subset`) and each one's index in `cells` (`sample_ids`);
        # the plans then run over positions [0, n) of `subset`
        self.subset = self.sample_ids = self.sample_labels = None
        self._digest: str | None = None  # `_subset_digest`
        self.sample_inputs: dict[str, np.ndarray] = {}
        if cells is not None:
            if split != "all":
                raise UserInputError("cells= selects its own cells: use it with split='all'")
            cells = np.asarray(cells, dtype=np.int64)
            if len(cells) == 0 or cells.min() < 0 or cells.max() >= self.reader.n_cells:
                raise UserInputError(f"cells= must be a non-empty array of store positions in [0, "
                                     f"{self.reader.n_cells})", path=str(self.store))
            self.sample_ids = np.argsort(cells, kind="stable")
            self.subset, self.lo, self.hi = cells[self.sample_ids], 0, len(cells)
            given = {"labels": sample_labels, **(sample_inputs or {})}
            for name, values in given.items():
                if values is not None and len(values) != len(cells):
                    raise UserInputError(f"sample {name} has {len(values)} rows for {len(cells)} samples",
                                         path=str(self.store))
            self.sample_labels = None if sample_labels is None else np.asarray(sample_labels)
            self.sample_inputs = {k: np.asarray(v) for k, v in (sample_inputs or {}).items()}
        elif sample_labels is not None or sample_inputs:
            raise UserInputError("sample_labels / sample_inputs need cells= (the samples they belong to)")
        self.training = (split != "eval") if training is None else bool(training)
        self.shuffle = self.training if shuffle is None else bool(shuffle)
        self.drop_last = self.training if drop_last is None else bool(drop_last)
        self.block_size, self.buffer_blocks, self.lanes = int(block_size), int(buffer_blocks), int(lanes)
        self._cache_blocks = self.buffer_blocks * (self.lanes + 1)  # set per worker in __iter__
        self.edge_perturbation = float(edge_perturbation)
        self.graph_layout, self.undirected_graphs = graph_layout, bool(undirected_graphs)
        self.cell_keyed_random = bool(cell_keyed_random)

        least = self.world_size * (1 if self.packed else self.batch_size)
        if self.drop_last and (self.hi - self.lo) < least:
            what = "world_size" if self.packed else "batch_size x world_size"
            raise UserInputError(
                f"split {split!r} has {self.hi - self.lo} cells, fewer than {what} = {least}: every batch would be "
                f"dropped (lower the batch size or set drop_last=False)", path=str(self.store))

        # only what the caller set: everything else is the backbone collator's own default (one home per default)
        given = dict(max_seq_len=max_seq_len, n_bins=n_bins, mask_ratio=mask_ratio, mask_value=mask_value,
                     pad_value=pad_value)
        kw = {k: v for k, v in given.items() if v is not None}
        kw["pad_to_max_len"] = pad_to_max_len
        if self.packed:
            kw.update(max_tokens=self.max_tokens, pad_to_max_tokens=bool(pad_to_max_tokens))
        kw.update(collator_kwargs or {})
        try:
            self.collator = collator_cls.for_store(self.reader, **kw)
        except (TypeError, ValueError) as exc:  # bad collator option
            raise UserInputError(f"{backbone} tokenization: {exc}") from None
        # packed layout: every cell's token count, known before reading it (stored genes from X/indptr)
        self._cell_tokens, self._tokens_sha1 = None, None
        if self.packed:
            self._tokens()
        self._plans: OrderedDict[int, EpochPlan | PackedEpochPlan] = OrderedDict()

        self.graph_builder = self._graph_builder(graphs)
        self.epoch = 0
        self._consumed = 0  # batches of `self.epoch` already handed out
        # earlier parts of this epoch on other rank counts or micro-batches (`elastic`):
        # (world size, batches per rank, batch_size, max_tokens)
        self._segments: list[tuple[int, int, int | None, int | None]] = []
        self._managed = False  # set by StatefulCellLoader, which keeps `_consumed` current for worker processes
        self._ring_slots = 4  # shared-memory slots per worker (`worker_transport`), set by StatefulCellLoader
        self._cache: OrderedDict[int, CellRows] = OrderedDict()

    def _row_nnz(self) -> np.ndarray:
        """Stored genes of each cell of the split, in plan order."""
        if self.subset is None:
            return self.reader.row_nnz(self.lo, self.hi)
        return self.reader.row_nnz(int(self.subset[0]), int(self.subset[-1]) + 1)[self.subset - self.subset[0]]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()  # each DataLoader worker fills its own block cache
        state["_plans"] = OrderedDict()
        return state

    # ------------------------------------------------------------------ setup
    def _graph_builder(self, graphs: bool | None) -> GraphBuilder | None:
        from ..grn import has_grn_assets, read_grn_assets

        has = has_grn_assets(self.store)
        if graphs is None:
            graphs = has
        if not graphs:
            return None
        if not has:
            raise UserInputError("graphs=True but the store has no GRN assets (run data_prep/build_grn.py first)",
                                 path=str(self.store / "grn"))
        if not self.reader.has_active_regulons:
            raise UserInputError("store has GRN assets but its shards lack obsm/active_regulons (rerun "
                                 "build_grn.py)", path=str(self.store))
        assets = read_grn_assets(self.store)
        if assets.n_genes != self.reader.n_genes:
            raise UserInputError(f"GRN assets cover {assets.n_genes} genes, the store {self.reader.n_genes}",
                                 path=str(self.store / "grn"))
        return GraphBuilder(assets, alpha=self.edge_perturbation, layout=self.graph_layout,
                            undirected=self.undirected_graphs)

    @property
    def graphs(self) -> bool:
        return self.graph_builder is not None

    def plan(self, epoch: int | None = None) -> EpochPlan | PackedEpochPlan | RemainderPlan:
        """The batches of an epoch on this rank (an evaluation dataset always uses epoch 0). Kept for the two most
        recent epochs: a packed plan packs the whole epoch's token counts once. The epoch in progress after a resume
        on another number of ranks is the rest of that epoch (`elastic.RemainderPlan`)."""
        epoch = (self.epoch if epoch is None else epoch) if self.training else 0
        key = (epoch, tuple(self._segments)) if self._segments and epoch == self.epoch else epoch
        plan = self._plans.get(key)
        if plan is None:
            if key == epoch:
                plan = self._base_plan(epoch, self.rank, self.world_size)
            else:  # each segment's rest is batched in the layout of the part after it (the last: this dataset's)
                world0, _, batch0, tokens0 = self._segments[0]
                layouts = [self._layout(b, t) for _, _, b, t in self._segments[1:]]
                plan = resumed_plan(self._base_plan(epoch, 0, world0, batch0, tokens0),
                                    [(w, k) for w, k, _, _ in self._segments], rank=self.rank,
                                    world_size=self.world_size, lo=self.lo, block_size=self.block_size,
                                    lanes=self.lanes,
                                    layouts=layouts + [self._layout(self.batch_size, self.max_tokens)])
            self._plans[key] = plan
            while len(self._plans) > 2:
                self._plans.popitem(last=False)
        return plan

    def _base_plan(self, epoch: int, rank: int, world_size: int, batch_size: int | None = None,
                   max_tokens: int | None = None) -> EpochPlan | PackedEpochPlan:
        """The ordinary plan of an epoch; by default in this dataset's batch layout, else in the one given (an earlier
        segment's)."""
        if batch_size is None and max_tokens is None:
            batch_size, max_tokens = self.batch_size, self.max_tokens
        common = dict(seed=self.seed, epoch=epoch, rank=rank, world_size=world_size, block_size=self.block_size,
                      buffer_blocks=self.buffer_blocks, shuffle=self.shuffle, drop_last=self.drop_last,
                      lanes=self.lanes)
        if max_tokens is not None:
            return PackedEpochPlan(self.lo, self.hi, tokens=self._tokens(), max_tokens=max_tokens, **common)
        return EpochPlan(self.lo, self.hi, batch_size=batch_size, **common)

    def _layout(self, batch_size: int | None, max_tokens: int | None) -> dict[str, Any]:
        """A `RemainderPlan`'s batch layout: padded batches of ``batch_size`` cells or packed ones of ``max_tokens``."""
        if max_tokens is not None:
            return {"tokens": self._tokens(), "max_tokens": int(max_tokens)}
        return {"batch_size": int(batch_size)}

    def _tokens(self) -> np.ndarray:
        """Every cell's packed token count (a padded dataset computes it only to re-plan an earlier packed segment)."""
        if self._cell_tokens is None:
            counts = self.collator.cell_tokens(self._row_nnz())
            self._cell_tokens = counts.astype(np.uint16 if self.collator.max_cell_tokens < 2 ** 16 else np.int32)
        return self._cell_tokens

    def __len__(self) -> int:
        """Batches per epoch on every rank (of an ordinary epoch: the rest of one resumed on another number of ranks
        has its own count)."""
        if self._segments and self.epoch == 0:
            return self._base_plan(0, self.rank, self.world_size).n_steps
        return self.plan(0).n_steps

    # ------------------------------------------------------------------ state
    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` (keeps the position when it is the epoch already in progress, e.g. after resume)."""
        if int(epoch) != self.epoch:
            self.epoch, self._consumed, self._segments = int(epoch), 0, []

    def state_dict(self) -> dict[str, Any]:
        """The data position: ``epoch``, ``batches_consumed`` (per rank, of this epoch, on ``world_size`` ranks, in
        batches of ``batch_size`` / ``max_tokens``) and ``earlier_segments``: [world size, batches, batch_size,
        max_tokens] of each part of this epoch that ran on another number of ranks or micro-batch (`elastic`); plus
        what the batches depend on (checked by `load_state_dict`)."""
        return {"epoch": self.epoch, "batches_consumed": self._consumed, "seed": self.seed,
                "batch_size": self.batch_size, "max_tokens": self.max_tokens, "world_size": self.world_size,
                "rank": self.rank, "split": self.split, "split_range": [self.lo, self.hi], "backbone": self.backbone,
                "earlier_segments": [list(seg) for seg in self._segments],
                **({"tokens_sha1": self._tokens_digest()} if self._uses_tokens() else {}),
                **({} if self.subset is None else {"cells_sha1": self._subset_digest()})}

    def _subset_digest(self) -> str:
        """Digest of the samples (fixed after __init__: computed once; `state_dict` runs at every --log-cells line)."""
        if self._digest is None:
            import hashlib

            self._digest = hashlib.sha1(self.subset.tobytes() + self.sample_ids.tobytes()).hexdigest()[:16]
        return self._digest

    def _uses_tokens(self) -> bool:
        """Whether this epoch's plan depends on the cells' token counts (a packed layout, now or earlier in it)."""
        return self.packed or any(seg[3] is not None for seg in self._segments)

    def _tokens_digest(self) -> str:
        if self._tokens_sha1 is None:
            self._tokens_sha1 = tokens_digest(self._tokens())
        return self._tokens_sha1

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict`: exactly when it was written on as many ranks as this dataset has; on another
        number of ranks, or with another micro-batch (``batch_size`` / ``max_tokens``), the rest of its epoch is
        shared out over this one's ranks in this one's batches (`elastic`: no cell of the epoch repeated or skipped),
        and the epochs after it are ordinary ones. An evaluation dataset needs the same micro-batch."""
        layout = (state.get("batch_size", self.batch_size), state.get("max_tokens", self.max_tokens))
        for key in ("seed", "split", *(() if self.training else ("batch_size", "max_tokens"))):
            if key in state and state[key] != getattr(self, key):
                raise UserInputError(f"cannot resume data position: checkpoint has {key}={state[key]!r}, this "
                                     f"dataset {key}={getattr(self, key)!r} (batches would differ)")
        if "split_range" in state and list(state["split_range"]) != [self.lo, self.hi]:
            raise UserInputError(f"cannot resume data position: split cells {state['split_range']} != "
                                 f"{[self.lo, self.hi]} (store or eval_fraction changed)")
        if self.subset is not None and state.get("cells_sha1", self._subset_digest()) != self._subset_digest():
            raise UserInputError("cannot resume data position: the split's cells changed")
        if "tokens_sha1" in state and state["tokens_sha1"] != self._tokens_digest():
            raise UserInputError("cannot resume data position: the cells' token counts changed (max_seq_len or the "
                                 "mask ratio): the epoch's packed batches would differ")
        # [world, batches] segments of older checkpoints had the checkpoint's micro-batch (it could not change then)
        segments = [(int(seg[0]), int(seg[1]), *(seg[2:] if len(seg) == 4 else layout))
                    for seg in state.get("earlier_segments", [])]
        world, consumed = int(state.get("world_size", self.world_size)), int(state["batches_consumed"])
        changed = world != self.world_size or layout != (self.batch_size, self.max_tokens)
        if changed and self.training:
            segments, consumed = segments + [(world, consumed, *layout)], 0
        self.epoch, self._consumed, self._segments = int(state["epoch"]), consumed, segments
        self._plans.clear()

    def _advance(self, n: int = 1) -> None:
        self._consumed += n

    def _end_epoch(self, plan: EpochPlan) -> None:
        if self.training and self._consumed >= plan.n_steps:
            self.epoch, self._consumed, self._segments = self.epoch + 1, 0, []
        elif not self.training:
            self._consumed = 0

    # ------------------------------------------------------------------ batches
    def _block(self, b: int, with_active: bool) -> CellRows:
        """Block ``b`` of the split (``block_size`` contiguous cells), through the per-worker LRU cache."""
        rows = self._cache.get(b)
        if rows is None and self.subset is not None:
            # the block's cells of the subset, read as the store range they span
            pos = self.subset[b * self.block_size:(b + 1) * self.block_size]
            g0 = int(pos[0])
            rows = self.reader.read_range(g0, int(pos[-1]) + 1, with_active).take(pos - g0)
            self._cache[b] = rows
            while len(self._cache) > self._cache_blocks:
                self._cache.popitem(last=False)
        elif rows is None:
            g0 = self.lo + b * self.block_size
            rows = self.reader.read_range(g0, min(g0 + self.block_size, self.hi), with_active)
            self._cache[b] = rows
            while len(self._cache) > self._cache_blocks:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(b)
        return rows

    def _rows(self, plan: EpochPlan, cells: np.ndarray) -> CellRows:
        """Read the cells (global ids) through a per-worker LRU cache of blocks, gathered in batch order in one pass
        that also widens the store's narrow dtypes to int32 / float32 (`row_gather.gather_spans`)."""
        blocks = plan.block_of(cells)
        with_active = self.graph_builder is not None
        uniq, inv = np.unique(blocks, return_inverse=True)
        local = cells - (self.lo + blocks * self.block_size)
        n = len(cells)
        start, end = np.empty(n, np.int64), np.empty(n, np.int64)
        cell_index, cell_type = np.empty(n, np.int64), np.empty(n, np.int64)
        srcs, active = [], None
        for k, b in enumerate(uniq.tolist()):
            rows = self._block(b, with_active)
            srcs.append(rows)
            sel = inv == k
            r = local[sel]
            start[sel], end[sel] = rows.indptr[r], rows.indptr[r + 1]
            cell_index[sel], cell_type[sel] = rows.cell_index[r], rows.cell_type[r]
            if rows.active_regulons is not None:
                if active is None:
                    active = np.empty((n, rows.active_regulons.shape[1]), dtype=rows.active_regulons.dtype)
                active[sel] = rows.active_regulons[r]
        indptr, indices, data = gather_spans([(r.indices, r.data) for r in srcs], inv, start, end)
        return CellRows(indptr=indptr, indices=indices, data=data, cell_index=cell_index, cell_type=cell_type,
                        active_regulons=active)

    def batch(self, step: int, plan: EpochPlan | None = None) -> dict[str, torch.Tensor]:
        """This rank's batch ``step`` of the current epoch (random access; used by the iterator)."""
        plan = plan or self.plan()
        positions = plan.step_cells(step)
        rows = self._rows(plan, positions)
        g = plan.global_batch(step)
        # a cell's tokenization draws from its own generator when outputs must not depend on batching (inference)
        rng = CellKeyedRandom(self.seed, rows.cell_index) if self.cell_keyed_random else batch_rng(
            self.seed, plan.epoch, g, 0)
        out, slot_genes = self.collator(rows, rng)
        if self.sample_ids is not None:
            sample = self.sample_ids[positions]
            out["sample_index"] = torch.from_numpy(sample)
            if self.sample_labels is not None:
                out["labels"] = torch.from_numpy(np.ascontiguousarray(self.sample_labels[sample]))
            for name, values in self.sample_inputs.items():
                out[name] = torch.from_numpy(np.ascontiguousarray(values[sample]))
        if self.graph_builder is not None:
            segments = out["cu_seq_lens_q"].numpy() if self.packed else None
            out.update(self.graph_builder(slot_genes, rows.cell_type, rows.active_regulons,
                                          batch_rng(self.seed, plan.epoch, g, 1), perturb=self.training,
                                          segments=segments))
        return out

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        if info is not None and not self._managed and worker == 0:
            warnings.warn("StreamingCellDataset in a plain DataLoader with workers: state_dict() of the main process "
                          "will not advance; wrap it in grnformer_ds.data.StatefulCellLoader for exact resume")
        plan = self.plan()
        # this worker's open buffers: one per run it serves (+1 for a batch straddling two buffers)
        self._cache_blocks = self.buffer_blocks * (-(-plan.lanes // n_workers) + 1)
        # a managed worker sends batches through reusable shared-memory slots; the loader copies them out
        sender = BatchSender(self._ring_slots) if info is not None and self._managed else None
        for step in range(self._consumed + worker, plan.n_steps, n_workers):
            out = self.batch(step, plan)
            if info is None:
                self._consumed = step + 1  # before yielding: a checkpoint taken now must not replay this batch
            elif sender is not None:
                out = sender.pack(out)
            yield out
        if info is None:
            self._end_epoch(plan)


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    return bool(accelerator.is_available()) if accelerator is not None else torch.cuda.is_available()


class StatefulCellLoader:
    """A ``torch.utils.data.DataLoader`` over a `StreamingCellDataset` that keeps the dataset's position current
    with several workers (the dataset object in the main process never sees the workers' batches).

    ``state_dict()`` after consuming k batches resumes at batch k+1 even though workers have prefetched further.
    With workers, batches come through a ring of reusable shared-memory slots per worker (`worker_transport`) and are
    copied out, into pinned memory with ``pin_memory`` (in place of the DataLoader's pin-memory thread), before they are
    yielded: the consumer owns every batch it gets.
    """

    def __init__(self, dataset: StreamingCellDataset, num_workers: int = 0, pin_memory: bool = False,
                 prefetch_factor: int | None = None, **kwargs):
        self.dataset = dataset
        self.num_workers = int(num_workers)
        self.one_off_batches = 0  # batches that missed the workers' slot rings (`worker_transport`; 0 expected)
        dataset._managed = True
        if kwargs.get("persistent_workers"):
            raise UserInputError("persistent_workers=True would keep stale data positions in the workers")
        if kwargs.get("in_order", True) is False:
            raise UserInputError("in_order=False would hand batches out of step order: the position (state_dict) "
                                 "and exact resume need them in order")
        if self.num_workers and "multiprocessing_context" not in kwargs and dataset.reader.backend == "tensorstore":
            # tensorstore aborts a process forked after its thread pool started (any earlier read in this process):
            # workers come from a clean forkserver instead.
            import multiprocessing

            # The server imports these once (before any tensorstore thread exists), so workers start in ~0.1 s
            # instead of re-importing torch each. No effect once the server is running.
            multiprocessing.set_forkserver_preload(["torch", "grnformer_ds.data"])
            kwargs["multiprocessing_context"] = "forkserver"
        if self.num_workers:
            prefetch_factor = 2 if prefetch_factor is None else int(prefetch_factor)  # the DataLoader's default
            # a worker holds at most prefetch_factor batches the main process has not received + the one it copies
            dataset._ring_slots = prefetch_factor + 2
        # the DataLoader draws its workers' base seed when an iterator starts: from its own generator, so starting
        # one (each epoch, or first after a resume) leaves the global torch RNG (dropout) where it was
        kwargs.setdefault("generator", torch.Generator().manual_seed(dataset.seed))
        # with workers the receiver pins (the DataLoader would pin the slot message, not the batch)
        self.pin_memory = bool(pin_memory) and self.num_workers > 0 and _has_accelerator()
        self.loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                                 pin_memory=bool(pin_memory) and not self.num_workers,
                                 prefetch_factor=prefetch_factor if self.num_workers else None, **kwargs)

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        if self.num_workers == 0:
            yield from self.loader
            return
        plan = self.dataset.plan()
        receiver = BatchReceiver(pin_memory=self.pin_memory)
        try:
            for out in self.loader:
                self.dataset._advance()
                self.one_off_batches += out.slot < 0
                yield receiver.unpack(out)
        except UserInputError as exc:  # e.g. a damaged shard, found by a worker: its one line, not its traceback
            from ..errors import from_worker

            raise from_worker(exc) from None
        self.dataset._end_epoch(plan)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state)
