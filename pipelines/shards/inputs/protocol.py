"""The one interface between an input and the embed stage.

An input (tar shards, the rows of a Hugging Face dataset, ...) is cut into resume units; the
embed stage (:class:`~pipelines.shards.embed.EmbedStage`) owns the artifact (one chunk per
unit, :mod:`pipelines.shards.chunks`), the resume logic and the executors; the input says
what its units are, what identifies them, and how their rows are embedded.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pipelines.shards.batches import EmbedTiming
from pipelines.shards.chunks import EmbeddedUnit
from pipelines.shards.decode import DecodeOptions


@dataclass
class EmbedOptions:
    """The embed stage's options every input sees (checked by the stage)."""

    batch_size: int
    text: bool
    dtype: str
    strict: bool
    decode: DecodeOptions
    threads: int | None


@dataclass
class EmbedRun:
    """What one process embedding units holds: the encoder (None when the input decodes no
    images), the decoder, the stage folder and the progress hooks (``progress`` a tqdm bar,
    ``on_sample`` called once per sample whose result is in, ``timing`` the throughput)."""

    encoder: object
    decoder: object
    stage_dir: Path
    batch_size: int
    text: bool
    strict: bool
    progress: object = None
    on_sample: object = None
    timing: EmbedTiming | None = None


class EmbedInput(Protocol):
    """An input of the embed stage.

    ``streaming``: the units are read in one sequential pass in this process (their count is
    known after it: :meth:`embed_pass`); else any subset of units is embedded on demand
    (:meth:`embed_units`, by any executor). ``decodes_images``: False when the rows are read,
    not encoded (no encoder, no decode workers). ``precomputed``: the rows are embeddings
    already: the input has no unit, writes the artifact itself (``write_artifact(stage_dir)
    -> summary``, ``load_artifact(stage_dir, digest)``, its files ``owned``) and does not
    implement :meth:`embed_units` / :meth:`embed_pass`.
    """

    label: str
    streaming: bool
    decodes_images: bool
    precomputed: bool

    def units(self) -> list[str]:
        """One label per resume unit (a stream: those read so far)."""

    def embed_params(self, encoder, encoder_fingerprint, options: EmbedOptions) -> dict:
        """The stage's ``params`` record for this input (raises on a bad combination)."""

    def record_inputs(self) -> dict:
        """The stage's ``inputs`` record: what identifies the input's rows."""

    def embed_units(self, todo: Sequence[int], run: EmbedRun) -> Iterator[EmbeddedUnit]:
        """Embed units ``todo`` (map-style inputs)."""

    def embed_pass(self, run: EmbedRun) -> Iterator[EmbeddedUnit]:
        """One pass over a stream: the units not finished in ``run.stage_dir`` yet."""
