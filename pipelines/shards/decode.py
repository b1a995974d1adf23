"""Image decoding for the embed stage: encoded bytes -> the encoder's prepared input, in order.

* :func:`decode_image`: bytes -> PIL RGB image under a pixel cap, JPEGs at a reduced DCT scale
  (PIL draft mode) when the target is much smaller than the image; :class:`ImageTooLarge`
  for images over the cap or refused by PIL's decompression-bomb guard.
* :class:`ImageDecoder`: one picklable callable per worker: bytes -> ``(status, item)`` where
  ``item`` is what the encoder's ``image_preparer()`` makes of the image (a uint8 array for
  open_clip) or the error message.
* :class:`DecodePool`: decodes chunks of samples in worker processes (or inline with 0
  workers) and hands the results back **in input order**, with at most ``prefetch`` chunks
  in flight, so memory is bounded by ``prefetch x chunk`` prepared images whatever the shard
  size.
* :class:`TorchJpegDecoder`: batched ``torchvision.io.decode_jpeg`` (nvjpeg on CUDA) with a
  per-image CPU fallback for what it cannot decode (not JPEG, too large, unsupported).
"""

from __future__ import annotations

import io
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prunecore.embed import batched

from .stage import MISSING_IMAGE, STATUS_OK, UNDECODABLE

TOO_LARGE = "too_large"
DEFAULT_MAX_PIXELS = 64_000_000  # ~192 MB as RGB; PIL's own bomb guard refuses > 2 x 89.5 MP
JPEG_SOI = b"\xff\xd8\xff"


class ImageTooLarge(ValueError):
    """An image over the decode pixel cap (or refused by PIL's decompression-bomb guard)."""


@dataclass(frozen=True)
class DecodeOptions:
    """How the embed stage decodes images.

    workers: decode processes (None: :func:`default_decode_workers`; 0: in the encoding
    process). draft: decode JPEGs at a reduced DCT scale (1/2, 1/4, 1/8) while the result
    keeps at least ``draft`` x the encoder's input side (0: full decode). max_pixels: cap on
    decoded pixels (after draft); larger images get status ``too_large``. prefetch: decoded
    chunks in flight (None: 2 per worker, at least 4). gpu: batched torchvision JPEG decode
    on the encoder's device (nvjpeg on CUDA) with a CPU fallback.
    """

    workers: int | None = None
    draft: float = 1.0
    max_pixels: int = DEFAULT_MAX_PIXELS
    prefetch: int | None = None
    gpu: bool = False

    def __post_init__(self):
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"decode workers must be >= 0 (0: decode in the encoding process), got {self.workers}")
        if self.draft < 0:
            raise ValueError(f"draft must be >= 0 (0: full JPEG decode), got {self.draft}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")
        if self.prefetch is not None and self.prefetch < 1:
            raise ValueError(f"prefetch must be >= 1 chunk, got {self.prefetch}")

    def fingerprint(self) -> dict:
        """The options that change the embeddings (workers and prefetch do not)."""
        return {"draft": float(self.draft), "max_pixels": int(self.max_pixels), "gpu": bool(self.gpu)}


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_decode_workers() -> int:
    """One decode process per core minus the one the encoding process needs (0 on one core)."""
    return max(available_cores() - 1, 0)


def draft_scale(width: int, height: int, target: int) -> int:
    """The JPEG DCT reduction (1, 2, 4 or 8) that keeps both sides >= ``target``."""
    ratio = min(width, height) // max(int(target), 1)
    return next((s for s in (8, 4, 2) if ratio >= s), 1)


def decode_image(data: bytes, *, max_pixels: int | None = None, draft_size: int | None = None):
    """PIL RGB image from encoded bytes.

    ``draft_size``: for JPEGs, decode at the smallest DCT scale whose shorter side is still
    >= ``draft_size`` (only when that saves at least a factor 2). ``max_pixels``: raise
    :class:`ImageTooLarge` when the (drafted) image has more pixels. Raises on undecodable data.
    """
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(str(exc)) from exc
    with im:
        if draft_size and im.format == "JPEG" and draft_scale(*im.size, draft_size) > 1:
            im.draft("RGB", (int(draft_size), int(draft_size)))
        w, h = im.size
        if max_pixels is not None and w * h > max_pixels:
            raise ImageTooLarge(
                f"{w}x{h} = {w * h / 1e6:.1f} MP decoded is over the cap of {max_pixels / 1e6:.1f} MP "
                "(raise max_pixels / --max-pixels, or keep JPEG draft decoding on)"
            )
        im.load()
        return im.convert("RGB")


def identity(image):
    """The preparer of encoders without ``image_preparer``: the PIL image itself."""
    return image


class ImageDecoder:
    """bytes -> ``(status, item)``; picklable, runs in the decode workers.

    ``preparer``: PIL RGB image -> encoder input (see ``image_preparer()`` of the encoders).
    ``draft_size``: target side for JPEG draft decoding (None: full decode).
    """

    def __init__(self, preparer: Callable = identity, *, draft_size: int | None = None, max_pixels: int | None = None):
        self.preparer, self.draft_size, self.max_pixels = preparer, draft_size, max_pixels

    @classmethod
    def for_encoder(cls, encoder, options: DecodeOptions) -> ImageDecoder:
        """The decoder of ``encoder`` (its ``image_preparer()`` and ``input_size``) under ``options``."""
        make = getattr(encoder, "image_preparer", None)
        size = getattr(encoder, "input_size", None)
        draft = int(math.ceil(options.draft * size)) if (options.draft and size) else None
        return cls(make() if make else identity, draft_size=draft, max_pixels=options.max_pixels)

    def __call__(self, data: bytes | None) -> tuple[str, object]:
        if data is None:
            return MISSING_IMAGE, "no image member"
        try:
            image = decode_image(data, max_pixels=self.max_pixels, draft_size=self.draft_size)
        except ImageTooLarge as exc:
            return TOO_LARGE, str(exc)
        except Exception as exc:  # PIL raises many types for bad data
            return UNDECODABLE, f"{type(exc).__name__}: {exc}"
        return STATUS_OK, self.preparer(image)

    def chunk(self, datas: list) -> list[tuple[str, object]]:
        return [self(d) for d in datas]


_WORKER_DECODER: ImageDecoder | None = None


def _exit_with_parent(parent: int) -> None:
    while True:  # a SIGKILLed parent must not leave decode workers behind
        if os.getppid() != parent:
            os._exit(0)
        time.sleep(0.5)


def _init_worker(decoder: ImageDecoder, parent: int) -> None:
    global _WORKER_DECODER
    _WORKER_DECODER = decoder
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _decode_chunk(datas: list) -> list[tuple[str, object]]:
    return _WORKER_DECODER.chunk(datas)


class DecodePool:
    """Ordered, bounded decoding of ``(key, bytes)`` streams in ``workers`` processes.

    ``imap(items, chunk_size)`` yields ``(keys, results)`` per chunk in input order; at most
    ``prefetch`` chunks are decoded ahead of the consumer. ``wait_s``: seconds the consumer
    spent waiting for (or, inline, doing) decoding. ``start_method``: ``fork`` (default where
    available: workers start at once) or ``spawn`` (e.g. inside Ray actors).
    """

    def __init__(
        self, decoder: ImageDecoder, workers: int = 0, *, prefetch: int | None = None, start_method: str | None = None
    ):
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        self.decoder, self.workers = decoder, int(workers)
        self.prefetch = prefetch or max(2 * self.workers, 4)
        self.wait_s = 0.0
        self.executor = None
        if self.workers > 0:
            method = start_method or ("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            self.executor = ProcessPoolExecutor(
                self.workers,
                mp_context=mp.get_context(method),
                initializer=_init_worker,
                initargs=(decoder, os.getpid()),
            )

    def imap(self, items: Iterable[tuple[str, bytes | None]], chunk_size: int) -> Iterator[tuple[list, list]]:
        chunks = batched(items, max(int(chunk_size), 1))
        if self.executor is None:
            for chunk in chunks:
                t0 = time.perf_counter()
                results = self.decoder.chunk([d for _, d in chunk])
                self.wait_s += time.perf_counter() - t0
                yield [k for k, _ in chunk], results
            return
        queue: deque = deque()
        for chunk in chunks:
            queue.append(([k for k, _ in chunk], self.executor.submit(_decode_chunk, [d for _, d in chunk])))
            if len(queue) >= self.prefetch:
                yield self._next(queue)
        while queue:
            yield self._next(queue)

    def _next(self, queue: deque) -> tuple[list, list]:
        keys, future = queue.popleft()
        t0 = time.perf_counter()
        results = future.result()
        self.wait_s += time.perf_counter() - t0
        return keys, results

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
            self.executor = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def decode_jpegs_torch(datas: list, device, *, max_pixels: int | None = None) -> list:
    """Batched ``torchvision.io.decode_jpeg`` on ``device`` (nvjpeg on CUDA): a (3, H, W)
    uint8 RGB tensor per input, or None where it cannot (not a JPEG, over ``max_pixels``,
    a JPEG that torchvision refuses): the caller decodes those on the CPU."""
    import torch
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    out: list = [None] * len(datas)
    idx = []
    for i, data in enumerate(datas):
        if data is None or not data.startswith(JPEG_SOI):
            continue
        try:
            with Image.open(io.BytesIO(data)) as im:  # header only: the size, nothing decoded
                w, h = im.size
        except Exception:
            continue
        if max_pixels is None or w * h <= max_pixels:
            idx.append(i)
    raw = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in idx]
    try:
        decoded = decode_jpeg(raw, mode=ImageReadMode.RGB, device=device) if raw else []
    except RuntimeError:  # one bad image fails the batch: decode one by one
        decoded = []
        for r in raw:
            try:
                decoded.append(decode_jpeg(r, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                decoded.append(None)
    for i, t in zip(idx, decoded):
        out[i] = t
    return out


class TorchJpegDecoder:
    """Decode chunks with :func:`decode_jpegs_torch` on ``device`` and prepare them with the
    encoder's ``tensor_preparer()`` (resize + crop on the device); everything it cannot decode
    goes through the CPU ``fallback`` :class:`ImageDecoder`. Same ``imap`` as :class:`DecodePool`
    (runs in the calling process: the device work is asynchronous)."""

    def __init__(self, fallback: ImageDecoder, tensor_preparer: Callable, device):
        self.fallback, self.prepare, self.device = fallback, tensor_preparer, device
        self.wait_s = 0.0
        self.fallbacks = 0

    def chunk(self, datas: list) -> list[tuple[str, object]]:
        decoded = decode_jpegs_torch(datas, self.device, max_pixels=self.fallback.max_pixels)
        results = []
        for data, tensor in zip(datas, decoded):
            if tensor is None:
                self.fallbacks += data is not None
                results.append(self.fallback(data))
            else:
                results.append((STATUS_OK, self.prepare(tensor)))
        return results

    def imap(self, items, chunk_size: int):
        for chunk in batched(items, max(int(chunk_size), 1)):
            t0 = time.perf_counter()
            results = self.chunk([d for _, d in chunk])
            self.wait_s += time.perf_counter() - t0
            yield [k for k, _ in chunk], results

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def make_decoder(encoder, options: DecodeOptions, *, start_method: str | None = None):
    """The decoder the embed stage uses for ``encoder``: a :class:`TorchJpegDecoder` on the
    encoder's device when ``options.gpu`` (needs the encoder's ``tensor_preparer``), else a
    :class:`DecodePool`. Use it as a context manager (it owns worker processes)."""
    cpu = ImageDecoder.for_encoder(encoder, options)  # loads the encoder's preprocessing
    if options.gpu:
        make = getattr(encoder, "tensor_preparer", None)
        if make is None:
            raise ValueError(
                f"GPU JPEG decoding needs an encoder with tensor_preparer() (open_clip); {type(encoder).__name__} "
                "has none: turn gpu decoding off"
            )
        return TorchJpegDecoder(cpu, make(), getattr(encoder, "device", "cpu"))
    workers = default_decode_workers() if options.workers is None else options.workers
    return DecodePool(cpu, workers, prefetch=options.prefetch, start_method=start_method)
