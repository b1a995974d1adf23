"""Row sources: one interface over in-memory arrays, ``.npy`` memmaps and chunked files.

Every streaming stage (normalisation, assignment, scoring) reads rows through
:func:`as_rows`, so memory stays O(batch) whatever the dataset size.
"""

from __future__ import annotations

import glob
import os
import struct
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np


class LazyRows:
    """Base of read-only row views: ``shape``/``dtype``/``ndim``, ``rows[idx]`` via ``take``."""

    shape: tuple[int, int]
    dtype: np.dtype
    ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, slice):
            return self.take(np.arange(*index.indices(self.shape[0])))
        return self.take(np.asarray(index))

    def take(self, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _check(self, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise IndexError(f"row index out of range [0, {self.shape[0]})")
        return rows


class RowSubset(LazyRows):
    """The rows ``rows`` (m,) of a row source, read only when asked: shape (m, d).

    Lets a later stage (e.g. DBP after SemDeDup) run on survivors without copying them.
    """

    def __init__(self, source, rows: np.ndarray):
        self.source = as_rows(source)
        self.rows = np.asarray(rows, dtype=np.int64)
        if self.rows.ndim != 1:
            raise ValueError(f"rows must be 1-D, got shape {self.rows.shape}")
        if self.rows.size and (self.rows.min() < 0 or self.rows.max() >= self.source.shape[0]):
            raise IndexError(f"row index out of range [0, {self.source.shape[0]})")
        self.shape = (int(self.rows.shape[0]), int(self.source.shape[1]))
        self.dtype = self.source.dtype

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows (k,) of the subset -> array (k, d) in the order given."""
        return np.asarray(self.source[self.rows[self._check(rows)]])


class ChunkedRows(LazyRows):
    """Read-only concatenation of 2-D ``.npy`` chunks (opened as memmaps) along rows.

    Shapes: chunk i is (n_i, d); the whole is (sum n_i, d). Only the rows asked for are read.
    """

    def __init__(self, chunks: Sequence[np.ndarray]):
        if not chunks:
            raise ValueError("no embedding chunks given")
        dims = {c.shape[1] if c.ndim == 2 else None for c in chunks}
        if None in dims or len(dims) != 1:
            raise ValueError(f"embedding chunks must all be 2-D with one width, got shapes {[c.shape for c in chunks]}")
        self.chunks = list(chunks)
        self.offsets = np.concatenate([[0], np.cumsum([c.shape[0] for c in chunks])])
        self.shape = (int(self.offsets[-1]), dims.pop())
        self.dtype = np.result_type(*[c.dtype for c in chunks])

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows (m,) -> array (m, d) in the order given."""
        rows = self._check(rows)
        out = np.empty((rows.shape[0], self.shape[1]), dtype=self.dtype)
        chunk_of = np.searchsorted(self.offsets, rows, side="right") - 1
        for c in np.unique(chunk_of):
            sel = chunk_of == c
            out[sel] = self.chunks[c][rows[sel] - self.offsets[c]]
        return out


class NpyRows(LazyRows):
    """A 2-D C-ordered ``.npy`` file read with ``os.pread`` (no memory map): shape (n, d).

    Rows read are copied into fresh arrays and the file's pages stay in the OS page cache,
    outside this process's resident set, so streaming a file larger than memory keeps the
    peak RSS at O(batch) (a memmap would count every touched page as resident).
    ``member``: a ``.npy`` member of an uncompressed ``.npz`` (``np.savez``), read in place.
    """

    def __init__(self, path: str | os.PathLike, member: str | None = None):
        self.path, self.member = Path(path), member
        start = 0 if member is None else npz_member_offset(self.path, member)
        with open(self.path, "rb") as f:
            f.seek(start)
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(f, max_header_size=1 << 20)
            self.offset = f.tell()
        name = self.path if member is None else f"{self.path}[{member}]"
        if len(shape) != 2:
            raise ValueError(f"{name}: embeddings must be 2-D (n, d), got shape {shape}")
        if fortran or dtype.hasobject:
            raise ValueError(f"{name}: need a C-ordered numeric array, re-save it with np.save")
        self.shape, self.dtype = (int(shape[0]), int(shape[1])), np.dtype(dtype)
        self.row_bytes = self.shape[1] * self.dtype.itemsize
        self.fd = os.open(self.path, os.O_RDONLY)

    def __del__(self):
        fd = getattr(self, "fd", None)
        if fd is not None:
            os.close(fd)

    def __getstate__(self):  # picklable (Ray tasks): reopened by path
        return {"path": self.path, "member": self.member}

    def __setstate__(self, state):
        self.__init__(state["path"], state["member"])

    def read_range(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as a new array (stop - start, d), one read."""
        count = max(0, stop - start)
        out = np.empty((count, self.shape[1]), dtype=self.dtype)
        view, done = memoryview(out.reshape(-1).view(np.uint8)), 0
        while done < count * self.row_bytes:
            got = os.preadv(self.fd, [view[done:]], self.offset + start * self.row_bytes + done)
            if got == 0:
                raise OSError(f"{self.path} is shorter than its header says ({self.shape})")
            done += got
        return out

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows (m,) -> array (m, d) in the order given: one read per run of consecutive ids
        when the rows are dense, one per row when sparse."""
        rows = self._check(rows)
        if rows.size == 0:
            return np.empty((0, self.shape[1]), dtype=self.dtype)
        lo, hi = int(rows.min()), int(rows.max()) + 1
        if hi - lo <= 4 * rows.size:  # dense: read the covering range once
            return self.read_range(lo, hi)[rows - lo]
        out = np.empty((rows.size, self.shape[1]), dtype=self.dtype)
        for i, r in enumerate(rows.tolist()):
            out[i] = self.read_range(r, r + 1)[0]
        return out


def npz_member_offset(path: Path, member: str) -> int:
    """Byte offset of the ``member`` (``"b32_img"`` or ``"b32_img.npy"``) array inside an
    uncompressed ``.npz``; a compressed member raises (it cannot be read in place)."""
    name = member if member.endswith(".npy") else f"{member}.npy"
    with zipfile.ZipFile(path) as archive:
        try:
            info = archive.getinfo(name)
        except KeyError:
            raise ValueError(f"{path} has no array {member!r} (arrays: {archive.namelist()})") from None
        if info.compress_type != zipfile.ZIP_STORED:
            raise ValueError(f"{path}[{member}] is compressed (np.savez_compressed): re-save with np.savez")
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)  # local file header: name and extra-field lengths at bytes 26-29
        name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len


def open_embeddings(source, *, mmap: bool = True) -> np.ndarray | LazyRows:
    """Open precomputed embeddings without loading them.

    ``source``: an array (returned as is), a path to one ``.npy``, or a list of ``.npy``
    paths (a :class:`ChunkedRows`). A directory means its ``*.npy`` files, sorted; a glob
    pattern (``"emb/img_emb_*.npy"``) the files it matches, sorted.
    ``mmap=True`` opens files as memmaps; ``False`` as :class:`NpyRows` (explicit reads:
    the file's pages never count in this process's resident memory).
    """
    if isinstance(source, (np.ndarray, LazyRows)):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists() and glob.has_magic(str(source)):
            paths = sorted(glob.glob(str(source)))
            if not paths:
                raise FileNotFoundError(f"no file matches the pattern {source}")
            return open_embeddings(paths, mmap=mmap)
        if path.is_dir():
            paths = sorted(path.glob("*.npy"))
            if not paths:
                raise FileNotFoundError(f"no .npy files in {path}")
            return open_embeddings(paths, mmap=mmap)
        return _open_npy(path, mmap)
    paths = list(source)
    if len(paths) == 1:
        return _open_npy(Path(paths[0]), mmap)
    return ChunkedRows([_open_npy(Path(p), mmap) for p in paths])


def _open_npy(path: Path, mmap: bool = True) -> np.ndarray | NpyRows:
    if not path.exists():
        raise FileNotFoundError(f"embedding file not found: {path}")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False) if mmap else NpyRows(path)
    except ValueError as exc:
        raise ValueError(f"{path} is not a readable .npy array: {exc}") from exc
    if arr.ndim != 2:
        raise ValueError(f"{path}: embeddings must be 2-D (n, d), got shape {arr.shape}")
    return arr


def unmapped(rows):
    """The same rows read with ``pread`` instead of through a memory map: a ``.npy`` memmap
    (whole file) becomes a :class:`NpyRows`, a :class:`ChunkedRows` of them a ChunkedRows of
    NpyRows; anything else is returned as is. Values are bitwise the same."""
    if isinstance(rows, ChunkedRows):
        chunks = [unmapped(c) for c in rows.chunks]
        return rows if all(a is b for a, b in zip(chunks, rows.chunks)) else ChunkedRows(chunks)
    if isinstance(rows, np.memmap) and getattr(rows, "filename", None) and str(rows.filename).endswith(".npy"):
        try:
            file_rows = NpyRows(rows.filename)
        except (OSError, ValueError):
            return rows
        if file_rows.shape == rows.shape and file_rows.dtype == rows.dtype and file_rows.offset == rows.offset:
            return file_rows
    return rows


def as_rows(x) -> np.ndarray | LazyRows:
    """Validate a row source: 2-D, floating, non-empty width. Lists become arrays."""
    if not isinstance(x, (np.ndarray, LazyRows)):
        if hasattr(x, "detach"):  # torch tensor
            x = x.detach().cpu().numpy()
        else:
            x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (n, d), got shape {tuple(x.shape)}")
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"embeddings must be floating point, got dtype {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError("embeddings have zero width (d = 0)")
    return x


def iter_row_batches(x, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, rows[start:start+batch_size])`` over a row source."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = x.shape[0]
    for start in range(0, n, batch_size):
        yield start, np.asarray(x[start : min(start + batch_size, n)])


def batched(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of ``size`` items (the last one shorter) from any iterable, lazily."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
