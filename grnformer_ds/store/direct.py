"""Direct reads of an input's CSR arrays: positioned reads (``pread``) from the .h5ad file, issued inside numba.

Most .h5ad files store X/data and X/indices uncompressed (anndata's default), contiguous or in fixed-size chunks.
Then a row's entries sit at known file offsets, and a store build needs no spill of X at all:

- the scatter stage reads each row block once (`scan_block`: validate, count, library sizes) and spills only the
  small per-cell records (destination, length, ...);
- the gather stage reads each of its cells' rows straight from the input files, in shuffled order
  (`read_rows_into`: map genes to store columns, sort each row, write it at its final place in the shard's arrays).

Compared with spilling the mapped rows and reading them back, this removes a write and a read of every nonzero and
the separate reorder pass. Both kernels call libc's ``pread`` through ctypes from nopython code (no GIL, no Python
objects per row) into small buffers that stay in cache; no file is memory-mapped, so reads do not add the file's
pages to the process RSS. Inputs that cannot be read this way (compressed or filtered arrays, CSC or dense X,
big-endian, bool or float16 values, HDF5 user blocks) and row blocks that are not canonical CSR (unsorted or
duplicate column indices) go through the spill path of scatter.py instead.
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import numpy as np

from .kernels import FLAG_NEGATIVE, FLAG_NONFINITE, FLAG_NONINTEGER, FLAG_OVER_U16, HAVE_NUMBA

_VALUE_KINDS = {np.dtype(t) for t in (np.float32, np.float64, np.int8, np.int16, np.int32, np.int64, np.uint8,
                                      np.uint16, np.uint32, np.uint64)}
_INDEX_KINDS = {np.dtype(t) for t in (np.int32, np.int64, np.uint32, np.uint16, np.int16)}
_CONTIGUOUS = np.int64(1) << np.int64(62)  # "chunk length" of a contiguous dataset

_pread = None
if HAVE_NUMBA and hasattr(os, "pread"):
    try:  # libc's pread(fd, buf, count, offset), called by symbol name (so the kernels stay cacheable)
        ctypes.CDLL(None).pread  # noqa: B018 - the symbol must exist in this process
        from numba import types as _nt

        _pread = _nt.ExternalFunction("pread", _nt.intp(_nt.int32, _nt.uintp, _nt.uintp, _nt.int64))
    except (OSError, AttributeError):  # pragma: no cover - no libc symbol table
        _pread = None

AVAILABLE = _pread is not None


@dataclass
class ArrayLayout:
    """Where a 1-d HDF5 dataset's elements are in the file: element e is at byte
    ``offsets[e // chunk] + (e % chunk) * itemsize`` (one "chunk" spanning everything when contiguous)."""

    dtype: np.dtype
    offsets: np.ndarray  # (n_chunks,) int64 byte offsets, by chunk number
    chunk: int


def _layout(ds) -> ArrayLayout | None:
    """ArrayLayout of an h5py dataset whose raw bytes are the values, or None (filters, virtual/external, ...)."""
    dt = ds.dtype
    if ds.ndim != 1 or not dt.isnative:
        return None
    n = int(ds.shape[0])
    dcpl = ds.id.get_create_plist()
    try:
        if dcpl.get_nfilters() != 0 or dcpl.get_external_count() != 0:
            return None
    except Exception:  # noqa: BLE001 - an unknown property list: do not take the fast path
        return None
    off = ds.id.get_offset()
    if ds.chunks is None:
        if off is None:  # not yet allocated, compact, virtual...
            return None if n else ArrayLayout(dt, np.zeros(1, np.int64), int(_CONTIGUOUS))
        return ArrayLayout(dt, np.array([off], dtype=np.int64), int(_CONTIGUOUS))
    chunk = int(ds.chunks[0])
    n_chunks = -(-n // chunk)
    if ds.id.get_num_chunks() != n_chunks:  # unallocated chunks (fill value): not plain bytes
        return None
    offsets = np.full(n_chunks, -1, dtype=np.int64)
    for i in range(n_chunks):
        info = ds.id.get_chunk_info(i)
        c = int(info.chunk_offset[0]) // chunk
        if info.filter_mask != 0 or info.byte_offset is None or not 0 <= c < n_chunks:
            return None
        offsets[c] = int(info.byte_offset)
    if (offsets < 0).any():
        return None
    return ArrayLayout(dt, offsets, chunk)


@dataclass
class DirectSource:
    """The direct-read description of one input's count matrix (see `direct_source`)."""

    path: str
    data: ArrayLayout
    indices: ArrayLayout


def direct_source(src) -> DirectSource | None:
    """A DirectSource for an open `H5adSource` whose CSR data/indices can be pread, else None (cached per file
    version and matrix: listing a large chunked dataset's chunks costs ~1 ms per 100 chunks)."""
    if not AVAILABLE or src.format != "csr":
        return None
    st = os.stat(src.path)
    return _direct_source(src, (os.path.realpath(src.path), st.st_size, st.st_mtime_ns, st.st_ino, src._data.name,
                                src._indices.name))


_DS_CACHE: dict = {}


def _direct_source(src, key) -> DirectSource | None:
    if key in _DS_CACHE:
        return _DS_CACHE[key]
    ds = _direct_source_uncached(src)
    if len(_DS_CACHE) > 256:
        _DS_CACHE.clear()
    _DS_CACHE[key] = ds
    return ds


def _direct_source_uncached(src) -> DirectSource | None:
    try:
        if src._f.userblock_size:
            return None
        data, indices = _layout(src._data), _layout(src._indices)
    except Exception:  # noqa: BLE001 - any surprise in the HDF5 layout: use the h5py path
        return None
    if data is None or indices is None or data.dtype not in _VALUE_KINDS or indices.dtype not in _INDEX_KINDS:
        return None
    return DirectSource(src.path, data, indices)


def _read_elems(fd, offsets, chunk, isz, a, b, dst):
    """Elements [a, b) of an array with layout (offsets, chunk, isz) into the buffer at address dst."""
    pos = a
    while pos < b:
        c = pos // chunk
        seg_end = min(b, (c + 1) * chunk)
        nbytes = (seg_end - pos) * isz
        foff = offsets[c] + (pos - c * chunk) * isz
        out = dst + (pos - a) * isz
        got = 0
        while got < nbytes:
            r = _pread(fd, np.uint64(out + got), np.uint64(nbytes - got), foff + got)
            if r <= 0:
                return False
            got += r
        pos = seg_end
    return True


def _scan_block(fd, d_off, d_chunk, dbuf, i_off, i_chunk, ibuf, indptr, cmap, n_vars, row_len, lib):
    """Validate and count rows [indptr[r], indptr[r+1]) read in windows of len(dbuf) entries.

    Returns (status, flags, total): status 0 ok, 1 not canonical (unsorted/duplicate/out-of-range column, or a row
    longer than the window), -1 read error. Same flags/row_len/lib/total as kernels._count_block on the block.
    """
    n = indptr.shape[0] - 1
    W = dbuf.shape[0]
    d_isz = dbuf.itemsize
    i_isz = ibuf.itemsize
    d_ptr = np.int64(dbuf.ctypes.data)
    i_ptr = np.int64(ibuf.ctypes.data)
    end = indptr[n]
    win_a = indptr[0]
    win_b = indptr[0]
    flags = 0
    total = 0.0
    for r in range(n):
        a = indptr[r]
        b = indptr[r + 1]
        if b - a > W:
            return 1, flags, total
        if b > win_b:
            win_a = a
            win_b = min(end, a + W)
            if not _read_elems(fd, d_off, d_chunk, d_isz, win_a, win_b, d_ptr):
                return -1, flags, total
            if not _read_elems(fd, i_off, i_chunk, i_isz, win_a, win_b, i_ptr):
                return -1, flags, total
        cnt = 0
        s = 0.0
        prev = -1
        for e in range(a - win_a, b - win_a):
            j = np.int64(ibuf[e])
            if j <= prev or j >= n_vars:
                return 1, flags, total
            prev = j
            v = float(dbuf[e])
            if not np.isfinite(v):
                flags |= FLAG_NONFINITE
                continue
            if v < 0:
                flags |= FLAG_NEGATIVE
            if v != np.floor(v):
                flags |= FLAG_NONINTEGER
            total += v
            if v != 0 and cmap[j] >= 0:
                cnt += 1
                s += v
                if v > 65535.0:
                    flags |= FLAG_OVER_U16
        row_len[r] = cnt
        lib[r] = s
    return 0, flags, total


def _read_rows(fd, d_off, d_chunk, dbuf, i_off, i_chunk, ibuf, indptr, rows, out_start, out_len, cmap, n_cols,
               monotone, out_indices, out_data):
    """Input rows `rows` → store columns, sorted, at out_start[o] (out_len[o] entries expected) of the out arrays.

    Same per-row result as kernels._emit_block (the same map + bitmap sort, written out here rather than shared: numba's
    on-disk cache does not notice changes to a jitted function called from another file, and this copy also checks
    each row against out_len). Returns 0, -1 on a read error, 1 when a row's mapped length differs from out_len (the
    input changed since the scatter stage).
    """
    d_isz = dbuf.itemsize
    i_isz = ibuf.itemsize
    d_ptr = np.int64(dbuf.ctypes.data)
    i_ptr = np.int64(ibuf.ctypes.data)
    n_words = (n_cols >> 6) + 1
    bits = np.zeros(n_words, dtype=np.uint64)
    vals = np.zeros(n_cols, dtype=out_data.dtype)
    one = np.uint64(1)
    for o in range(rows.shape[0]):
        r = rows[o]
        a = indptr[r]
        b = indptr[r + 1]
        if b - a > dbuf.shape[0]:
            return 1
        if not _read_elems(fd, d_off, d_chunk, d_isz, a, b, d_ptr):
            return -1
        if not _read_elems(fd, i_off, i_chunk, i_isz, a, b, i_ptr):
            return -1
        pos = out_start[o]
        stop = pos + out_len[o]
        if monotone:
            for e in range(b - a):
                c = cmap[ibuf[e]]
                if c >= 0 and dbuf[e] != 0:
                    if pos >= stop:
                        return 1
                    out_indices[pos] = c
                    out_data[pos] = dbuf[e]
                    pos += 1
            if pos != stop:
                return 1
            continue
        lo_w = n_words
        hi_w = -1
        for e in range(b - a):
            c = cmap[ibuf[e]]
            if c >= 0 and dbuf[e] != 0:
                w = c >> 6
                bits[w] |= one << np.uint64(c & 63)
                vals[c] = dbuf[e]
                if w < lo_w:
                    lo_w = w
                if w > hi_w:
                    hi_w = w
        for w in range(lo_w, hi_w + 1):
            word = bits[w]
            if word == 0:
                continue
            bits[w] = 0
            while word != 0:
                c = (w << 6) + np.int64(_ctz(word))
                if pos < stop:
                    out_indices[pos] = c
                    out_data[pos] = vals[c]
                pos += 1
                word &= word - one  # clear the lowest set bit
        if pos != stop:
            return 1
    return 0


if AVAILABLE:
    import numba
    from numba.cpython.unsafe.numbers import trailing_zeros as _ctz  # one tzcnt instruction

    _read_elems = numba.njit(cache=True, nogil=True)(_read_elems)
    _scan_block = numba.njit(cache=True, nogil=True)(_scan_block)
    _read_rows = numba.njit(cache=True, nogil=True)(_read_rows)

_SCAN_WINDOW = 1 << 16  # entries per pread window of the scan (256 KiB of float32: stays in L2)


class OpenedSource:
    """A DirectSource with its file open (``with`` block); checks the file is the one the plan fingerprinted."""

    def __init__(self, ds: DirectSource, fingerprint: dict | None = None):
        self.ds = ds
        self.fd = os.open(ds.path, os.O_RDONLY)
        if fingerprint is not None:
            st = os.fstat(self.fd)
            if (st.st_size, st.st_mtime_ns) != (fingerprint["size"], fingerprint["mtime_ns"]):
                os.close(self.fd)
                from ..errors import UserInputError

                raise UserInputError("changed since the build was planned; rerun with --overwrite", path=ds.path)

    def __enter__(self) -> "OpenedSource":
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)

    def scan(self, indptr: np.ndarray, cmap: np.ndarray, n_vars: int):
        """(status, row_len, lib, flags, total) of the rows given by their absolute `indptr` slice (int64)."""
        n = len(indptr) - 1
        row_len = np.zeros(n, dtype=np.int64)
        lib = np.zeros(n, dtype=np.float64)
        max_len = int(np.diff(indptr).max(initial=0))
        W = max(_SCAN_WINDOW, max_len)
        d, i = self.ds.data, self.ds.indices
        dbuf = np.empty(W, dtype=d.dtype)
        ibuf = np.empty(W, dtype=i.dtype)
        status, flags, total = _scan_block(self.fd, d.offsets, d.chunk, dbuf, i.offsets, i.chunk, ibuf,
                                           np.ascontiguousarray(indptr, dtype=np.int64), cmap, n_vars, row_len, lib)
        if status < 0:
            raise OSError(f"{self.ds.path}: short read")
        return status, row_len, lib, flags, total

    def read_rows(self, indptr: np.ndarray, rows: np.ndarray, out_start: np.ndarray, out_len: np.ndarray,
                  cmap: np.ndarray, n_cols: int, monotone: bool, out_indices: np.ndarray,
                  out_data: np.ndarray) -> int:
        """Kernel `_read_rows` on this file (status: 0 ok, 1 mismatch); `indptr` is the input's whole indptr."""
        if len(rows) == 0:
            return 0
        d, i = self.ds.data, self.ds.indices
        max_len = int((indptr[rows + 1] - indptr[rows]).max())
        dbuf = np.empty(max(1, max_len), dtype=d.dtype)
        ibuf = np.empty(max(1, max_len), dtype=i.dtype)
        status = _read_rows(self.fd, d.offsets, d.chunk, dbuf, i.offsets, i.chunk, ibuf, indptr, rows, out_start,
                            out_len, cmap, n_cols, monotone, out_indices, out_data)
        if status < 0:
            raise OSError(f"{self.ds.path}: short read")
        return status
