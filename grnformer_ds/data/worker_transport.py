"""Batches between DataLoader workers and the main process through a ring of reusable shared-memory slots.

A batch is ~12 tensors (~2.7 MB for 64 cells x 1,200 tokens with graphs). A DataLoader sends a dict of tensors as one
new shared-memory segment per tensor, and each one costs the worker page faults on fresh tmpfs pages (~0.65 ms/MB
here) and both processes a file-descriptor hand-over through a socket (``multiprocessing.resource_sharer``). Measured
on the 2-core VM: a worker spent 6.5 ms per batch against 3.0 ms for the same batch in-process, and the main process
1.35 ms per batch just receiving, so two workers on two cores gave less than one process alone (BENCHMARKS.md).

So each worker (`BatchSender`) keeps ``n_slots`` shared uint8 buffers, reused, and a shared flag per slot. It copies a
batch into a free slot in its wire form (int64 tensors whose values fit travel as int32; PyG's node ``batch`` vector,
a quarter of the bytes, is dropped when ``ptr`` rebuilds it) and sends a small `SlotMessage`: the slot's storage and
the flags travel (as file descriptors) only the first time they are used; a batch's plain Python values (the packed
layout's ``max_length_q`` / ``max_length_k`` ints) ride in the message itself. The main process (`BatchReceiver`, one
per loader iteration) maps each slot once, copies the batch out into one fresh buffer in its final dtypes (pinned when
asked: this replaces the DataLoader's pin-memory thread), and clears the slot's flag. The consumer therefore owns its
batch outright: it may keep it for as long as it likes while the worker refills the slot.

A worker holds at most ``prefetch_factor`` batches the main process has not received (the DataLoader sends a worker
a new index only for a batch it took), plus the one being copied, so ``prefetch_factor + 2`` slots never run out;
if they ever do (a changed DataLoader), the batch goes through a one-off shared buffer: a worker never waits.

Flag writes and reads sit between full memory fences (`_fence`, an LLVM ``fence seq_cst`` through numba): on x86
stores are not reordered with earlier loads anyway, but on weakly ordered CPUs (ARM: Grace) the flag clear must not
become visible before the main process's reads of the slot are done.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np
import torch
from numba import njit, types
from numba.extending import intrinsic

_ALIGN = 64
_I32 = torch.iinfo(torch.int32)


# ------------------------------------------------------------------------------------------- fenced flag access
@intrinsic
def _fence(typingctx):
    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


@njit(cache=True)
def _store_flag(flags, slot, value):
    _fence()  # every earlier read/write of the slot is done before the flag changes
    flags[slot] = value
    _fence()


@njit(cache=True)
def _load_flag(flags, slot):
    value = flags[slot]
    _fence()  # no write to the slot may move before this read
    return value


# ------------------------------------------------------------------------------------------- layout
@dataclass(slots=True)
class SlotMessage:
    """What a worker sends per batch. Not a tuple or dict, so the DataLoader's ``default_convert`` leaves it alone.

    token: the sending `BatchSender`; slot: ring index, -1 for a one-off buffer; generation: bumps when the slot is
    reallocated larger; storage: the slot's uint8 tensor on its first use (or the one-off buffer), else None; flags:
    the sender's flag vector on its first message, else None; layout: ``(key, wire dtype, shape, byte offset, final
    dtype)`` per sent key; order: the batch's keys (``batch`` included when it is rebuilt from ``ptr``); values: the
    batch's non-tensor entries (ints, bools), sent as they are."""

    token: str
    slot: int
    generation: int
    storage: torch.Tensor | None
    flags: torch.Tensor | None
    layout: tuple
    order: tuple
    values: dict


def _nbytes(dtype: torch.dtype, shape) -> int:
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def _aligned(offset: int) -> int:
    return -(-offset // _ALIGN) * _ALIGN


def _wire(batch: dict[str, torch.Tensor]):
    """(key, tensor, wire dtype, final dtype) per sent key; ``batch`` is dropped when ``ptr`` rebuilds it. The tensor
    is narrowed to the wire dtype while it is copied into the slot (``copy_`` converts), not before."""
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor) or (key == "batch" and "ptr" in batch):
            continue
        if value.dtype == torch.int64 and value.numel():
            lo, hi = torch.aminmax(value)  # one pass over the tensor
            if _I32.min <= int(lo) and int(hi) <= _I32.max:
                yield key, value, torch.int32, torch.int64
                continue
        yield key, value, value.dtype, value.dtype


def _copy_in(buf: torch.Tensor, layout, sent) -> None:
    for (key, dtype, shape, start, _), value in zip(layout, sent):
        buf[start:start + _nbytes(dtype, shape)].view(dtype).view(shape).copy_(value)


# ------------------------------------------------------------------------------------------- worker side
class BatchSender:
    """Worker side: packs batches into a ring of ``n_slots`` reusable shared-memory slots (module docstring)."""

    def __init__(self, n_slots: int):
        if n_slots < 1:
            raise ValueError(f"n_slots must be >= 1, got {n_slots}")
        self.token = secrets.token_hex(8)
        self.flags = torch.zeros(n_slots, dtype=torch.int32).share_memory_()
        self._flags = self.flags.numpy()
        self._slots: list[torch.Tensor | None] = [None] * n_slots
        self._generation = [0] * n_slots
        self._announced = [False] * n_slots
        self._flags_sent = False
        self._next = 0
        self.one_off = 0  # batches that found no free slot (the loader counts them too: `SlotMessage.slot` is -1)

    def _free_slot(self) -> int:
        n = len(self._slots)
        for k in range(n):
            s = (self._next + k) % n
            if _load_flag(self._flags, s) == 0:
                self._next = (s + 1) % n
                return s
        return -1

    def pack(self, batch: dict[str, torch.Tensor]) -> SlotMessage:
        layout, sent, size = [], [], 0
        for key, value, wire, final in _wire(batch):
            start = _aligned(size)
            layout.append((key, wire, tuple(value.shape), start, final))
            sent.append(value)
            size = start + value.numel() * wire.itemsize
        values = {k: v for k, v in batch.items() if not isinstance(v, torch.Tensor)}
        flags = None if self._flags_sent else self.flags
        self._flags_sent = True
        s = self._free_slot()
        if s < 0:  # every slot still held by the main process: a one-off buffer (never blocks)
            self.one_off += 1
            buf = torch.empty(max(size, 1), dtype=torch.uint8).share_memory_()
            _copy_in(buf, layout, sent)
            return SlotMessage(self.token, -1, 0, buf, flags, tuple(layout), tuple(batch), values)
        buf = self._slots[s]
        if buf is None or buf.numel() < size:  # grow with headroom: batches vary in edges and tokens
            buf = torch.empty(max(size + size // 4, 1), dtype=torch.uint8).share_memory_()
            self._slots[s], self._generation[s], self._announced[s] = buf, self._generation[s] + 1, False
        _copy_in(buf, layout, sent)
        storage = None if self._announced[s] else buf
        self._announced[s] = True
        _store_flag(self._flags, s, 1)
        return SlotMessage(self.token, s, self._generation[s], storage, flags, tuple(layout), tuple(batch), values)


# ------------------------------------------------------------------------------------------- main side
class BatchReceiver:
    """Main side: turns `SlotMessage`s back into batch dicts it owns, and frees the slots (module docstring).

    The returned tensors are non-overlapping views of one fresh storage (pinned when ``pin_memory``), same keys in
    the same order, dtypes and shapes as the worker's dict."""

    def __init__(self, pin_memory: bool = False):
        self.pin_memory = bool(pin_memory)
        self._slots: dict[tuple[str, int], tuple[int, torch.Tensor]] = {}
        self._flags: dict[str, np.ndarray] = {}

    def unpack(self, msg: SlotMessage) -> dict[str, torch.Tensor]:
        if msg.flags is not None:
            self._flags[msg.token] = msg.flags.numpy()
        if msg.slot < 0:
            src = msg.storage
        else:
            if msg.storage is not None:
                self._slots[(msg.token, msg.slot)] = (msg.generation, msg.storage)
            generation, src = self._slots[(msg.token, msg.slot)]
            if generation != msg.generation:  # cannot happen with one queue per worker; never read a stale slot
                raise RuntimeError(f"batch slot {msg.slot} of worker {msg.token}: generation {msg.generation} "
                                   f"announced, {generation} mapped")
        # final layout: every key in its final dtype, `batch` (when rebuilt) last
        rebuild = "batch" in msg.order and all(key != "batch" for key, *_ in msg.layout)
        placed, size = [], 0
        for key, dtype, shape, start, final in msg.layout:
            out_start = _aligned(size)
            placed.append((key, dtype, shape, start, final, out_start))
            size = out_start + _nbytes(final, shape)
        out = torch.empty(max(size, 1), dtype=torch.uint8, pin_memory=self.pin_memory)
        got = {}
        for key, dtype, shape, start, final, out_start in placed:
            dst = out[out_start:out_start + _nbytes(final, shape)].view(final).view(shape)
            dst.copy_(src[start:start + _nbytes(dtype, shape)].view(dtype).view(shape))
            got[key] = dst
        if msg.slot >= 0:
            _store_flag(self._flags[msg.token], msg.slot, 0)
        if rebuild:
            ptr = got["ptr"]
            # `batch` gets its own tensor: its length is only known from ptr's values, after the copy
            got["batch"] = torch.repeat_interleave(torch.arange(len(ptr) - 1, dtype=torch.int64), ptr.diff(),
                                                   output_size=int(ptr[-1]))
            if self.pin_memory:
                got["batch"] = got["batch"].pin_memory()
        got.update(msg.values)
        return {key: got[key] for key in msg.order}
