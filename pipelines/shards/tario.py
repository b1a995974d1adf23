"""Tar I/O of webdataset shards: expand shard specs, stream raw samples, write byte-identical copies.

A webdataset shard is a tar file whose members ``<key>.<ext>`` are grouped into samples by
key (the member name up to the first dot of its basename, as webdataset does). This module
reads tars with :mod:`tarfile` (no decoding), so every member of a sample keeps its exact
bytes and tar header fields, and writes tars deterministically (same input -> same output
bytes), one output shard at a time through a temporary file + rename.
"""

from __future__ import annotations

import glob
import io
import os
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff", "gif")
TEXT_EXTS = ("txt", "caption", "text")
TAR_BLOCK = 512


class ShardError(ValueError):
    """A shard cannot be read as a webdataset tar (corrupt, truncated, duplicate keys)."""


@dataclass
class RawSample:
    """One sample as stored: ``members`` maps extension -> (TarInfo, bytes) in tar order."""

    key: str
    shard: str
    index: int  # position of the sample inside its shard
    members: dict[str, tuple[tarfile.TarInfo, bytes]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes the sample occupies in a plain tar (headers + padded data)."""
        return sum(tar_member_size(info.size) for info, _ in self.members.values())

    def get(self, exts: Sequence[str]) -> tuple[str, bytes] | None:
        """First member whose extension (lower-cased) is in ``exts``: (ext, bytes) or None."""
        for ext, (_, data) in self.members.items():
            if ext.lower() in exts:
                return ext, data
        return None


@dataclass
class ShardScan:
    """What reading one shard found: the samples (streamed) and problems met on the way."""

    shard: str
    n_samples: int = 0
    error: str | None = None  # corrupt/truncated tar: the message; samples before it stand
    skipped_members: int = 0  # members without an extension (ignored, like webdataset)


def tar_member_size(size: int) -> int:
    """Bytes one regular member of ``size`` data bytes takes in a tar (header + padding)."""
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


def expand_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Local shard paths from a brace pattern (``"d/{00000..00099}.tar"``), glob, ``file://``
    URL, or a list of those. Order is preserved (a list keeps the given order; a glob is
    sorted). Raises FileNotFoundError naming the pattern when nothing matches or a listed
    file is missing; other URL schemes raise ValueError (copy remote shards locally first).
    """
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not items:
        raise FileNotFoundError("no shards matched: the shard list is empty")
    out: list[str] = []
    for item in items:
        text = os.fspath(item)
        if text.startswith("file://"):
            text = text[len("file://") :]
        elif re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", text):
            raise ValueError(
                f"unsupported shard URL {text!r}: only local files (or file://) are read; download remote shards first"
            )
        for path in braceexpand.braceexpand(text):
            if glob.has_magic(path):
                matched = sorted(glob.glob(path))
                if not matched:
                    raise FileNotFoundError(f"no shards matched {path!r}")
                out.extend(matched)
            elif not os.path.isfile(path):
                raise FileNotFoundError(f"no shards matched: {path!r} does not exist (from {os.fspath(item)!r})")
            else:
                out.append(path)
    if not out:
        raise FileNotFoundError(f"no shards matched {spec!r}")
    return out


_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def split_member_name(name: str) -> tuple[str, str] | None:
    """``"dir/abc.seg.jpg"`` -> ``("dir/abc", "seg.jpg")``; None without an extension."""
    m = _KEY_RE.match(name)
    return (m.group(1), m.group(2)) if m else None


def _keyed_members(tar: tarfile.TarFile, scan: ShardScan) -> Iterator[tuple[tarfile.TarInfo, str, str]]:
    """``(info, key, ext)`` for the regular members of an open tar; members without an
    extension are counted in ``scan.skipped_members`` and skipped."""
    for info in tar:
        if not info.isreg():
            continue
        parts = split_member_name(info.name)
        if parts is None:
            scan.skipped_members += 1
            continue
        yield info, parts[0], parts[1]


def iter_shard(shard: str, scan: ShardScan | None = None) -> Iterator[RawSample]:
    """Stream the samples of one shard in tar order, bytes untouched.

    A corrupt or truncated tar stops the stream: the samples read before the damage are
    yielded (the incomplete last one is dropped) and ``scan.error`` names the problem, so the
    caller decides whether that is fatal. A key that reappears after another key (members of
    a sample not contiguous) raises :class:`ShardError`.
    """
    scan = scan if scan is not None else ShardScan(shard)
    seen: set[str] = set()
    current: RawSample | None = None
    index = 0
    try:
        with tarfile.open(shard, mode="r:*") as tar:
            for info, key, ext in _keyed_members(tar, scan):
                data = tar.extractfile(info).read()
                if len(data) != info.size:
                    raise tarfile.ReadError(f"member {info.name} truncated")
                if current is None or key != current.key:
                    if current is not None:
                        yield current
                        index += 1
                        scan.n_samples = index
                    if key in seen:
                        raise ShardError(
                            f"duplicate key {key!r} in shard {shard}: its members are not contiguous or the key repeats"
                        )
                    seen.add(key)
                    current = RawSample(key=key, shard=shard, index=index)
                if ext in current.members:
                    raise ShardError(f"duplicate member {info.name!r} in shard {shard}")
                current.members[ext] = (info, data)
            _check_tar_end(tar, shard)
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        if isinstance(exc, ShardError):
            raise
        scan.error = f"corrupt tar {shard}: {type(exc).__name__}: {exc} (after {index} samples)"
        return
    if current is not None:
        yield current
        scan.n_samples = index + 1


def _check_tar_end(tar: tarfile.TarFile, shard: str) -> None:
    """tarfile stops silently at a damaged header after the first member: for plain tars,
    require that only zero blocks (the end-of-archive marker + padding) follow."""
    if getattr(tar.fileobj, "name", None) is None or shard.endswith((".gz", ".bz2", ".xz")):
        return
    size = os.path.getsize(shard)
    clean = size - tar.offset >= 2 * TAR_BLOCK
    with open(shard, "rb") as fh:
        fh.seek(tar.offset)
        while clean and (block := fh.read(1 << 20)):
            clean = block.count(0) == len(block)
    if not clean:
        raise tarfile.ReadError(f"damaged or truncated at byte {tar.offset} of {size}")


def iter_shard_headers(shard: str, scan: ShardScan | None = None) -> Iterator[tuple[str, int, int]]:
    """``(key, index, nbytes)`` per sample from tar headers only (data is seeked over)."""
    scan = scan if scan is not None else ShardScan(shard)
    key, index, nbytes = None, -1, 0
    try:
        with tarfile.open(shard, mode="r:*") as tar:
            for info, member_key, _ in _keyed_members(tar, scan):
                if member_key != key:
                    if key is not None:
                        yield key, index, nbytes
                    key, index, nbytes = member_key, index + 1, 0
                nbytes += tar_member_size(info.size)
            _check_tar_end(tar, shard)
    except (tarfile.TarError, EOFError, OSError) as exc:
        scan.error = f"corrupt tar {shard}: {type(exc).__name__}: {exc}"
        return
    if key is not None:
        yield key, index, nbytes
    scan.n_samples = index + 1


def copy_tarinfo(info: tarfile.TarInfo, size: int) -> tarfile.TarInfo:
    """A fresh regular-file header with the input's name, mtime, mode and owner."""
    out = tarfile.TarInfo(info.name)
    out.size = size
    out.mtime = int(info.mtime)
    out.mode = info.mode
    out.uid, out.gid = info.uid, info.gid
    out.uname, out.gname = info.uname, info.gname
    return out


def add_sample(tar: tarfile.TarFile, sample: RawSample) -> None:
    """Append every member of ``sample`` to an open tar, with its input header fields
    (name, size, mtime, mode, owner) and exact bytes."""
    for info, data in sample.members.values():
        tar.addfile(copy_tarinfo(info, len(data)), io.BytesIO(data))


def write_tar(path: str | os.PathLike, samples: Iterable[RawSample]) -> tuple[int, int]:
    """Write samples to a plain tar at ``path`` (:func:`add_sample` each). Deterministic.
    Returns (samples, bytes).

    The result is a valid webdataset shard (``webdataset.WebDataset`` reads it back).
    """
    count = 0
    with open(path, "wb") as fh:
        with tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for sample in samples:
                add_sample(tar, sample)
                count += 1
        size = fh.tell()
    return count, size


def plan_output_shards(nbytes: Sequence[int], *, max_count: int, max_size: int) -> list[int]:
    """Output shard number for each kept sample (in stream order), ``ShardWriter`` rules:
    start a new shard before a sample when the current one already holds ``max_count``
    samples or ``max_size`` bytes (so a shard may exceed max_size by one sample)."""
    if max_count < 1 or max_size < 1:
        raise ValueError(f"max_count and max_size must be >= 1, got {max_count}, {max_size}")
    out, shard, count, size = [], 0, 0, 0
    for b in nbytes:
        if count and (count >= max_count or size >= max_size):
            shard, count, size = shard + 1, 0, 0
        out.append(shard)
        count += 1
        size += int(b)
    return out


def file_fingerprint(paths: Iterable[str | os.PathLike]) -> list[list]:
    """Cheap identity of input files: (absolute path, size, mtime_ns) each."""
    out = []
    for p in paths:
        st = os.stat(p)
        out.append([str(Path(p).resolve()), st.st_size, st.st_mtime_ns])
    return out
