"""Tar I/O of webdataset shards: expand shard specs, stream raw samples, write byte-identical copies.

A webdataset shard is a tar file whose members ``<key>.<ext>`` are grouped into samples by
key (the member name up to the first dot of its basename, as webdataset does; ``a.b.jpg`` is
member ``b.jpg`` of key ``a``, and an image by its last extension). Members that are not
regular files (symlinks, devices) carry no data: they are counted, and a sample made only of
them gets status ``no_image``. A name that is not UTF-8 gives the sample status
``non_utf8_name`` under a printable key (``\\xNN`` escapes); names that could escape a folder
when extracted (``../``, absolute) are kept byte-identical but counted. This module
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
# per-sample statuses decided from the tar alone (before any decoding)
NO_IMAGE = "no_image"  # only symlink/device/other non-regular members
NON_UTF8_NAME = "non_utf8_name"  # member name not valid UTF-8 (key shown with \xNN escapes)
NAME_COUNTERS = ("skipped_members", "special_members", "non_utf8_names", "unsafe_names")  # ShardScan counts


class ShardError(ValueError):
    """A shard cannot be read as a webdataset tar (corrupt, truncated, duplicate keys)."""


@dataclass
class RawSample:
    """One sample as stored: ``members`` maps extension -> (TarInfo, bytes) in tar order."""

    key: str
    shard: str
    index: int  # position of the sample inside its shard
    members: dict[str, tuple[tarfile.TarInfo, bytes]] = field(default_factory=dict)
    special: list[tarfile.TarInfo] = field(default_factory=list)  # non-regular members (no data)
    utf8_name: bool = True  # False: a member name was not UTF-8 (``key`` shows it escaped)

    @property
    def nbytes(self) -> int:
        """Bytes the sample occupies in a plain tar (headers + padded data)."""
        return sum(tar_member_size(info.size) for info, _ in self.members.values())

    def get(self, exts: Sequence[str]) -> tuple[str, bytes] | None:
        """The member whose extension (lower-cased) is in ``exts``, else the first whose last
        extension is (``b.jpg`` of ``a.b.jpg``, as webdataset decodes it): (ext, bytes) or None."""
        for whole in (True, False):
            for ext, (_, data) in self.members.items():
                if (ext if whole else ext.rsplit(".", 1)[-1]).lower() in exts:
                    return ext, data
        return None


@dataclass
class ShardScan:
    """What reading one shard found: the samples (streamed) and problems met on the way."""

    shard: str
    n_samples: int = 0
    error: str | None = None  # corrupt/truncated tar: the message; samples before it stand
    skipped_members: int = 0  # members without an extension (ignored, like webdataset)
    special_members: int = 0  # symlinks, devices, ... (not copied: no data)
    non_utf8_names: int = 0  # member names that are not valid UTF-8
    unsafe_names: int = 0  # member names with ``..`` parts or absolute paths
    examples: list[str] = field(default_factory=list)  # the first few problem names, for messages

    def note(self, counter: str, name: str) -> None:
        """Count one problem member and keep its name (first 5) for the report."""
        setattr(self, counter, getattr(self, counter) + 1)
        if len(self.examples) < 5:
            self.examples.append(f"{counter[:-1].replace('_', ' ')}: {name!r} in {self.shard}")

    def counters(self) -> dict:
        """JSON-able summary (stored with each embedded chunk)."""
        return {k: getattr(self, k) for k in ("error", *NAME_COUNTERS, "examples")}


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


def printable_name(name: str) -> tuple[str, bool]:
    """A member name as tarfile decoded it (undecodable bytes as surrogates) -> (the name with
    ``\\xNN`` escapes for those bytes, whether it was valid UTF-8)."""
    try:
        name.encode("utf-8")
        return name, True
    except UnicodeEncodeError:
        raw = name.encode("utf-8", "surrogateescape")
        return raw.decode("utf-8", "backslashreplace"), False


def is_unsafe_name(name: str) -> bool:
    """Whether extracting ``name`` could write outside the target folder (absolute, ``..``)."""
    return name.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", name)


def _keyed_members(tar: tarfile.TarFile, scan: ShardScan) -> Iterator[tuple[tarfile.TarInfo, str, str, bool]]:
    """``(info, key, ext, utf8)`` for the file members of an open tar (regular or special;
    folders skipped). Members without an extension are counted in ``scan.skipped_members``
    and skipped, like webdataset; special, non-UTF-8 and unsafe names are counted."""
    for info in tar:
        if info.isdir():
            continue
        name, utf8 = printable_name(info.name)
        parts = split_member_name(name)
        if parts is None:
            scan.skipped_members += 1
            continue
        if not utf8:
            scan.note("non_utf8_names", name)
        if is_unsafe_name(name):
            scan.note("unsafe_names", name)
        if not info.isreg():
            scan.note("special_members", name)
        yield info, parts[0], parts[1], utf8


def sample_problem(sample: RawSample) -> str | None:
    """The status a sample gets from its tar members alone: NON_UTF8_NAME, NO_IMAGE or None."""
    if not sample.utf8_name:
        return NON_UTF8_NAME
    return NO_IMAGE if not sample.members else None


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
            for info, key, ext, utf8 in _keyed_members(tar, scan):
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
                current.utf8_name = current.utf8_name and utf8
                if not info.isreg():
                    current.special.append(info)
                    continue
                if ext in current.members:
                    raise ShardError(f"duplicate member {key}.{ext} in shard {shard}")
                data = tar.extractfile(info).read()
                if len(data) != info.size:
                    raise tarfile.ReadError(f"member {key}.{ext} truncated")
                current.members[ext] = (info, data)
            _check_tar_end(tar, shard)
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        if isinstance(exc, ShardError):
            raise
        scan.error = f"{tar_problem(shard, exc)} (after {index} samples)"
        return
    if current is not None:
        yield current
        scan.n_samples = index + 1


def tar_problem(shard: str, exc: BaseException) -> str:
    """One line naming ``shard`` and what is wrong with it, for an exception met reading it:
    an empty file, a file that is not a tar at all, or a tar damaged part way."""
    try:
        size = os.path.getsize(shard)
    except OSError:
        size = None
    if size == 0:
        return f"corrupt tar {shard}: an empty file (0 bytes), not a tar: replace it or leave it out"
    detail = " ".join(str(exc).split())  # tarfile's messages can span lines (one per method tried)
    if isinstance(exc, tarfile.ReadError) and "could not be opened" in detail:
        return f"corrupt tar {shard}: not a tar file (no valid tar header at its start): replace it or leave it out"
    return f"corrupt tar {shard}: {type(exc).__name__}: {detail}"


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
            for info, member_key, _, _ in _keyed_members(tar, scan):
                if member_key != key:
                    if key is not None:
                        yield key, index, nbytes
                    key, index, nbytes = member_key, index + 1, 0
                nbytes += tar_member_size(info.size) if info.isreg() else 0
            _check_tar_end(tar, shard)
    except (tarfile.TarError, EOFError, OSError) as exc:
        scan.error = tar_problem(shard, exc)
        return
    if key is not None:
        yield key, index, nbytes
    scan.n_samples = index + 1


def scan_headers(shards: Sequence[str], *, strict: bool = False, progress: bool = False) -> list[ShardScan]:
    """Read the tar headers of every shard (data is seeked over, nothing decoded) before any
    work: raise :class:`ShardError` for a key that occurs twice (across or inside shards),
    naming the key and its shards; with ``strict``, also for a corrupt tar, a non-UTF-8 or
    unsafe (``../``, absolute) member name, or a sample without a regular member.
    Returns one :class:`ShardScan` per shard (its counters)."""
    import pyarrow as pa
    from tqdm.auto import tqdm

    scans, keys = [], []
    for shard in tqdm(shards, desc="scan tar headers", unit="shard", disable=not progress):
        scan = ShardScan(shard)
        names = []
        for key, _, nbytes in iter_shard_headers(shard, scan):
            names.append(key)
            if strict and nbytes == 0:
                raise ShardError(f"sample {key!r} in {shard} has no regular member (only links/devices): no image")
        if strict and (scan.error or scan.non_utf8_names or scan.unsafe_names):
            raise ShardError(
                scan.error
                or f"--strict: {'; '.join(scan.examples[:3])} (rename the members, or drop --strict to count them)"
            )
        scans.append(scan)
        keys.append(pa.array(names, type=pa.string()))
    check_unique_keys(pa.chunked_array(keys, type=pa.string()), shards)
    return scans


def check_unique_keys(keys, sources: Sequence[str]) -> None:
    """Raise :class:`ShardError` when a key occurs twice. ``keys``: a pyarrow ChunkedArray of
    strings with one chunk per source (shard or metadata file) in ``sources``; the message
    names a few repeated keys and their sources. Sorting runs in Arrow (no Python object per key)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if len(keys) < 2:
        return
    # sort, then compare neighbours: ~30 bytes per key of scratch (a hash table takes ~150)
    ordered = pc.take(keys, pc.sort_indices(keys))
    repeated = pc.equal(ordered.slice(1), ordered.slice(0, len(ordered) - 1))
    if not pc.any(repeated).as_py():
        return
    dup = pc.unique(pc.filter(ordered.slice(1), repeated))
    probe = pa.array(dup[:3].to_pylist(), type=keys.type)
    files = [src for src, chunk in zip(sources, keys.chunks) if pc.any(pc.is_in(chunk, value_set=probe)).as_py()]
    firsts = ", ".join(repr(k) for k in probe.to_pylist())
    raise ShardError(
        f"duplicate keys: {len(dup)} key(s) occur more than once (e.g. {firsts} in {', '.join(files[:4])}); "
        "keys must be unique: rename them or leave the repeated file out"
    )


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
