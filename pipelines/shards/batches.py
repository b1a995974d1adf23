"""Decode + encode a stream of images in input order, in encoder batches fixed by position.

The one embedding loop of every input: :func:`embed_stream` turns ``(key, image bytes)``
items into :class:`EmbeddedBatch` runs; :func:`encode_in_slots` encodes one fixed-shape
batch, so a row depends only on its image, the batch size and its position.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .stage import STATUS_OK

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
