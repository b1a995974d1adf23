"""The embed stage's decoding: worker processes in order, JPEG draft + pixel cap, the
torchvision (GPU) decode fallback, bounded memory, progress timing.

Images: generated photo-like JPEGs (smooth random fields + grain) of several sizes; encoders:
a tiny random-weight open_clip ViT from a config and the weight-free pixel projection.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipelines.encoders import OpenClipEncoder, PixelProjectionEncoder
from pipelines.shards import run_filter
from pipelines.shards.decode import (
    TOO_LARGE,
    DecodeOptions,
    DecodePool,
    ImageDecoder,
    ImageTooLarge,
    TorchJpegDecoder,
    decode_image,
    decode_jpegs_torch,
    draft_scale,
)
from pipelines.shards.embed import EmbedTiming, embed_stream
from pipelines.shards.stage import MISSING_IMAGE, STATUS_OK, UNDECODABLE
from tests.helpers import REPO, artifact_bytes
from tests.helpers.encoders import LayoutSensitiveEncoder


def photo(rng, w: int, h: int) -> Image.Image:
    """A photo-like RGB image: a smooth random field with some grain."""
    small = rng.integers(0, 255, (max(h // 32, 2), max(w // 32, 2), 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.int16)
    img = img + rng.integers(-12, 12, img.shape, dtype=np.int16)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 1_700_000_000
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def jpeg_shards(tmp_path_factory):
    """2 shards of 45 JPEGs (64-400 px, some large enough for draft decoding), a PNG, a
    garbage 'JPEG' and a sample without an image."""
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for s in range(2):
        samples = []
        for i in range(45):
            w, h = int(rng.integers(64, 400)), int(rng.integers(64, 400))
            samples.append((f"s{s}_{i:03d}", {"jpg": jpeg(photo(rng, w, h)), "txt": f"photo {i}".encode()}))
        samples.insert(7, (f"s{s}_png", {"png": png(photo(rng, 50, 60))}))
        samples.insert(20, (f"s{s}_bad", {"jpg": b"\xff\xd8\xff" + bytes(200)}))
        samples.insert(30, (f"s{s}_noimg", {"txt": b"caption only"}))
        write_tar(root / f"{s:05d}.tar", samples)
    return str(root / "{00000..00001}.tar")


# --------------------------------------------------------------------------- decode


def test_draft_decoding_and_pixel_cap():
    rng = np.random.default_rng(1)
    data = jpeg(photo(rng, 1000, 700))
    assert decode_image(data).size == (1000, 700)
    assert draft_scale(1000, 700, 100) == 4 and draft_scale(1000, 700, 400) == 1 and draft_scale(1000, 700, 300) == 2
    assert decode_image(data, draft_size=100).size == (250, 175)  # 1/4: the shorter side stays >= 100
    assert decode_image(data, draft_size=400).size == (1000, 700)  # no factor-2 saving: full decode
    assert draft_scale(100, 50, 224) == 1 and decode_image(data, draft_size=5000).size == (1000, 700)
    assert decode_image(png(photo(rng, 300, 300)), draft_size=50).size == (300, 300)  # PNG: no draft
    with pytest.raises(ImageTooLarge, match="over the cap of 0.5 MP"):
        decode_image(data, max_pixels=500_000)
    assert decode_image(data, max_pixels=500_000, draft_size=300).size == (500, 350)  # drafted under the cap
    dec = ImageDecoder(max_pixels=500_000)
    assert dec(data)[0] == TOO_LARGE and dec(None)[0] == MISSING_IMAGE and dec(b"junk")[0] == UNDECODABLE
    status, image = ImageDecoder(draft_size=300, max_pixels=500_000)(data)
    assert status == STATUS_OK and image.size == (500, 350) and image.mode == "RGB"


def test_decompression_bomb_is_too_large(monkeypatch):
    rng = np.random.default_rng(2)
    data = png(photo(rng, 200, 200))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # PIL refuses > 2x this
    with pytest.raises(ImageTooLarge, match="decompression bomb"):
        decode_image(data)
    assert ImageDecoder()(data)[0] == TOO_LARGE


def test_pool_keeps_order_and_bounds_what_is_read_ahead():
    rng = np.random.default_rng(3)
    datas = [jpeg(photo(rng, 40 + 7 * i, 50)) for i in range(24)]
    read = []

    def items():
        for i, d in enumerate(datas):
            read.append(i)
            yield f"k{i}", d

    with DecodePool(ImageDecoder(), workers=2, prefetch=2) as pool:
        got = []
        for keys, results in pool.imap(items(), chunk_size=3):
            # never more than prefetch (2) chunks of 3 beyond what was consumed
            assert len(read) <= len(got) + len(keys) + 2 * 3
            got.extend(zip(keys, results))
    assert [k for k, _ in got] == [f"k{i}" for i in range(24)]
    assert [r[1].size for _, r in got] == [(40 + 7 * i, 50) for i in range(24)]
    assert pool.wait_s > 0


@pytest.mark.slow
def test_decode_workers_exit_when_the_parent_is_killed(tmp_path):
    script = textwrap.dedent(
        """
        import os, signal, sys
        from pipelines.shards.decode import DecodePool, ImageDecoder
        pool = DecodePool(ImageDecoder(), workers=1)
        list(pool.imap([("a", None)], chunk_size=1))
        print(*pool.executor._processes, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    pids = [int(p) for p in res.stdout.split()]
    assert len(pids) == 1
    deadline = time.time() + 10
    while time.time() < deadline and _alive(pids[0]):
        time.sleep(0.2)
    assert not _alive(pids[0]), "a decode worker outlived its killed parent"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_torch_jpeg_decode_falls_back_to_the_cpu_for_what_it_cannot_decode(tiny_model):
    """The GPU decode path run on the CPU (torchvision decode_jpeg): JPEGs decoded by
    torchvision, a PNG / an oversize JPEG / a broken JPEG through the CPU decoder."""
    rng = np.random.default_rng(4)
    good = [jpeg(photo(rng, 80 + 10 * i, 64)) for i in range(3)]
    broken = b"\xff\xd8\xff" + bytes(300)
    big = jpeg(photo(rng, 900, 900))
    datas = [good[0], png(photo(rng, 40, 40)), good[1], broken, None, big, good[2]]
    decoded = decode_jpegs_torch(datas, "cpu", max_pixels=500_000)
    assert [t is not None for t in decoded] == [True, False, True, False, False, False, True]
    assert tuple(decoded[2].shape) == (3, 64, 90)

    enc = OpenClipEncoder(tiny_model, device="cpu")
    cpu = ImageDecoder.for_encoder(enc, DecodeOptions(draft=0, max_pixels=500_000))
    gpu = TorchJpegDecoder(cpu, enc.tensor_preparer(), "cpu")
    results = gpu.chunk(datas)
    ok = STATUS_OK
    assert [s for s, _ in results] == [ok, ok, ok, UNDECODABLE, MISSING_IMAGE, TOO_LARGE, ok]
    assert gpu.fallbacks == 3  # png, broken, big (the missing one is not a decode)
    for (_, item), data in zip(results, datas):
        if data in good:  # same resize/crop on the tensor: close to the PIL path
            ref = cpu(data)[1].astype(np.float32)
            assert tuple(item.shape) == ref.shape == (32, 32, 3)
            assert np.abs(item.numpy().astype(np.float32) - ref).mean() < 6
    emb = enc.encode_prepared([item for s, item in results if s == STATUS_OK])
    ref = enc.encode_prepared([cpu(d)[1] for d in datas if cpu(d)[0] == STATUS_OK])
    assert emb.shape == ref.shape == (4, 32) and (np.sum(emb * ref, axis=1) > 0.98).all()


def test_gpu_decode_option_runs_the_stage_on_the_encoder_device(jpeg_shards, tiny_model, tmp_path):
    """--gpu-decode end to end (on the CPU device here): same statuses as the CPU decoder,
    embeddings close to it (resize on tensors vs PIL), and a different stage fingerprint."""
    kw = dict(model=tiny_model, clusters=3, steps=[{"method": "random", "keep": 0.5}], batch_size=8, write=False)
    kw.update(progress=False, log=lambda *_: None)
    cpu = run_filter(jpeg_shards, tmp_path / "a", **kw)
    gpu = run_filter(jpeg_shards, tmp_path / "b", gpu_decode=True, **kw)
    assert gpu.stages["embed"].fingerprint != cpu.stages["embed"].fingerprint
    assert cpu.stages["embed"].load().keys["status"].tolist() == gpu.stages["embed"].load().keys["status"].tolist()
    a, b = (np.concatenate([np.load(p) for p in sorted((tmp_path / o).glob("embed/chunks/*.img.npy"))]) for o in "ab")
    cos = np.sum(a.astype(np.float32) * b.astype(np.float32), axis=1)
    assert len(cos) == 2 * 46 and cos.min() > 0.95


def test_gpu_decode_needs_a_tensor_preparer():
    from pipelines.shards.decode import make_decoder

    with pytest.raises(ValueError, match="needs an encoder with tensor_preparer"):
        make_decoder(PixelProjectionEncoder(), DecodeOptions(gpu=True))
    with pytest.raises(ValueError, match="decode workers must be >= 0"):
        DecodeOptions(workers=-1)


# --------------------------------------------------------------------------- stream + stage


def test_embed_stream_keeps_input_order_and_batches_by_position(tiny_model):
    rng = np.random.default_rng(5)
    enc = OpenClipEncoder(tiny_model, device="cpu")
    datas = [jpeg(photo(rng, 60 + i, 70)) for i in range(11)]
    datas[3], datas[8] = b"junk", None
    items = [(f"k{i}", d) for i, d in enumerate(datas)]
    timing = EmbedTiming()
    with DecodePool(ImageDecoder.for_encoder(enc, DecodeOptions(draft=0)), workers=1) as pool:
        batches = list(embed_stream(items, enc, pool, batch_size=4, timing=timing))
    assert [k for b in batches for k in b.keys] == [k for k, _ in items]
    assert [len(b.keys) for b in batches] == [4, 4, 3]  # batches are positions 0-3, 4-7, 8-10
    assert [len(b.embeddings) for b in batches] == [3, 4, 2]
    assert [b.slots for b in batches] == [[0, 1, 2], [0, 1, 2, 3], [1, 2]]
    assert batches[0].status == [STATUS_OK] * 3 + [UNDECODABLE]
    assert batches[0].errors[3] and batches[0].errors[0] is None
    emb = np.concatenate([b.embeddings for b in batches])
    ok = [Image.open(io.BytesIO(d)).convert("RGB") for d in datas if d not in (b"junk", None)]
    np.testing.assert_allclose(emb, enc.encode_images(ok), atol=1e-6)
    assert timing.images == 9 and timing.encode_s > 0


def test_rows_depend_on_their_position_not_on_neighbours_or_where_the_stream_starts():
    """The encoder always gets ``batch_size`` rows and an image keeps its slot (position mod
    batch size): undecodable neighbours, a shard end or a stream that starts mid-batch (a
    dataset chunk) change no row, whatever the encoder's arithmetic does with the layout."""
    rng = np.random.default_rng(8)
    datas = [jpeg(photo(rng, 40 + i, 50)) for i in range(13)]
    enc = LayoutSensitiveEncoder(dim=8)
    decoder = ImageDecoder.for_encoder(enc, DecodeOptions(draft=0))

    class Inline:  # the decoder protocol of embed_stream, in this process
        wait_s = 0.0

        def imap(self, items, chunk_size):
            items = list(items)
            for i in range(0, len(items), chunk_size):
                part = items[i : i + chunk_size]
                yield [k for k, _ in part], decoder.chunk([d for _, d in part])

    def rows(items, first_position=0):
        out = {}
        for b in embed_stream(items, enc, Inline(), batch_size=5, first_position=first_position):
            ok = [k for k, st in zip(b.keys, b.status) if st == STATUS_OK]
            out.update(zip(ok, b.embeddings if b.embeddings is not None else []))
        return out

    whole = rows([(f"k{i}", d) for i, d in enumerate(datas)])
    holes = rows([(f"k{i}", b"junk" if i in (1, 6, 7) else d) for i, d in enumerate(datas)])
    tail = rows([(f"k{i}", datas[i]) for i in range(8, 13)], first_position=8)  # a chunk starting at row 8
    assert set(enc.lengths) == {5}
    assert len(holes) == 10 and len(tail) == 5
    for part in (holes, tail):
        for key, row in part.items():
            assert row.tobytes() == whole[key].tobytes(), key


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [8, 5])
def test_artifacts_identical_for_0_1_2_decode_workers(jpeg_shards, tiny_model, batch_size, tmp_path):
    """Embeddings, keep-list and output shards do not depend on the number of workers."""
    kw = dict(
        model=tiny_model,
        clusters=3,
        steps=[{"method": "semdedup", "eps": 0.01}, {"method": "dbp", "keep": 0.5}],
        batch_size=batch_size,
        shard_max_count=30,
        progress=False,
        log=lambda *_: None,
    )
    runs = {w: run_filter(jpeg_shards, tmp_path / f"w{w}", decode_workers=w, **kw) for w in (0, 1, 2)}
    files = {w: artifact_bytes(tmp_path / f"w{w}") for w in runs}
    assert any(name.endswith(".img.npy") for name in files[0]) and any(name.endswith(".tar") for name in files[0])
    assert files[1] == files[0] and files[2] == files[0]
    s = runs[2].stages["embed"].summary
    assert s["embedded"] == 2 * 46 and s["undecodable"] == 2 and s["missing_image"] == 2
    assert s["images_per_s"] > 0 and 0 <= s["decode_wait_share"] <= 1 and 0 < s["encode_share"] <= 1
    # the worker count is not a parameter of the rows: a rerun with another count skips
    again = run_filter(jpeg_shards, tmp_path / "w0", decode_workers=2, **kw)
    assert again.stages["embed"].skipped
    # draft decoding is: it changes the rows of the large JPEGs, so the stage reruns
    full = run_filter(jpeg_shards, tmp_path / "w0", decode_workers=1, jpeg_draft=0, **kw)
    assert not full.stages["embed"].skipped
    assert (tmp_path / "w0/embed/chunks/00000.img.npy").read_bytes() != files[0]["embed/chunks/00000.img.npy"]


class ThreadRecorder(PixelProjectionEncoder):
    """The pixel projection, plus a record of torch's thread count at each batch."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.seen = set()

    def encode_prepared(self, items):
        import torch

        self.seen.add(torch.get_num_threads())
        return super().encode_prepared(items)


@pytest.mark.slow
def test_the_run_sets_records_and_restores_the_thread_count(jpeg_shards, tmp_path):
    """Float results may depend on the BLAS thread count, so the run fixes it (``threads``),
    runs the encoder, k-means and the steps under it, and records it in the fingerprints of
    embed, cluster and select: another count reruns them; the caller's count is restored."""
    import torch

    kw = dict(clusters=3, steps=[{"method": "semdedup", "eps": 0.01}], batch_size=8, write=False, progress=False)
    before = torch.get_num_threads()
    runs = {}
    for threads in (1, 2, 1):
        enc = ThreadRecorder(dim=16)
        runs[threads] = run_filter(
            jpeg_shards, tmp_path / "out", encoder=enc, threads=threads, log=lambda *_: None, **kw
        )
        assert torch.get_num_threads() == before
        assert enc.seen <= {threads}
        for name in ("embed", "cluster", "select"):
            record = json.loads((tmp_path / "out" / name / "_stage.json").read_text())
            assert record["params"]["threads"] == threads
    assert not any(st.skipped for st in runs[2].stages.values())  # 1 -> 2: every stage reran
    # the pixel projection is exact integer arithmetic: its rows do not depend on the count
    pd.testing.assert_frame_equal(runs[1].keep, runs[2].keep)
    default = run_filter(jpeg_shards, tmp_path / "default", encoder=ThreadRecorder(dim=16), log=lambda *_: None, **kw)
    assert default.stages["embed"].params["threads"] == before  # None: torch's count, recorded
    with pytest.raises(ValueError, match="--threads must be an integer >= 1"):
        run_filter(jpeg_shards, tmp_path / "bad", encoder=ThreadRecorder(dim=16), threads=0, **kw)


@pytest.mark.slow
def test_adding_or_replacing_a_shard_embeds_only_that_shard(jpeg_shards, tmp_path):
    """A chunk depends only on its shard and the parameters: a rerun with one more shard
    keeps the finished chunks (not rewritten) and embeds the new shard; a replaced shard is
    embedded again; the result equals a fresh run's. Another parameter clears everything."""
    import shutil

    src = sorted(Path(jpeg_shards.split("{")[0]).glob("*.tar"))
    shards = tmp_path / "shards"
    shards.mkdir()
    for p in src:
        shutil.copy(p, shards / p.name)
    a, b = (str(shards / p.name) for p in src)
    kw = dict(encoder=PixelProjectionEncoder(dim=16), clusters=3, steps=[{"method": "random", "keep": 0.5}])
    kw.update(batch_size=8, write=False, progress=False, log=lambda *_: None)
    out = tmp_path / "out"
    chunk = out / "embed" / "chunks"

    def stamp(i):
        st = (chunk / f"{i:05d}.img.npy").stat()
        return st.st_ino, st.st_mtime_ns

    run_filter([a], out, **kw)
    first = stamp(0)
    grown = run_filter([a, b], out, **kw)
    assert not grown.stages["embed"].skipped and stamp(0) == first  # shard a: not embedded again
    fresh = run_filter([a, b], tmp_path / "fresh", **kw)
    pd.testing.assert_frame_equal(grown.keep, fresh.keep)
    assert artifact_bytes(out / "embed") == artifact_bytes(tmp_path / "fresh" / "embed")

    second = stamp(1)
    os.utime(a, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))  # shard a "replaced"
    run_filter([a, b], out, **kw)
    assert stamp(1) == second and stamp(0) != first
    run_filter([a, b], out, **{**kw, "batch_size": 5})  # another parameter: every chunk again
    assert stamp(1) != second


def test_too_large_images_are_counted_and_reasoned(tmp_path):
    rng = np.random.default_rng(6)
    samples = [(f"small_{i}", {"jpg": jpeg(photo(rng, 100, 80))}) for i in range(6)]
    samples.insert(2, ("huge", {"jpg": jpeg(photo(rng, 1200, 1000))}))
    write_tar(tmp_path / "a.tar", samples)
    kw = dict(encoder=PixelProjectionEncoder(dim=16), clusters=2, steps=[{"method": "random", "keep": 0.5}])
    kw.update(jpeg_draft=0, max_pixels=1_000_000, progress=False, log=lambda *_: None)
    res = run_filter(str(tmp_path / "a.tar"), tmp_path / "out", **kw)
    assert res.stages["embed"].summary["too_large"] == 1
    keep = res.keep.set_index("key")
    assert keep.loc["huge", "reason"] == TOO_LARGE and not keep.loc["huge", "kept"]
    assert "1 too large" in res.table()
    from pipelines.shards import PipelineError

    with pytest.raises(PipelineError, match="image too large: huge.jpg"):
        run_filter(str(tmp_path / "a.tar"), tmp_path / "strict", strict=True, **kw)


# --------------------------------------------------------------------------- memory

MEMORY_CHILD = """
import re, sys
from pipelines.encoders import PixelProjectionEncoder
from pipelines.shards.decode import DecodeOptions
from pipelines.shards.embed import EmbedStage


def vm(name):
    return int(re.search(name + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) // 1024


stage = EmbedStage(sys.argv[1], [sys.argv[2]], PixelProjectionEncoder(size=64, dim=16), batch_size=4,
                   decode=DecodeOptions(workers=0, draft=float(sys.argv[3])), progress=False)
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # reset the peak (VmHWM) to the current RSS, after the imports
base = vm("VmRSS")
art = stage.run(log=lambda *_: None)
print(vm("VmHWM") - base, art.n_rows, stage.summary["too_large"])
"""


@pytest.fixture(scope="module")
def big_shard(tmp_path_factory):
    """3 copies of a 50 MP JPEG (8192 x 6144) among 12 small ones."""
    root = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(7)
    big = jpeg(photo(rng, 256, 192).resize((8192, 6144), Image.BILINEAR), quality=80)
    samples = [(f"small_{i:02d}", {"jpg": jpeg(photo(rng, 300, 200))}) for i in range(12)]
    for j, pos in enumerate((1, 6, 10)):
        samples.insert(pos, (f"big_{j}", {"jpg": big}))
    write_tar(root / "big.tar", samples)
    return root / "big.tar"


def _peak_rss_mb(tmp_path: Path, shard: Path, draft: float) -> tuple[int, int, int]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, str(tmp_path / f"out{draft}"), str(shard), str(draft)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    delta, rows, too_large = (int(x) for x in res.stdout.split())
    return delta, rows, too_large


@pytest.mark.slow
def test_50mp_jpegs_embed_under_a_fixed_memory_ceiling(big_shard, tmp_path):
    """Draft decoding decodes a 50 MP JPEG at 1/8 scale: the peak RSS of the embedding
    process (decoding inline: 0 workers, so one process holds everything) stays within 80 MB
    of its post-import RSS; a full decode of one such image needs 150 MB as RGB (its peak is
    measured here as well, so the ceiling means something). Peak = the child's VmHWM, reset
    after the imports (``getrusage``'s ru_maxrss would inherit the forking parent's peak
    across exec on Linux)."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    delta, rows, too_large = _peak_rss_mb(tmp_path, big_shard, draft=1.0)
    assert rows == 15 and too_large == 0
    assert delta < 80, f"peak RSS {delta} MB above the baseline"
    full, rows, _ = _peak_rss_mb(tmp_path, big_shard, draft=0.0)
    assert rows == 15 and full > 100
