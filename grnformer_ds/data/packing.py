"""One shared-memory buffer per batch between DataLoader workers and the main process.

A batch is ~12 tensors (~2.5 MB for 64 cells × 1,200 tokens with graphs). Sent as a dict, every tensor becomes its own
shared-memory segment: the worker creates and fills a segment per tensor and the main process maps each one, which
measured ~2 ms of main-process CPU per batch here and capped two workers below one worker's in-process rate. Packed,
the worker copies the batch into one segment (64-byte aligned slices) and the main process maps it once and takes
views: 2x less main-process time per batch (BENCHMARKS.md). With ``pin_memory`` the DataLoader pins one buffer
instead of twelve tensors.

Creating and filling a fresh shared-memory segment costs ~0.65 ms per MB here (page faults on tmpfs), so the wire
form is also smaller: int64 tensors whose values fit travel as int32 and are widened on arrival, and PyG's node
``batch`` vector (B·L int64, a quarter of the batch) is not sent when ``ptr`` is: it is rebuilt from ``ptr``.

The unpacked tensors are non-overlapping views of one storage (``tensor.untyped_storage()`` is shared), so in-place
edits of one key never touch another; widened and rebuilt tensors are new tensors.
"""
from __future__ import annotations

import torch

_ALIGN = 64


class PackedBatch(tuple):
    """(buffer: uint8 tensor, spec: tuple of (key, dtype, shape, byte offset)). A tuple subclass, so the DataLoader's
    collate / pin-memory code walks into it and pins the buffer."""

    __slots__ = ()


_I32 = torch.iinfo(torch.int32)


def _wire(batch: dict[str, torch.Tensor]):
    """(key, tensor to send, dtype on arrival or None) per key; ``batch`` is dropped when ``ptr`` rebuilds it."""
    for key, value in batch.items():
        if key == "batch" and "ptr" in batch:
            continue
        if value.dtype == torch.int64 and value.numel() and _I32.min <= int(value.min()) and int(value.max()) <= _I32.max:
            yield key, value.to(torch.int32), torch.int64
        else:
            yield key, value, None


def pack_batch(batch: dict[str, torch.Tensor]) -> PackedBatch:
    """Copy the tensors of a batch (in their wire form, module docstring) into one shared-memory uint8 buffer."""
    spec, sent, offset = [], [], 0
    for key, value, widen in _wire(batch):
        start = -(-offset // _ALIGN) * _ALIGN
        spec.append((key, value.dtype, tuple(value.shape), start, widen))
        sent.append(value)
        offset = start + value.numel() * value.element_size()
    buf = torch.empty(offset, dtype=torch.uint8).share_memory_()
    for (key, dtype, shape, start, _), value in zip(spec, sent):
        n = value.numel() * value.element_size()
        buf[start:start + n].view(dtype).view(shape).copy_(value)
    order = tuple(batch)  # key order of the original dict
    return PackedBatch((buf, tuple(spec), order))


def unpack_batch(packed) -> dict[str, torch.Tensor]:
    """The batch dict of `pack_batch` (same keys in the same order, same dtypes and shapes)."""
    buf, spec, order = packed
    got = {}
    for key, dtype, shape, start, widen in spec:
        n = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        t = buf[start:start + n].view(dtype).view(shape)
        got[key] = t if widen is None else t.to(widen)
    if "batch" in order and "batch" not in got:
        ptr = got["ptr"]
        got["batch"] = torch.repeat_interleave(torch.arange(len(ptr) - 1, dtype=torch.int64), ptr.diff())
    return {key: got[key] for key in order}
