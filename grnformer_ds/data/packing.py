"""One shared-memory buffer per batch between DataLoader workers and the main process.

A batch is ~12 tensors (~2.5 MB for 64 cells × 1,200 tokens with graphs). Sent as a dict, every tensor becomes its own
shared-memory segment: the worker creates and fills a segment per tensor and the main process maps each one, which
measured ~2 ms of main-process CPU per batch here and capped two workers below one worker's in-process rate. Packed,
the worker copies the batch into one segment (64-byte aligned slices) and the main process maps it once and takes
views: 2x less main-process time per batch (BENCHMARKS.md). With ``pin_memory`` the DataLoader pins one buffer
instead of twelve tensors.

The unpacked tensors are non-overlapping views of one storage (``tensor.untyped_storage()`` is shared), so in-place
edits of one key never touch another.
"""
from __future__ import annotations

import torch

_ALIGN = 64


class PackedBatch(tuple):
    """(buffer: uint8 tensor, spec: tuple of (key, dtype, shape, byte offset)). A tuple subclass, so the DataLoader's
    collate / pin-memory code walks into it and pins the buffer."""

    __slots__ = ()


def pack_batch(batch: dict[str, torch.Tensor]) -> PackedBatch:
    """Copy the tensors of a batch into one shared-memory uint8 buffer. Returns a `PackedBatch`."""
    spec, offset = [], 0
    for key, value in batch.items():
        start = -(-offset // _ALIGN) * _ALIGN
        spec.append((key, value.dtype, tuple(value.shape), start))
        offset = start + value.numel() * value.element_size()
    buf = torch.empty(offset, dtype=torch.uint8).share_memory_()
    for (key, dtype, shape, start), value in zip(spec, batch.values()):
        n = value.numel() * value.element_size()
        buf[start:start + n].view(dtype).view(shape).copy_(value)
    return PackedBatch((buf, tuple(spec)))


def unpack_batch(packed) -> dict[str, torch.Tensor]:
    """The batch dict of `pack_batch`, as views of its buffer (no copy)."""
    buf, spec = packed
    out = {}
    for key, dtype, shape, start in spec:
        n = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        out[key] = buf[start:start + n].view(dtype).view(shape)
    return out
