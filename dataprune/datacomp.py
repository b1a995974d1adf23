"""DataComp interoperability: read its pool metadata, write a subset its resharder takes.

DataComp ships, per pool shard, ``{shard}.parquet`` (a ``uid`` column of 32 hex digits, plus
URL, caption and scores) and ``{shard}.npz`` (``np.savez``: ``b32_img``, ``b32_txt``,
``l14_img``, ``l14_txt`` arrays, one row per parquet row). A subset is a ``.npy`` of the
kept uids as pairs of unsigned 64-bit integers (``np.dtype("u8,u8")``: the high and the
low 16 hex digits), sorted: the file DataComp's ``resharder.py --subset_file`` reads.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from prunecore.io import atomic_path
from prunecore.rows import ChunkedRows, NpyRows

UID_DTYPE = np.dtype("u8,u8")
UID_HEX = 32


def uids_to_pairs(uids: Sequence[str] | np.ndarray, *, chunk: int = 1 << 20) -> np.ndarray:
    """Hex uid strings (n,) -> (n,) ``np.dtype("u8,u8")`` pairs (high, low 64 bits), in order.

    Raises ValueError naming the first uid that is not 32 hex digits."""
    uids = np.asarray(uids, dtype=object)
    out = np.empty(uids.shape[0], dtype=UID_DTYPE)
    for s in range(0, uids.shape[0], chunk):
        part = uids[s : s + chunk]
        lengths = np.fromiter((len(u) if isinstance(u, str) else -1 for u in part), np.int64, part.shape[0])
        bad = np.flatnonzero(lengths != UID_HEX)
        try:
            if bad.size:
                raise ValueError
            raw = np.frombuffer(bytes.fromhex("".join(part)), dtype=">u8").reshape(-1, 2)
        except ValueError:
            first = s + (int(bad[0]) if bad.size else _first_non_hex(part))
            raise ValueError(
                f"uid {uids[first]!r} at row {first} is not {UID_HEX} hex digits (DataComp uids are 128-bit hex)"
            ) from None
        out["f0"][s : s + part.shape[0]] = raw[:, 0]
        out["f1"][s : s + part.shape[0]] = raw[:, 1]
    return out


def _first_non_hex(part: np.ndarray) -> int:
    for i, u in enumerate(part):
        try:
            bytes.fromhex(u)
        except ValueError:
            return i
    return 0


def pairs_to_uids(pairs: np.ndarray) -> np.ndarray:
    """``np.dtype("u8,u8")`` pairs (n,) -> hex uid strings (n,) (object array)."""
    pairs = np.asarray(pairs, dtype=UID_DTYPE)
    return np.array([f"{int(hi):016x}{int(lo):016x}" for hi, lo in zip(pairs["f0"], pairs["f1"])], dtype=object)


def datacomp_shards(metadata) -> list[tuple[Path, Path]]:
    """``(parquet, npz)`` pairs of a DataComp metadata folder, a glob or a list of parquet
    files (each with an ``.npz`` of the same stem beside it), in natural file order."""
    if isinstance(metadata, (str, os.PathLike)):
        spec = os.fspath(metadata)
        paths = sorted(Path(spec).glob("*.parquet")) if os.path.isdir(spec) else sorted(map(Path, glob.glob(spec)))
    else:
        paths = [Path(p) for p in metadata]
    if not paths:
        raise FileNotFoundError(f"no DataComp metadata .parquet files in {metadata!r}")
    pairs = []
    for parquet in paths:
        npz = parquet.with_suffix(".npz")
        if not npz.exists():
            raise FileNotFoundError(f"{parquet} has no embeddings file beside it ({npz.name} missing)")
        pairs.append((parquet, npz))
    return pairs


def open_datacomp(metadata, *, embedding: str = "b32_img", uid_column: str = "uid"):
    """Embeddings and uids of a DataComp pool, without loading the embeddings.

    Returns ``rows`` ((n, d) row source reading the ``embedding`` array of each ``.npz`` in
    place) and ``uids`` ((n,) ``np.dtype("u8,u8")``, row order). Row counts of each parquet
    and its array must agree; repeated uids raise.
    """
    chunks, uid_parts = [], []
    for parquet, npz in datacomp_shards(metadata):
        names = pq.ParquetFile(parquet).schema_arrow.names
        if uid_column not in names:
            raise ValueError(f"{parquet} has no {uid_column!r} column (columns: {names[:12]})")
        uids = pq.read_table(parquet, columns=[uid_column]).column(uid_column).to_numpy(zero_copy_only=False)
        rows = NpyRows(npz, embedding)
        if rows.shape[0] != uids.shape[0]:
            raise ValueError(
                f"mismatched counts: {npz}[{embedding}] has {rows.shape[0]} rows but {parquet} {len(uids)}"
            )
        chunks.append(rows)
        uid_parts.append(uids_to_pairs(uids))
    uids = np.concatenate(uid_parts)
    ordered = np.sort(uids)
    repeated = np.flatnonzero(ordered[1:] == ordered[:-1])
    if repeated.size:
        raise ValueError(f"uid {pairs_to_uids(ordered[repeated[:1]])[0]} appears more than once in the metadata")
    return (chunks[0] if len(chunks) == 1 else ChunkedRows(chunks)), uids


def write_subset(path: str | os.PathLike, uids: np.ndarray, keep: np.ndarray) -> int:
    """Write the kept ``uids`` ((n,) u8,u8 pairs; ``keep`` (n,) bool) as DataComp's sorted
    subset ``.npy``, atomically. Returns the number of uids written."""
    uids, keep = np.asarray(uids, dtype=UID_DTYPE), np.asarray(keep, dtype=bool)
    if keep.shape != uids.shape:
        raise ValueError(f"keep mask {keep.shape} does not match the uids {uids.shape}")
    subset = np.sort(uids[keep])
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, subset)
    return int(subset.shape[0])


def read_subset(path: str | os.PathLike) -> np.ndarray:
    """A DataComp subset ``.npy``: (m,) u8,u8 pairs, checked sorted and of that dtype."""
    subset = np.load(path, allow_pickle=False)
    if subset.dtype != UID_DTYPE or subset.ndim != 1:
        raise ValueError(f"{path} is not a DataComp subset (need a 1-D np.dtype('u8,u8') array, got {subset.dtype})")
    hi, lo = subset["f0"], subset["f1"]
    if subset.size > 1 and not ((hi[1:] > hi[:-1]) | ((hi[1:] == hi[:-1]) & (lo[1:] >= lo[:-1]))).all():
        raise ValueError(f"{path}: uids are not sorted (DataComp's resharder needs them sorted)")
    return subset
