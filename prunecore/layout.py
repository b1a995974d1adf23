"""A cluster-sorted copy of the embeddings on disk, so per-cluster work reads its rows in one
contiguous read instead of gathering them from the whole matrix.

Built out of core in bounded memory: one streamed pass appends every row (with its target
position) to the bucket of its cluster range, then each bucket (at most ``memory_limit / 2``
bytes of rows) is placed in order and written to its slot of ``rows.npy``. No file is
memory-mapped, so the resident set stays O(bucket) for any n.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from .io import atomic_write_json
from .rows import LazyRows, NpyRows, as_rows, iter_row_batches

LAYOUT_VERSION = 1


def cluster_order(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows grouped by cluster (stable: ascending row id inside a cluster) and the inverse.

    labels: (n,) ints. Returns ``order`` (n,) row ids in layout order and ``position`` (n,)
    the layout slot of each row (int32 when n < 2**31: 4 bytes per row).
    """
    order = np.argsort(labels, kind="stable")
    position = np.empty(labels.shape[0], dtype=np.int32 if labels.shape[0] < 2**31 else np.int64)
    position[order] = np.arange(labels.shape[0], dtype=position.dtype)
    return order, position


def labels_digest(labels: np.ndarray) -> str:
    """sha256 of the label array (what a layout was built for)."""
    import hashlib

    return hashlib.sha256(memoryview(np.ascontiguousarray(labels, dtype=np.int64))).hexdigest()


class ClusterSortedRows(LazyRows):
    """Rows (n, d) of ``source`` backed by a cluster-sorted copy (``folder/rows.npy``).

    ``take(rows)`` reads the layout when the rows are close together in it (e.g. one
    cluster's rows: one contiguous read) and the original ``source`` otherwise (streamed
    slices of consecutive row ids). Values are bitwise those of the source.
    """

    def __init__(self, folder: str | os.PathLike, source, labels: np.ndarray):
        self.folder = Path(folder)
        self.source = as_rows(source)
        self.labels = np.asarray(labels)
        meta = read_layout_meta(self.folder)
        if meta is None or meta.get("labels") != labels_digest(self.labels):
            raise ValueError(f"{self.folder} holds no finished layout for these cluster labels: build it first")
        self.rows_file = NpyRows(self.folder / "rows.npy")
        if self.rows_file.shape != tuple(self.source.shape) or self.rows_file.dtype != self.source.dtype:
            raise ValueError(f"{self.folder}/rows.npy does not match the source rows {self.source.shape}")
        self.shape, self.dtype = self.rows_file.shape, self.rows_file.dtype
        _, self.position = cluster_order(self.labels)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows (m,) -> array (m, d) in the order given."""
        rows = self._check(rows)
        if rows.size == 0:
            return np.empty((0, self.shape[1]), dtype=self.dtype)
        pos = self.position[rows]
        lo, hi = int(pos.min()), int(pos.max()) + 1
        if hi - lo <= 4 * rows.size:
            return self.rows_file.read_range(lo, hi)[pos - lo]
        return np.asarray(self.source[rows])


def read_layout_meta(folder: Path) -> dict | None:
    path = Path(folder) / "layout.json"
    if not path.exists():
        return None
    meta = json.loads(path.read_text())
    return meta if meta.get("version") == LAYOUT_VERSION else None


def build_cluster_layout(
    source, labels: np.ndarray, folder: str | os.PathLike, *, memory_limit: int, batch_rows: int | None = None
) -> ClusterSortedRows:
    """Write ``folder/rows.npy``: the rows of ``source`` (n, d) grouped by ``labels`` (n,).

    Reuses a finished layout built for the same labels. ``memory_limit`` (bytes) bounds the
    bucket held in memory (a quarter of it, held twice while placed) and the streamed batches (an eighth). Temporary
    bucket files live in ``folder/buckets`` and are removed at the end; ``layout.json`` is
    written last, so an interrupted build is redone.
    """
    source, labels = as_rows(source), np.asarray(labels)
    folder = Path(folder)
    if labels.shape != (source.shape[0],):
        raise ValueError(f"labels have shape {labels.shape} but the source has {source.shape[0]} rows")
    digest = labels_digest(labels)
    meta = read_layout_meta(folder)
    if meta is not None and meta.get("labels") == digest and (folder / "rows.npy").exists():
        return ClusterSortedRows(folder, source, labels)
    n, d = source.shape
    dtype = np.dtype(source.dtype)
    row_bytes = d * dtype.itemsize
    bucket_rows = max(1, memory_limit // 4 // (row_bytes + 8))  # bucket rows, placed copy, positions
    batch_rows = batch_rows or max(1, min(1 << 16, memory_limit // 8 // (row_bytes + 8)))
    _, position = cluster_order(labels)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "layout.json").unlink(missing_ok=True)
    buckets = folder / "buckets"
    shutil.rmtree(buckets, ignore_errors=True)
    buckets.mkdir()
    n_buckets = -(-n // bucket_rows)
    files = [(open(buckets / f"{b}.rows", "wb"), open(buckets / f"{b}.pos", "wb")) for b in range(n_buckets)]
    try:
        for start, batch in iter_row_batches(source, batch_rows):
            pos = position[start : start + batch.shape[0]].astype(np.int64)
            which = pos // bucket_rows
            for b in np.unique(which):
                sel = which == b
                files[b][0].write(np.ascontiguousarray(batch[sel], dtype=dtype).tobytes())
                files[b][1].write(pos[sel].tobytes())
    finally:
        for rows_f, pos_f in files:
            rows_f.close()
            pos_f.close()
    del position
    out_path = folder / "rows.npy"
    with open(out_path, "wb") as out:
        np.lib.format.write_array_header_2_0(
            out, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (n, d)}
        )
        offset = out.tell()
        for b in range(n_buckets):
            start = b * bucket_rows
            pos = np.fromfile(buckets / f"{b}.pos", dtype=np.int64) - start
            rows = np.fromfile(buckets / f"{b}.rows", dtype=dtype).reshape(-1, d)
            placed = np.empty_like(rows)
            placed[pos] = rows
            del rows
            write_at(out.fileno(), placed, offset + start * row_bytes)
            del placed
            (buckets / f"{b}.rows").unlink()
            (buckets / f"{b}.pos").unlink()
        out.flush()
        os.fsync(out.fileno())
    shutil.rmtree(buckets, ignore_errors=True)
    atomic_write_json(
        folder / "layout.json",
        {"version": LAYOUT_VERSION, "n": n, "d": d, "dtype": dtype.str, "labels": digest},
    )
    return ClusterSortedRows(folder, source, labels)


def write_at(fd: int, array: np.ndarray, offset: int) -> None:
    """Write the bytes of a C-contiguous ``array`` at ``offset`` of ``fd`` (no copy; loops
    over partial writes)."""
    view = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done : done + (1 << 30)], offset + done)
