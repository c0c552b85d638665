"""Spill files of the scatter stage: plain .npy arrays, read back by element ranges with one seek + readinto.

(`np.load(mmap_mode="r")` + copy costs a page fault per 4 KiB page; a positioned `readinto` into the destination
buffer is several times faster for the large contiguous ranges the gather stage reads.)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _header(fh) -> tuple[np.dtype, tuple[int, ...], int]:
    version = np.lib.format.read_magic(fh)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(fh)
    if fortran:
        raise ValueError("fortran-ordered spill array")
    return np.dtype(dtype), shape, fh.tell()


def spill_dtype(path: str | Path) -> np.dtype:
    with open(path, "rb") as fh:
        return _header(fh)[0]


def read_range(path: str | Path, lo: int, hi: int, out: np.ndarray | None = None) -> np.ndarray:
    """Elements [lo, hi) of a 1-d .npy file (into `out` when given, which must have hi - lo elements)."""
    with open(path, "rb", buffering=0) as fh:
        dtype, shape, offset = _header(fh)
        if out is not None and out.dtype != dtype:  # narrower spill dtype (uint16): read, then widen into out
            if out.size != hi - lo:
                raise ValueError(f"{path}: out has {out.size} elements, need {hi - lo}")
            out[...] = _read(fh, path, dtype, offset, lo, hi, np.empty(hi - lo, dtype=dtype))
            return out
        if out is None:
            out = np.empty(hi - lo, dtype=dtype)
        elif out.size != hi - lo:
            raise ValueError(f"{path}: out has {out.size} elements, need {hi - lo}")
        return _read(fh, path, dtype, offset, lo, hi, out)


def _read(fh, path, dtype: np.dtype, offset: int, lo: int, hi: int, out: np.ndarray) -> np.ndarray:
    if hi > lo:
        fh.seek(offset + lo * dtype.itemsize)
        view = memoryview(out.reshape(-1).view(np.uint8))
        got = 0
        while got < view.nbytes:
            n = fh.readinto(view[got:])
            if not n:
                raise OSError(f"{path}: truncated spill file")
            got += n
    return out
