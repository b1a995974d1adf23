"""Tar shards (webdataset layout) as the embed stage's input: one resume unit per shard."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.shards.batches import SHARD_END, EmbedTiming, embed_stream, encode_in_slots
from pipelines.shards.chunks import EmbeddedUnit
from pipelines.shards.decode import TOO_LARGE
from pipelines.shards.stage import STATUS_OK, UNDECODABLE, PipelineError
from pipelines.shards.tario import IMAGE_EXTS, TEXT_EXTS, ShardScan, file_fingerprint, iter_shard, sample_problem

from .protocol import EmbedOptions, EmbedRun


class TarShards:
    """Input shards ``shards`` (paths); a sample's image is its first member with an
    extension in ``image_exts``, its caption its first text member."""

    streaming = False
    decodes_images = True
    precomputed = False

    def __init__(self, shards: Sequence[str], image_exts: Sequence[str] = IMAGE_EXTS):
        self.shards = list(shards)
        self.image_exts = tuple(image_exts)
        self.label = f"{len(self.shards)} shard(s)"

    def units(self) -> list[str]:
        return list(self.shards)

    def embed_params(self, encoder, encoder_fingerprint, options: EmbedOptions) -> dict:
        return {
            "encoder": encoder_fingerprint if encoder_fingerprint is not None else encoder.fingerprint,
            "batch_size": options.batch_size,
            "image_exts": list(self.image_exts),
            "text": bool(options.text),
            "dtype": options.dtype,
            "strict": bool(options.strict),
            "decode": options.decode.fingerprint(),
            "threads": options.threads,
        }

    def record_inputs(self) -> dict:
        return {"shards": file_fingerprint(self.shards)}

    def embed_units(self, todo: Sequence[int], run: EmbedRun) -> Iterator[EmbeddedUnit]:
        """Embed shards ``todo`` as one stream (decoding runs ahead into the next shard)."""
        for i, table, images, texts, scan in embed_shards(
            [(i, self.shards[i]) for i in todo],
            run.encoder,
            run.decoder,
            batch_size=run.batch_size,
            image_exts=self.image_exts,
            text=run.text,
            strict=run.strict,
            progress=run.progress,
            on_sample=run.on_sample,
            timing=run.timing,
        ):
            width = None
            if images is None:  # nothing decodable in this shard: width from another chunk
                width = known_width(run.stage_dir) or probe_width(run.encoder)
            yield EmbeddedUnit(i, table, images, texts, scan, width)

    def embed_pass(self, run: EmbedRun) -> Iterator[EmbeddedUnit]:
        return self.embed_units(range(len(self.shards)), run)


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
    ``on_sample`` is called once per sample whose result is in (progress observers).
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
                progress.set_postfix_str(timing_note(timing, decoder), refresh=False)
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


def timing_note(timing: EmbedTiming, decoder) -> str:
    s = timing.summary(decoder.wait_s)
    return f"waiting on decode {s['decode_wait_share']:.0%}, encoding {s['encode_share']:.0%}"


def known_width(stage_dir: Path) -> int | None:
    """The row width of the first non-empty image chunk already in ``stage_dir`` (None: none yet)."""
    for p in sorted((stage_dir / "chunks").glob("*.img.npy")):
        arr = np.load(p, mmap_mode="r")
        if arr.shape[0]:
            return int(arr.shape[1])
    return None


def probe_width(encoder) -> int:
    """The encoder's row width, from one blank image."""
    from PIL import Image

    return int(np.asarray(encoder.encode_images([Image.new("RGB", (32, 32))])).shape[1])
