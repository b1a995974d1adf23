"""The embed stage: decode images from shards and embed them, one chunk per input shard.

Artifact (``OUT/embed/``): ``chunks/{i}.img.npy`` (+ ``.txt.npy``) and ``chunks/{i}.keys.parquet``
per input shard, ``keys.parquet`` (every sample, input order), ``embeddings.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from prunecore.io import atomic_write_json, json_digest
from prunecore.rows import ChunkedRows

from .decode import TOO_LARGE, DecodeOptions, make_decoder
from .decode import decode_image as decode_image  # re-exported (the report's thumbnails)
from .stage import (
    MISSING_IMAGE,
    STATUS_OK,
    UNDECODABLE,
    VERSION,
    PipelineError,
    Stage,
    die_hook,
    is_owned_file,
    read_parquet,
    save_npy,
    save_parquet,
)
from .tario import (
    IMAGE_EXTS,
    NAME_COUNTERS,
    NO_IMAGE,
    NON_UTF8_NAME,
    TEXT_EXTS,
    ShardScan,
    file_fingerprint,
    iter_shard,
    sample_problem,
)
from .threads import compute_threads, resolve_threads


@dataclass
class EmbedArtifact:
    """Embeddings (row sources over memmaps) + the sample table in input order.

    keys: one row per sample read: ``key, shard, shard_idx, index, nbytes, status, row``
    (``row`` = embedding row, -1 when the sample has none; ``status`` is ``"ok"`` or the
    reason it has no embedding). images/texts: (n_ok, d) row sources (texts may be None).
    """

    dir: Path
    keys: pd.DataFrame
    images: np.ndarray | ChunkedRows
    texts: np.ndarray | ChunkedRows | None
    shards: list[str]
    fingerprint: str

    @property
    def n_rows(self) -> int:
        return int(self.images.shape[0])


def _open_rows(paths: list[Path]):
    arrays = [np.load(p, mmap_mode="r", allow_pickle=False) for p in paths]
    arrays = [a for a in arrays if a.shape[0] > 0]
    if not arrays:
        raise PipelineError("no sample produced an embedding (all missing or undecodable)")
    return arrays[0] if len(arrays) == 1 else ChunkedRows(arrays)


def load_embed_artifact(stage_dir: Path, fingerprint: str, keys: pd.DataFrame | None = None) -> EmbedArtifact:
    """The embed stage's artifact; ``keys``: the sample table when the caller holds it already."""
    index = json.loads((stage_dir / "embeddings.json").read_text())
    keys = read_parquet(stage_dir / "keys.parquet") if keys is None else keys

    def resolve(p):
        return Path(p) if os.path.isabs(p) else stage_dir / p

    images = _open_rows([resolve(p) for p in index["images"]])
    texts = _open_rows([resolve(p) for p in index["texts"]]) if index.get("texts") else None
    n_ok = int((keys["row"] >= 0).sum())
    if images.shape[0] != n_ok or (texts is not None and texts.shape[0] != n_ok):
        raise PipelineError(f"{stage_dir}: {images.shape[0]} embedding rows but {n_ok} keys with an embedding")
    return EmbedArtifact(stage_dir, keys, images, texts, index.get("shards", []), fingerprint)


SHARD_END = "\x00shard-end"  # an item key that closes the current encoder batch (a shard boundary)
DECODE_CHUNK = 32  # images per decode task


@dataclass
class EmbeddedBatch:
    """A run of consecutive input samples and the embeddings of those that decoded.

    keys, status, errors: (n,) per sample in input order (``status`` ``"ok"`` or why it has
    no embedding; ``errors`` the message, None when ok). embeddings: (n_ok, d) float32 rows of
    the ``ok`` samples in order, or None when none of them decoded. slots: (n_ok,) the encoder
    batch slot of each ``ok`` sample (see :func:`encode_in_slots`). end: the run ends at a
    :data:`SHARD_END` item.
    """

    keys: list
    status: list
    errors: list
    embeddings: np.ndarray | None
    end: bool = False
    slots: list = field(default_factory=list)


def encode_in_slots(encode, items: Sequence, slots: Sequence[int], batch_size: int) -> np.ndarray:
    """``encode`` one fixed-shape batch: item ``j`` in slot ``slots[j]`` of ``batch_size``
    slots, the empty slots filled with copies of ``items[0]``; returns the rows of ``items``
    (len(items), d) float32, in their order.

    The encoder always sees ``batch_size`` rows and each item the same slot whatever else is
    in the batch, so a BLAS/cuBLAS kernel choice that depends on the batch's shape, or a
    reduction order that depends on the row's place in it, cannot change an item's row.
    """
    batch = [items[0]] * batch_size
    for slot, item in zip(slots, items):
        batch[slot] = item
    return np.asarray(encode(batch), dtype=np.float32)[np.asarray(slots, dtype=np.int64)]


@dataclass
class EmbedTiming:
    """Where the embed loop spends its time: images encoded, seconds in the encoder,
    and (read from the decoder) seconds waiting for decoding."""

    images: int = 0
    encode_s: float = 0.0
    start: float = field(default_factory=time.perf_counter)

    def summary(self, decode_wait_s: float) -> dict:
        return throughput_summary(self.images, time.perf_counter() - self.start, decode_wait_s, self.encode_s)


def throughput_summary(images: int, wall_s: float, decode_wait_s: float, encode_s: float) -> dict:
    """images/s and the shares of the wall time spent waiting on decode and in the encoder."""
    wall = max(float(wall_s), 1e-9)
    return {
        "images_per_s": round(images / wall, 1),
        "decode_wait_share": round(decode_wait_s / wall, 3),
        "encode_share": round(encode_s / wall, 3),
    }


def embed_stream(
    items: Iterable[tuple[str, bytes | None]],
    encoder,
    decoder,
    *,
    batch_size: int,
    timing: EmbedTiming | None = None,
    first_position: int = 0,
) -> Iterator[EmbeddedBatch]:
    """Decode + encode a stream of ``(key, image bytes or None)`` **in input order**.

    ``decoder``: from :func:`~pipelines.shards.decode.make_decoder` (worker processes or
    inline). Batches are fixed by position: the item at position ``p`` (counted from
    ``first_position``, and from 0 again after each ``(SHARD_END, None)`` item) belongs to
    encoder batch ``p // batch_size`` in slot ``p % batch_size``, and every batch is encoded
    with ``batch_size`` slots (:func:`encode_in_slots`). So a row depends only on its image,
    ``batch_size`` and its position: not on where the stream or a chunk starts, on which
    neighbours failed to decode, or on the number of decode workers. Yields consecutive
    :class:`EmbeddedBatch` runs covering every item once (SHARD_END items excepted); memory
    holds at most the decoder's prefetch plus one batch of prepared images. Decoding runs
    ahead across SHARD_END items.
    """
    encode = getattr(encoder, "encode_prepared", None) or encoder.encode_images
    timing = timing if timing is not None else EmbedTiming()
    keys, status, errors, ready, slots = [], [], [], [], []
    position = first_position

    def flush(end: bool = False) -> EmbeddedBatch:
        emb = None
        if ready:
            t0 = time.perf_counter()
            emb = encode_in_slots(encode, ready, slots, batch_size)
            timing.encode_s += time.perf_counter() - t0
            timing.images += len(ready)
        batch = EmbeddedBatch(list(keys), list(status), list(errors), emb, end, list(slots))
        keys.clear(), status.clear(), errors.clear(), ready.clear(), slots.clear()
        return batch

    for chunk_keys, results in decoder.imap(items, chunk_size=min(batch_size, DECODE_CHUNK)):
        for key, (st, item) in zip(chunk_keys, results):
            if key == SHARD_END:
                yield flush(end=True)
                position = 0
                continue
            keys.append(key)
            status.append(st)
            errors.append(None if st == STATUS_OK else item)
            if st == STATUS_OK:
                ready.append(item)
                slots.append(position % batch_size)
            position += 1
            if position % batch_size == 0:
                yield flush()
    if keys:
        yield flush()


@dataclass
class ShardRead:
    """What the reader collected from one input shard (filled ahead of the encoder)."""

    i: int
    shard: str
    scan: ShardScan
    records: list = field(default_factory=list)  # (key, index, nbytes)
    captions: list = field(default_factory=list)
    members: list = field(default_factory=list)  # image member names, for error messages
    problems: list = field(default_factory=list)  # status from the tar alone (no_image, non_utf8_name) or None


def shard_items(
    read: ShardRead, *, image_exts: Sequence[str], text: bool, strict: bool
) -> Iterator[tuple[str, bytes | None]]:
    """``(key, image bytes or None)`` of one shard, then ``(SHARD_END, None)``; fills ``read``."""
    for sample in iter_shard(read.shard, read.scan):
        problem = sample_problem(sample)
        read.problems.append(problem)
        found = None if problem else sample.get(image_exts)
        if found is None and problem is None and strict:
            raise PipelineError(
                f"sample {sample.key!r} in {read.shard} has no image member "
                f"(looked for {'/'.join(image_exts)}; it has "
                f"{sorted(sample.members)})"
            )
        cap = sample.get(TEXT_EXTS) if text else None
        read.captions.append(cap[1].decode("utf-8", errors="replace") if cap else "")
        read.members.append(f"{sample.key}.{found[0]}" if found else sample.key)
        read.records.append((sample.key, sample.index, sample.nbytes))
        yield sample.key, (found[1] if found else None)
    yield SHARD_END, None


def embed_shards(
    shards: Sequence[tuple[int, str]],
    encoder,
    decoder,
    *,
    batch_size: int,
    image_exts: Sequence[str],
    text: bool,
    strict: bool,
    progress=None,
    on_sample=None,
    timing: EmbedTiming | None = None,
) -> Iterator[tuple[int, pd.DataFrame, np.ndarray | None, np.ndarray | None, ShardScan]]:
    """Embed input shards ``(i, path)`` as one stream (decoding runs ahead into the next
    shard): per shard ``(i, sample table, image rows (m, d) f32, text rows or None, scan)``.

    Encoder batches never cross shards, so a shard's rows are the same whichever process
    (local, resumed, Ray worker) computes them and however many decode workers it has.
    ``on_sample`` is called once per sample whose result is in (the kill/resume test hook).
    """
    reads: deque[ShardRead] = deque()

    def items():
        for i, shard in shards:
            reads.append(ShardRead(i, shard, ShardScan(shard)))
            yield from shard_items(reads[-1], image_exts=image_exts, text=text, strict=strict)

    timing = timing if timing is not None else EmbedTiming()
    statuses, img_chunks, txt_chunks = [], [], []
    for batch in embed_stream(items(), encoder, decoder, batch_size=batch_size, timing=timing):
        read, start = reads[0], len(statuses)
        statuses.extend(read.problems[start + j] or st for j, st in enumerate(batch.status))
        if strict:
            for j, (st, err) in enumerate(zip(batch.status, batch.errors)):
                if st in (UNDECODABLE, TOO_LARGE):
                    what = "undecodable image" if st == UNDECODABLE else "image too large:"
                    raise PipelineError(f"{what} {read.members[start + j]} in {read.shard}: {err}")
        if batch.embeddings is not None:
            img_chunks.append(batch.embeddings)
            if text:
                ok = [read.captions[start + j] for j, st in enumerate(batch.status) if st == STATUS_OK]
                txt_chunks.append(encode_in_slots(encoder.encode_texts, ok, batch.slots, batch_size))
            if progress is not None:
                progress.update(len(batch.embeddings))
                progress.set_postfix_str(_timing_note(timing, decoder), refresh=False)
        if on_sample is not None:
            for _ in batch.keys:
                on_sample()
        if batch.end:
            reads.popleft()
            if read.scan.error and strict:
                raise PipelineError(read.scan.error)
            table = pd.DataFrame(read.records, columns=["key", "index", "nbytes"])
            table["status"] = pd.Series(statuses, dtype=object)
            table["index"] = table["index"].astype(np.int64)
            table["nbytes"] = table["nbytes"].astype(np.int64)
            images = np.concatenate(img_chunks) if img_chunks else None
            texts = np.concatenate(txt_chunks) if txt_chunks else None
            yield read.i, table, images, texts, read.scan
            statuses, img_chunks, txt_chunks = [], [], []


def _timing_note(timing: EmbedTiming, decoder) -> str:
    s = timing.summary(decoder.wait_s)
    return f"waiting on decode {s['decode_wait_share']:.0%}, encoding {s['encode_share']:.0%}"


def chunk_paths(stage_dir: Path, i: int) -> dict[str, Path]:
    base = stage_dir / "chunks" / f"{i:05d}"
    return {
        "img": base.with_suffix(".img.npy"),
        "txt": base.with_suffix(".txt.npy"),
        "keys": base.with_suffix(".keys.parquet"),
    }


def save_chunk(
    stage_dir: Path, i: int, table: pd.DataFrame, images, texts, scan: ShardScan, *, dim: int | None, dtype, text: bool
) -> None:
    """Write one shard's chunk; the keys parquet goes last and marks the chunk complete."""
    paths = chunk_paths(stage_dir, i)
    paths["img"].parent.mkdir(parents=True, exist_ok=True)
    width = images.shape[1] if images is not None else (dim or 0)
    save_npy(paths["img"], (images if images is not None else np.zeros((0, width), np.float32)).astype(dtype))
    if text:
        save_npy(paths["txt"], (texts if texts is not None else np.zeros((0, width), np.float32)).astype(dtype))
    save_parquet(paths["keys"], table, {"scan": scan.counters()})


def finalize_embed(stage_dir: Path, shards: list[str], *, text: bool) -> dict:
    """Merge per-shard chunk tables into keys.parquet, check keys, write embeddings.json."""
    tables, errors, totals, examples = [], [], dict.fromkeys(NAME_COUNTERS, 0), []
    images, texts = [], []
    for i, shard in enumerate(shards):
        paths = chunk_paths(stage_dir, i)
        t = pq.read_table(paths["keys"])
        scan = json.loads((t.schema.metadata or {}).get(b"scan", b"{}"))
        if scan.get("error"):
            errors.append(scan["error"])
        for name in NAME_COUNTERS:
            totals[name] += int(scan.get(name, 0))
        examples += scan.get("examples", [])
        df = t.to_pandas()
        df.insert(1, "shard", shard)
        df.insert(2, "shard_idx", np.int64(i))
        tables.append(df)
        images.append(str(paths["img"].relative_to(stage_dir)))
        if text:
            texts.append(str(paths["txt"].relative_to(stage_dir)))
    keys = (
        pd.concat(tables, ignore_index=True)
        if tables
        else pd.DataFrame(columns=["key", "shard", "shard_idx", "index", "nbytes", "status"])
    )
    check_duplicate_keys(keys)
    ok = (keys["status"] == STATUS_OK).to_numpy()
    row = np.full(len(keys), -1, dtype=np.int64)
    row[ok] = np.arange(int(ok.sum()))
    keys["row"] = row
    save_parquet(stage_dir / "keys.parquet", keys)
    atomic_write_json(stage_dir / "embeddings.json", {"images": images, "texts": texts, "shards": shards})
    counts = keys["status"].value_counts().to_dict()
    return {
        "samples": int(len(keys)),
        "embedded": int(ok.sum()),
        "missing_image": int(counts.get(MISSING_IMAGE, 0)),
        "undecodable": int(counts.get(UNDECODABLE, 0)),
        "no_image": int(counts.get(NO_IMAGE, 0)),
        "non_utf8_name": int(counts.get(NON_UTF8_NAME, 0)),
        "too_large": int(counts.get(TOO_LARGE, 0)),
        "corrupt_shards": errors,
        **totals,
        "name_examples": examples[:5],
        "shards": len(shards),
    }


def check_duplicate_keys(keys: pd.DataFrame) -> None:
    dup = keys["key"].duplicated(keep=False)
    if dup.any():
        first = keys.loc[dup, ["key", "shard"]].head(6)
        where = "; ".join(f"{k} in {s}" for k, s in first.itertuples(index=False))
        raise PipelineError(
            f"duplicate keys: {int(keys.loc[dup, 'key'].nunique())} key(s) occur "
            f"more than once ({where}); keys must be unique across shards"
        )


def check_embed_options(batch_size: int, dtype: str, threads: int | None = None) -> None:
    """The embed stages' shared option checks (a clear error before any work)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be float16 or float32, got {dtype!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")


class EmbedStage(Stage):
    """Decode images from shards and embed them; one chunk (rows + keys) per input shard.

    params: encoder fingerprint, batch_size, image_exts, text (embed captions too), dtype,
    strict, decode (the :class:`~pipelines.shards.decode.DecodeOptions` that change rows:
    draft, max_pixels, gpu), threads (torch's CPU thread count, which the encoder runs under
    in every process that embeds, local or Ray: BLAS reductions may depend on it; None: the
    count torch has when the stage is made). Resume unit: one input shard. ``executor``: who
    embeds the pending shards (``None``: this process; see :mod:`pipelines.executors`).
    """

    name = "embed"
    owned = ("keys.parquet", "embeddings.json", "chunks/*.npy", "chunks/*.parquet")

    def __init__(
        self,
        out,
        shards: list[str],
        encoder=None,
        *,
        encoder_fingerprint=None,
        batch_size: int = 64,
        image_exts: Sequence[str] = IMAGE_EXTS,
        text: bool = False,
        dtype: str = "float16",
        strict: bool = False,
        decode: DecodeOptions | None = None,
        progress: bool = True,
        executor=None,
        threads: int | None = None,
    ):
        check_embed_options(batch_size, dtype, threads)
        self.decode = decode or DecodeOptions()
        fp = encoder_fingerprint if encoder_fingerprint is not None else encoder.fingerprint
        params = {
            "encoder": fp,
            "batch_size": batch_size,
            "image_exts": list(image_exts),
            "text": bool(text),
            "dtype": dtype,
            "strict": bool(strict),
            "decode": self.decode.fingerprint(),
            "threads": resolve_threads(threads),
        }
        super().__init__(out, params, {"shards": file_fingerprint(shards)})
        self.shards = list(shards)
        self.encoder = encoder
        self.progress = progress
        self.executor = executor
        self.throughput: dict = {}

    def pending(self) -> list[int]:
        return [i for i in range(len(self.shards)) if not chunk_paths(self.dir, i)["keys"].exists()]

    def reusable_chunks(self) -> set[int] | None:
        """Chunks a previous run with the same parameters (and code version) left valid: those
        of the shards still at the same index with the same path, size and mtime (a chunk
        depends on its shard and the parameters only). None when the parameters changed."""
        rec = self.record() or {}
        old = rec.get("inputs", {}).get("shards")
        params = json.loads(json.dumps(self.params))
        made_here = rec.get("fingerprint") == json_digest(
            {"stage": self.name, "version": VERSION, "params": params, "inputs": rec.get("inputs")}
        )
        if old is None or rec.get("params") != params or not made_here:
            return None
        return {i for i, (a, b) in enumerate(zip(old, self.inputs["shards"])) if a == b}

    def clear(self) -> None:
        """Shards added, removed or replaced, parameters unchanged: delete only the chunks of
        the shards that changed (and the merged tables), so only those are embedded again.
        Anything else: delete every file of the stage (:meth:`Stage.clear`)."""
        kept = self.reusable_chunks()
        rels = self.artifact_files()
        if kept is None or not all(is_owned_file(rel, self.owned) for rel in rels):
            return super().clear()
        stale = [rel for rel in rels if not (rel.startswith("chunks/") and int(rel[7:].split(".")[0]) in kept)]
        self.invalidate(stale)

    def chunk_files(self, i: int) -> list[str]:
        """The files of chunk ``i`` (relative to the stage folder)."""
        kinds = ("img", "txt", "keys") if self.params["text"] else ("img", "keys")
        return [p.relative_to(self.dir).as_posix() for kind, p in chunk_paths(self.dir, i).items() if kind in kinds]

    def planned_files(self) -> list[str]:
        return ["keys.parquet", "embeddings.json", *(f for i in range(len(self.shards)) for f in self.chunk_files(i))]

    def compute(self, log):
        todo = self.pending()
        if todo and self.executor is not None:
            self.executor.embed(self, todo)
        elif todo:
            self.embed_local(todo)
        return {**finalize_embed(self.dir, self.shards, text=self.params["text"]), **self.throughput}

    def encoder_obj(self):
        if callable(self.encoder) and not hasattr(self.encoder, "encode_images"):
            self.encoder = self.encoder()  # a factory: build lazily (skipped stages never load)
        return self.encoder

    def image_encoder(self):
        """The encoder, checked to have a text tower when captions are embedded (CLIP score)."""
        encoder = self.encoder_obj()
        if self.params["text"] and not getattr(encoder, "has_text", False):
            raise PipelineError("caption embeddings requested (CLIP score) but the encoder has no text tower")
        return encoder

    def make_decoder(self, workers: int | None = None, start_method: str | None = None):
        """This stage's decoder for its encoder (``workers`` overrides the options' count)."""
        encoder = self.encoder_obj()
        options = self.decode if workers is None else replace(self.decode, workers=workers)
        return make_decoder(encoder, options, start_method=start_method)

    def embed_many(self, todo: Sequence[int], decoder, progress=None, on_sample=None, timing=None) -> None:
        """Embed input shards ``todo`` with ``decoder`` (see :meth:`make_decoder`) as one
        stream and save each shard's chunk as soon as it is complete."""
        encoder = self.image_encoder()
        for i, table, images, texts, scan in embed_shards(
            [(i, self.shards[i]) for i in todo],
            encoder,
            decoder,
            batch_size=self.params["batch_size"],
            image_exts=tuple(self.params["image_exts"]),
            text=self.params["text"],
            strict=self.params["strict"],
            progress=progress,
            on_sample=on_sample,
            timing=timing,
        ):
            dim = None
            if images is None:  # nothing decodable in this shard: width from another chunk
                dim = _known_width(self.dir) or _probe_width(encoder)
            dtype = np.dtype(self.params["dtype"])
            save_chunk(self.dir, i, table, images, texts, scan, dim=dim, dtype=dtype, text=self.params["text"])
            if scan.error:
                tqdm.write(f"[embed] WARNING {scan.error}")

    @contextlib.contextmanager
    def local_run(self):
        """Embedding in this process, torch on the stage's thread count: yields ``(decoder,
        hooks)`` where ``hooks`` are the ``progress``/``on_sample``/``timing`` keywords of
        :meth:`embed_many`; records the throughput on exit. ``on_sample`` is the kill/resume
        test hook."""
        done = [0]

        def on_sample():
            done[0] += 1
            die_hook("embed", done[0])

        timing = EmbedTiming()
        with (
            compute_threads(self.params.get("threads")),
            tqdm(desc="embed", unit="img", disable=not self.progress) as bar,
            self.make_decoder() as decoder,
        ):
            yield decoder, {"progress": bar, "on_sample": on_sample, "timing": timing}
            self.throughput = timing.summary(decoder.wait_s)

    def embed_local(self, todo: list[int]) -> None:
        """Embed input shards ``todo`` in this process (decoding in worker processes), in order."""
        with self.local_run() as (decoder, hooks):
            self.embed_many(todo, decoder, **hooks)

    def load(self) -> EmbedArtifact:
        return load_embed_artifact(self.dir, self.digest)

    def inconsistent(self, files: dict) -> dict[str, str]:
        """Chunks whose embedding rows disagree with their keys (rows with status ok), or that
        are missing; :meth:`invalidate` then deletes the whole chunk and it is embedded again."""
        bad = {}
        for i in range(len(self.shards)):
            rels = self.chunk_files(i)
            if any(rel not in files for rel in rels):
                bad[rels[0]] = "chunk incomplete"
                continue
            paths = chunk_paths(self.dir, i)
            try:
                status = pq.read_table(paths["keys"], columns=["status"]).column(0)
                n_ok = int(pc.sum(pc.equal(status, STATUS_OK)).as_py() or 0)
                rows = {rel: np.load(self.dir / rel, mmap_mode="r").shape[0] for rel in rels if rel.endswith(".npy")}
            except (OSError, ValueError, pa.ArrowException) as exc:
                bad[rels[0]] = f"unreadable ({exc})"
                continue
            bad.update({rel: f"{n} rows, {n_ok} keys with an embedding" for rel, n in rows.items() if n != n_ok})
        return bad

    def invalidate(self, rels: list[str]) -> None:
        """A changed chunk file: delete its whole chunk, so that input shard is embedded again."""
        for rel in rels:
            stem = rel.split("/")[-1].split(".")[0]
            for path in chunk_paths(self.dir, int(stem)).values() if rel.startswith("chunks/") else [self.dir / rel]:
                path.unlink(missing_ok=True)


def _known_width(stage_dir: Path) -> int | None:
    for p in sorted((stage_dir / "chunks").glob("*.img.npy")):
        arr = np.load(p, mmap_mode="r")
        if arr.shape[0]:
            return int(arr.shape[1])
    return None


def _probe_width(encoder) -> int:
    from PIL import Image

    return int(np.asarray(encoder.encode_images([Image.new("RGB", (32, 32))])).shape[1])
