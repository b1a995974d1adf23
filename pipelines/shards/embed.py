"""The embed stage: embed an input's rows, one chunk per resume unit of the input.

The input is any :class:`~pipelines.shards.inputs.EmbedInput`: tar shards (one unit per
shard), the rows of a Hugging Face dataset (one unit per ``chunk_rows`` rows; a stream in
one pass). Artifact: see :mod:`pipelines.shards.chunks`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from prunecore.io import json_digest

from .batches import EmbeddedBatch, EmbedTiming, embed_stream, encode_in_slots, throughput_summary
from .chunks import EmbedArtifact, EmbeddedUnit, chunk_paths, finalize_embed, load_embed_artifact, save_chunk
from .decode import DecodeOptions, make_decoder
from .decode import decode_image as decode_image  # re-exported (the report's thumbnails)
from .inputs import EmbedInput, EmbedOptions, EmbedRun, TarShards
from .progress import report_progress
from .stage import STATUS_OK, VERSION, PipelineError, Stage, is_owned_file
from .tario import IMAGE_EXTS
from .threads import compute_threads


def check_embed_options(batch_size: int, dtype: str, threads: int | None = None) -> None:
    """The embed stages' shared option checks (a clear error before any work)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be float16 or float32, got {dtype!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")


class EmbedStage(Stage):
    """Embed an input's rows; one chunk (rows + keys) per resume unit of the input.

    source: an :class:`~pipelines.shards.inputs.EmbedInput`, or a list of tar shard paths
    (:class:`~pipelines.shards.inputs.TarShards` with ``image_exts``). params (the input
    writes them: :meth:`~pipelines.shards.inputs.EmbedInput.embed_params`): encoder
    fingerprint, batch_size, text (embed captions too), dtype, strict, decode (the
    :class:`~pipelines.shards.decode.DecodeOptions` that change rows: draft, max_pixels,
    gpu), threads (torch's CPU thread count, which the encoder runs under in every process
    that embeds, local or Ray: BLAS reductions may depend on it; None: the count torch has
    when the stage is made), and the input's own (image_exts; columns, chunk_rows).
    ``executor``: who embeds the pending units of a map-style input (``None``: this process;
    see :mod:`pipelines.executors`); a stream is embedded in this process in one pass.
    """

    name = "embed"
    owned = ("keys.parquet", "embeddings.json", "chunks/*.npy", "chunks/*.parquet")

    def __init__(
        self,
        out,
        source: EmbedInput | Sequence[str],
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
        if not hasattr(source, "embed_params"):  # paths of tar shards
            source = TarShards(source, image_exts)
        self.decode = decode or DecodeOptions()
        options = EmbedOptions(batch_size, text, dtype, strict, self.decode, threads)
        super().__init__(out, source.embed_params(encoder, encoder_fingerprint, options), source.record_inputs())
        if source.precomputed:
            self.owned = source.owned
        self.source = source
        self.shards = source.units()
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
        kept = None if self.source.precomputed else self.reusable_chunks()
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
        if self.source.precomputed:
            return self.source.write_artifact(self.dir)
        if self.source.streaming:
            self.embed_pass()
            return finalize_embed(self.dir, self.shards, text=self.params["text"])
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
        """This stage's decoder for its encoder (``workers`` overrides the options' count; an
        input that decodes no images gets none)."""
        workers = workers if self.source.decodes_images else 0
        encoder = self.encoder_obj()
        options = self.decode if workers is None else replace(self.decode, workers=workers)
        return make_decoder(encoder, options, start_method=start_method)

    def embed_run(self, decoder, progress=None, on_sample=None, timing=None) -> EmbedRun:
        """What the input needs to embed units in this process (see :class:`EmbedRun`)."""
        return EmbedRun(
            self.image_encoder() if self.source.decodes_images else None,
            decoder,
            self.dir,
            batch_size=self.params["batch_size"],
            text=self.params["text"],
            strict=self.params["strict"],
            progress=progress,
            on_sample=on_sample,
            timing=timing,
        )

    def embed_many(self, todo: Sequence[int], decoder, progress=None, on_sample=None, timing=None) -> None:
        """Embed units ``todo`` with ``decoder`` (see :meth:`make_decoder`) as one stream and
        save each unit's chunk as soon as it is complete."""
        for unit in self.source.embed_units(todo, self.embed_run(decoder, progress, on_sample, timing)):
            self.save(unit)

    def embed_pass(self) -> None:
        """A stream's one pass in this process; chunks a killed run finished are not embedded again."""
        with self.local_run() as (decoder, hooks):
            for unit in self.source.embed_pass(self.embed_run(decoder, **hooks)):
                self.save(unit)
        self.shards = self.source.units()

    def save(self, unit: EmbeddedUnit) -> None:
        """Write one unit's chunk (its files claimed first: a stream's are known as they come)."""
        self.claim(self.chunk_files(unit.i))
        dtype = np.dtype(self.params["dtype"])
        text = self.params["text"]
        save_chunk(
            self.dir, unit.i, unit.table, unit.images, unit.texts, unit.scan, dim=unit.width, dtype=dtype, text=text
        )
        if unit.scan.error:
            tqdm.write(f"[embed] WARNING {unit.scan.error}")

    @contextlib.contextmanager
    def local_run(self):
        """Embedding in this process, torch on the stage's thread count: yields ``(decoder,
        hooks)`` where ``hooks`` are the ``progress``/``on_sample``/``timing`` keywords of
        :meth:`embed_many`; records the throughput on exit. Each sample done is reported to
        the progress observers (:mod:`pipelines.shards.progress`)."""
        done = [0]

        def on_sample():
            done[0] += 1
            report_progress(self.name, done[0])

        timing = EmbedTiming()
        with (
            compute_threads(self.params.get("threads")),
            tqdm(desc="embed", unit="img", disable=not self.progress) as bar,
            self.make_decoder() as decoder,
        ):
            yield decoder, {"progress": bar, "on_sample": on_sample, "timing": timing}
            self.throughput = timing.summary(decoder.wait_s)

    def embed_local(self, todo: list[int]) -> None:
        """Embed units ``todo`` in this process (decoding in worker processes), in order."""
        with self.local_run() as (decoder, hooks):
            self.embed_many(todo, decoder, **hooks)

    def load(self) -> EmbedArtifact:
        if self.source.precomputed:
            return self.source.load_artifact(self.dir, self.digest)
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


__all__ = [
    "EmbedArtifact",
    "EmbedStage",
    "EmbedTiming",
    "EmbeddedBatch",
    "check_embed_options",
    "embed_stream",
    "encode_in_slots",
    "load_embed_artifact",
    "throughput_summary",
]
