"""Shard filtering pipeline: end to end on real images, resume after kill, errors, skip logic.

Images: the first samples of the CIFAR-10 webdataset shards when the shared data is there,
generated PNG shards otherwise. Encoder: a tiny random-weight open_clip ViT built from a
config (in process) and the weight-free pixel projection (in the CLI subprocesses, which
then start without importing open_clip).
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dataprune import dbp, semdedup
from pipelines.shards import (
    PipelineError,
    ShardError,
    expand_shards,
    iter_shard,
    plan_output_shards,
    run_filter,
    split_member_name,
)
from prunecore import ChunkedRows, Clustering, kmeans
from tests.helpers import REPO, artifact_bytes
from tests.helpers.shards import rename as _rename
from tests.helpers.shards import source_samples as _source_samples
from tests.helpers.shards import write_shard

N_SHARDS, PER_SHARD, N_DUP = 3, 80, 8
EPS, KEEP, K = 0.003, 0.5, 6


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """3 shards of 80 real images; the last shard also holds N_DUP exact copies (new keys)
    of images from shard 0."""
    root = tmp_path_factory.mktemp("shards")
    samples = _source_samples(N_SHARDS * PER_SHARD)
    for s in range(N_SHARDS):
        part = samples[s * PER_SHARD : (s + 1) * PER_SHARD]
        if s == N_SHARDS - 1:
            part = part + [_rename(samples[3 * i], f"dup_{i:03d}") for i in range(N_DUP)]
        write_shard(root / f"{s:05d}.tar", part)
    return root


STEPS = [{"method": "semdedup", "eps": EPS}, {"method": "dbp", "keep": KEEP, "temperature": 0.5}]


def pattern(shard_dir: Path) -> str:
    return str(shard_dir / f"{{00000..{N_SHARDS - 1:05d}}}.tar")


@pytest.fixture(scope="module")
def e2e(shard_dir, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e")
    res = run_filter(
        pattern(shard_dir),
        out,
        model=tiny_model,
        clusters=K,
        steps=STEPS,
        batch_size=32,
        shard_max_count=40,
        progress=False,
        log=lambda *_: None,
    )
    return out, res


def read_tar(path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]


# --------------------------------------------------------------------------- shards


def test_expand_shards_patterns(shard_dir):
    p = pattern(shard_dir)
    paths = expand_shards(p)
    assert [Path(x).name for x in paths] == ["00000.tar", "00001.tar", "00002.tar"]
    assert expand_shards(str(shard_dir / "*.tar")) == paths
    assert expand_shards(["file://" + paths[1], paths[0]]) == [paths[1], paths[0]]
    with pytest.raises(FileNotFoundError, match="no shards matched"):
        expand_shards(str(shard_dir / "{00000..00007}.tar"))
    with pytest.raises(FileNotFoundError, match="no shards matched"):
        expand_shards(str(shard_dir / "nothing*.tar"))
    with pytest.raises(ValueError, match="only local files"):
        expand_shards("https://example.com/{0..3}.tar")


def test_split_member_name_and_plan():
    assert split_member_name("a/b/train_01.seg.png") == ("a/b/train_01", "seg.png")
    assert split_member_name("noext") is None
    # ShardWriter rule: roll over once count or size is reached
    assert plan_output_shards([10] * 5, max_count=2, max_size=10**9) == [0, 0, 1, 1, 2]
    assert plan_output_shards([600, 600, 100, 100], max_count=99, max_size=1000) == [0, 0, 1, 1]


# --------------------------------------------------------------------------- end to end


def test_keep_list_matches_brute_force_and_core_functions(e2e):
    out, res = e2e
    keep = pd.read_parquet(out / "select" / "keep.parquet")
    n = N_SHARDS * PER_SHARD + N_DUP
    assert len(keep) == n and keep["key"].is_unique
    assert list(keep.columns[:6]) == ["key", "shard", "kept", "reason", "cluster", "score"]
    assert (keep.loc[keep["kept"], "reason"] == "").all()
    assert set(keep.loc[~keep["kept"], "reason"]) <= {"duplicate", "quota"}

    chunks = sorted((out / "embed" / "chunks").glob("*.img.npy"))
    assert len(chunks) == N_SHARDS and np.load(chunks[0]).dtype == np.float16
    emb = np.concatenate([np.load(p) for p in chunks]).astype(np.float32)
    clu = kmeans(emb, K, seed=1234)
    np.testing.assert_array_equal(keep["cluster"].to_numpy(), clu.labels)

    # brute-force reference rule of SemDeDup: dropped iff cos > 1 - eps to an earlier row
    # of the cluster in "hard" order (ascending similarity to the centroid, ties by row)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    dup = np.zeros(n, dtype=bool)
    for c in range(K):
        rows = np.flatnonzero(clu.labels == c)
        rows = rows[np.lexsort((rows, clu.sim[rows]))]
        sims = unit[rows] @ unit[rows].T
        for j in range(1, len(rows)):
            dup[rows[j]] = (sims[j, :j] > 1 - EPS).any()
    np.testing.assert_array_equal(keep["reason"].to_numpy() == "duplicate", dup)
    assert 0 < dup.sum() < n // 2
    # every injected exact copy (or its original) is caught as a duplicate
    by_key = keep.set_index("key")
    for i in range(N_DUP):
        orig = keep["key"].iloc[3 * i]
        assert (by_key.loc[[orig, f"dup_{i:03d}"], "reason"] == "duplicate").sum() >= 1

    # DBP on the survivors, composed: identical to calling the core functions directly
    s1 = semdedup(emb, EPS, clustering=clu)
    idx = s1.indices
    sub = Clustering(clu.centroids, clu.labels[idx], clu.sim[idx])
    s2 = dbp(emb[idx], KEEP, clustering=sub, temperature=0.5)
    expected = s1 & s2.lift(idx, n)
    np.testing.assert_array_equal(keep["kept"].to_numpy(), expected.keep)
    assert keep["kept"].sum() == int(np.floor(KEEP * len(idx) + 0.5))
    stats = pd.read_parquet(out / "select" / "stats_1_dbp.parquet")
    kept_per_cluster = np.bincount(keep.loc[keep["kept"], "cluster"], minlength=K)
    np.testing.assert_array_equal(kept_per_cluster, stats["quota"].to_numpy())


def test_output_shards_hold_exactly_the_kept_samples_byte_identical(e2e, shard_dir):
    import webdataset as wds

    out, res = e2e
    keep = pd.read_parquet(out / "select" / "keep.parquet")
    manifest = json.loads((out / "write" / "manifest.json").read_text())
    files = [out / "write" / r["file"] for r in manifest["shards"]]
    assert all(r["samples"] <= 40 for r in manifest["shards"]) and len(files) >= 2
    # read back with webdataset itself: keys, in input order
    ds = wds.WebDataset([str(f) for f in files], shardshuffle=False)
    got_keys = [s["__key__"] for s in ds]
    assert got_keys == keep.loc[keep["kept"], "key"].tolist()
    # every member of every kept sample has its input bytes and name
    inputs = {}
    for shard in sorted(shard_dir.glob("*.tar")):
        for sample in iter_shard(str(shard)):
            inputs[sample.key] = {info.name: data for info, data in sample.members.values()}
    written = {}
    for f in files:
        for name, data in read_tar(f):
            written.setdefault(name.split(".", 1)[0], {})[name] = data
    assert set(written) == set(got_keys)
    for key, members in written.items():
        assert members == inputs[key]
    import hashlib

    for r, f in zip(manifest["shards"], files):
        assert hashlib.sha256(f.read_bytes()).hexdigest() == r["sha256"]


def test_rerun_skips_and_param_change_reruns_downstream(e2e, shard_dir, tiny_model):
    out, _ = e2e
    # every file but the lock (which records each run's pid/host) stays untouched on a skip
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".prunekit.lock"}
    res = run_filter(
        pattern(shard_dir),
        out,
        model=tiny_model,
        clusters=K,
        steps=STEPS,
        batch_size=32,
        shard_max_count=40,
        progress=False,
        log=lambda *_: None,
    )
    assert all(st.skipped for st in res.stages.values())
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".prunekit.lock"}
    assert after == before
    assert "skipped" in res.table()
    # a different keep fraction: embed and cluster reused, select and write rerun
    other = out.parent / (out.name + "_keep")
    import shutil

    shutil.copytree(out, other)
    steps = [STEPS[0], {**STEPS[1], "keep": 0.25}]
    res2 = run_filter(
        pattern(shard_dir),
        other,
        model=tiny_model,
        clusters=K,
        steps=steps,
        batch_size=32,
        shard_max_count=40,
        progress=False,
        log=lambda *_: None,
    )
    assert [st.skipped for st in res2.stages.values()] == [True, True, False, False]
    assert res2.keep["kept"].sum() < res.keep["kept"].sum()
    # a different k reruns cluster and everything after it
    res3 = run_filter(
        pattern(shard_dir),
        other,
        model=tiny_model,
        clusters=K - 1,
        steps=steps,
        batch_size=32,
        shard_max_count=40,
        progress=False,
        log=lambda *_: None,
    )
    assert [st.skipped for st in res3.stages.values()] == [True, False, False, False]
    assert res3.keep["cluster"].max() == K - 2


def test_precomputed_embeddings_give_the_same_keep_list(e2e, shard_dir, tmp_path):
    out, res = e2e
    keys = pd.read_parquet(out / "embed" / "keys.parquet")
    # LAION layout: two img_emb files + metadata parquet with keys, in a shuffled order
    emb = ChunkedRows([np.load(p) for p in sorted((out / "embed" / "chunks").glob("*.img.npy"))])
    perm = np.random.default_rng(0).permutation(emb.shape[0])
    half = len(perm) // 2
    for i, part in enumerate((perm[:half], perm[half:])):
        np.save(tmp_path / f"img_emb_{i}.npy", emb.take(part))
        pd.DataFrame({"key": keys["key"].to_numpy()[part], "url": "x"}).to_parquet(tmp_path / f"metadata_{i}.parquet")
    res2 = run_filter(
        pattern(shard_dir),
        tmp_path / "out",
        embeddings=str(tmp_path / "img_emb_*.npy"),
        metadata=str(tmp_path / "metadata_*.parquet"),
        clusters=K,
        max_points_per_centroid=10**6,
        steps=STEPS,
        shard_max_count=40,
        progress=False,
        log=lambda *_: None,
    )
    # keys come back in shard order, each pointing at its own (moved) embedding row
    assert res2.keep["key"].tolist() == res.keep["key"].tolist()
    ingested = np.concatenate([np.load(tmp_path / f"img_emb_{i}.npy") for i in range(2)])
    np.testing.assert_array_equal(ingested[res2.keep["row"].to_numpy()], emb.take(res.keep["row"].to_numpy()))
    assert res2.keep["reason"].isin(["", "duplicate", "quota"]).all()
    # exact equality when the row order is the same as the embed stage's
    np.save(tmp_path / "same.npy", emb.take(np.arange(emb.shape[0])))
    keys[["key"]].to_parquet(tmp_path / "same.parquet")
    res3 = run_filter(
        pattern(shard_dir),
        tmp_path / "out3",
        embeddings=str(tmp_path / "same.npy"),
        metadata=str(tmp_path / "same.parquet"),
        clusters=K,
        steps=STEPS,
        shard_max_count=40,
        progress=False,
        log=lambda *_: None,
    )
    pd.testing.assert_frame_equal(res3.keep, res.keep)
    assert [r["sha256"] for r in res3.manifest["shards"]] == [r["sha256"] for r in res.manifest["shards"]]
    # mismatched counts are reported clearly
    pd.DataFrame({"key": ["a", "b"]}).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(PipelineError, match="mismatched counts"):
        run_filter(
            None,
            tmp_path / "bad",
            embeddings=str(tmp_path / "same.npy"),
            metadata=str(tmp_path / "bad.parquet"),
            clusters=K,
            steps=STEPS,
            progress=False,
            log=lambda *_: None,
        )


# --------------------------------------------------------------------------- kill / resume


def _cli(cli_command, out: Path, shards: str, die: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [
        *cli_command(die),
        "filter",
        shards,
        "--out",
        str(out),
        "--encoder",
        "pipelines.encoders:PixelProjectionEncoder",
        "--encoder-kwargs",
        '{"dim": 32}',
        "--clusters",
        str(K),
        "--dedup-eps",
        "0.02",
        "--method",
        "dbp",
        "--keep",
        str(KEEP),
        "--batch-size",
        "16",
        "--shard-max-count",
        "25",
        "--quiet",
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_killed_mid_embed_and_mid_write_resumes_to_identical_output(shard_dir, tmp_path, cli_command):
    shards = pattern(shard_dir)
    ref = tmp_path / "ref"
    from pipelines.encoders import PixelProjectionEncoder
    from pipelines.shards import default_steps

    steps = default_steps(dedup_eps=0.02, method="dbp", keep=KEEP)
    run_filter(
        shards,
        ref,
        encoder=PixelProjectionEncoder(dim=32),
        clusters=K,
        steps=steps,
        batch_size=16,
        shard_max_count=25,
        progress=False,
        log=lambda *_: None,
    )

    out = tmp_path / "killed"
    r1 = _cli(cli_command, out, shards, die="embed:130")  # dies inside shard 1
    assert r1.returncode == -9, r1.stderr[-2000:]
    assert (out / "embed" / "chunks" / "00000.keys.parquet").exists()
    assert not (out / "embed" / "chunks" / "00001.keys.parquet").exists()
    assert json.loads((out / "embed" / "_stage.json").read_text())["state"] == "running"
    assert not (out / "select").exists()

    r2 = _cli(cli_command, out, shards, die="write:60")  # resumes embed, dies inside write
    assert r2.returncode == -9, r2.stderr[-2000:]
    assert "resuming" in r2.stdout
    done = sorted((out / "write" / "done").glob("*.json"))
    assert 1 <= len(done) < len(list((ref / "write").glob("*.tar")))
    assert list((out / "write").glob(".shard-*.tar.*.tmp"))  # the shard being written when killed (unique name)

    r3 = _cli(cli_command, out, shards)
    assert r3.returncode == 0, r3.stderr[-2000:]
    assert "| write | ran" in r3.stdout and "| embed | skipped" in r3.stdout
    assert not list((out / "write").glob(".*.tmp"))
    assert artifact_bytes(out) == artifact_bytes(ref)


# --------------------------------------------------------------------------- bad inputs


@pytest.fixture(scope="module")
def bad_shards(shard_dir, tmp_path_factory):
    """Shard 0 fine; shard 1 has a sample without image and one with garbage JPEG bytes and
    a duplicate key; shard 2 truncated in the middle."""
    root = tmp_path_factory.mktemp("bad")
    samples = _source_samples(60)
    write_shard(root / "a.tar", samples[:20])
    no_image = [(i, d) for i, d in _rename(samples[20], "no_image") if not i.name.endswith((".jpg", ".png"))]
    garbage = tarfile.TarInfo("garbage.jpg")
    garbage.size = 100
    write_shard(root / "b.tar", samples[21:30] + [no_image, [(garbage, b"\xff\xd8" + bytes(98))]])
    write_shard(root / "c.tar", samples[30:60])
    data = (root / "c.tar").read_bytes()
    (root / "c.tar").write_bytes(data[: len(data) // 2])
    write_shard(root / "d.tar", [samples[0]])  # same key as in a.tar
    return root


def test_corrupt_and_missing_inputs_are_counted_not_fatal(bad_shards, tmp_path):
    from pipelines.encoders import PixelProjectionEncoder

    enc = PixelProjectionEncoder(dim=16)
    shards = [str(bad_shards / n) for n in ("a.tar", "b.tar", "c.tar")]
    messages = []
    res = run_filter(
        shards,
        tmp_path / "o",
        encoder=enc,
        clusters=3,
        steps=[{"method": "random", "keep": 0.5}],
        progress=False,
        log=messages.append,
    )
    s = res.stages["embed"].summary
    assert s["missing_image"] == 1 and s["undecodable"] == 1
    assert len(s["corrupt_shards"]) == 1 and "c.tar" in s["corrupt_shards"][0]
    assert any("corrupt tar" in m for m in messages)
    keep = res.keep.set_index("key")
    assert keep.loc["no_image", "reason"] == "missing_image" and not keep.loc["no_image", "kept"]
    assert keep.loc["garbage", "reason"] == "undecodable"
    n_c = int((res.keep["shard"] == shards[2]).sum())
    assert 0 < n_c < 30  # the samples before the damage
    assert res.keep["kept"].sum() == int(np.floor(0.5 * (20 + 9 + n_c) + 0.5))
    written = sum(r["samples"] for r in res.manifest["shards"])
    assert written == res.keep["kept"].sum()
    table = res.table()
    assert "1 missing image" in table and "1 undecodable" in table and "1 corrupt" in table

    opts = dict(encoder=enc, clusters=3, steps=[{"method": "random", "keep": 0.5}], progress=False)
    with pytest.raises(ShardError, match="corrupt tar .*c.tar"):  # found by the header scan, before embedding
        run_filter(shards, tmp_path / "strict_corrupt", strict=True, log=lambda *_: None, **opts)
    assert not (tmp_path / "strict_corrupt" / "embed" / "chunks").exists()
    with pytest.raises(PipelineError, match="no image member"):
        run_filter(shards[:2], tmp_path / "strict", strict=True, log=lambda *_: None, **opts)
    with pytest.raises(ShardError, match="duplicate keys"):  # from the tar headers, before embedding
        run_filter([shards[0], str(bad_shards / "d.tar")], tmp_path / "dup", log=lambda *_: None, **opts)


def test_cli_reports_clear_errors(shard_dir, tmp_path, capsys):
    from pipelines.cli import main

    rc = main(
        ["filter", str(tmp_path / "none_{0..3}.tar"), "--out", str(tmp_path / "o"), "--model", "ViT-B-32", "--quiet"]
    )
    assert rc == 2 and "no shards matched" in capsys.readouterr().err
    rc = main(["filter", pattern(shard_dir), "--out", str(tmp_path / "o"), "--model", "NoSuchModel-7", "--quiet"])
    assert rc == 2 and "unknown open_clip model" in capsys.readouterr().err
    rc = main(
        [
            "filter",
            pattern(shard_dir),
            "--out",
            str(tmp_path / "o"),
            "--model",
            "ViT-B-32",
            "--method",
            "semdedup",
            "--quiet",
        ]
    )
    assert rc == 2 and "needs --dedup-eps" in capsys.readouterr().err


def test_kmeans_accepts_chunked_rows_when_all_rows_train():
    """Foundation fix: kmeans loaded a ChunkedRows with np.asarray (a 0-d object array)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 8)).astype(np.float32)
    rows = ChunkedRows([x[:20], x[20:]])
    a, b = kmeans(rows, 3, niter=5), kmeans(x, 3, niter=5)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_allclose(a.centroids, b.centroids)


@pytest.mark.slow
def test_report_writes_html_and_plots(e2e):
    from pipelines.cli import main

    out, res = e2e
    assert main(["report", str(out), "--clusters-shown", "2"]) == 0
    page = (out / "report" / "index.html").read_text()
    for png in ("cluster_sizes.png", "complexity_quota.png", "kept_fraction.png", "examples.png", "duplicates.png"):
        assert f"src='{png}'" in page
        assert (out / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    n_dup = int((res.keep["reason"] == "duplicate").sum())
    assert f"<td>duplicate</td><td>{n_dup:,}</td>" in page
    assert f"{int(res.keep['kept'].sum()):,} kept" in page


def test_clip_score_step_uses_caption_embeddings(shard_dir, tiny_model, tmp_path):
    out = tmp_path / "clip"
    first = run_filter(
        pattern(shard_dir),
        out,
        model=tiny_model,
        clusters=K,
        steps=[{"method": "clipscore", "keep": 0.5}],
        batch_size=32,
        write=False,
        progress=False,
        log=lambda *_: None,
    )
    img = np.concatenate([np.load(p) for p in sorted((out / "embed/chunks").glob("*.img.npy"))])
    txt = np.concatenate([np.load(p) for p in sorted((out / "embed/chunks").glob("*.txt.npy"))])
    assert img.shape == txt.shape
    a = img.astype(np.float32) / np.linalg.norm(img.astype(np.float32), axis=1, keepdims=True)
    b = txt.astype(np.float32) / np.linalg.norm(txt.astype(np.float32), axis=1, keepdims=True)
    cos = (a * b).sum(1)
    keep = first.keep
    np.testing.assert_allclose(keep["score"].to_numpy(), cos, rtol=0, atol=1e-5)
    assert keep["kept"].sum() == int(np.floor(0.5 * len(keep) + 0.5))
    assert cos[keep["kept"]].min() >= cos[~keep["kept"]].max()
    assert set(keep.loc[~keep["kept"], "reason"]) == {"low_clip_score"}
    # a threshold instead of a fraction: select reruns, the embeddings are reused
    thr = float(np.median(cos))
    res = run_filter(
        pattern(shard_dir),
        out,
        model=tiny_model,
        clusters=K,
        steps=[{"method": "clipscore", "min": thr}],
        batch_size=32,
        write=False,
        progress=False,
        log=lambda *_: None,
    )
    assert res.stages["embed"].skipped and not res.stages["select"].skipped
    np.testing.assert_array_equal(res.keep["kept"].to_numpy(), cos >= thr)


def test_hf_vision_encoder_from_local_folder(tmp_path):
    import torch
    from PIL import Image
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    from pipelines.encoders import make_encoder

    torch.manual_seed(0)
    cfg = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    model = ViTModel(cfg).eval()
    model.save_pretrained(tmp_path / "vit")
    proc = ViTImageProcessor(size={"height": 32, "width": 32})
    proc.save_pretrained(tmp_path / "vit")
    enc = make_encoder("hf:" + str(tmp_path / "vit"), device="cpu")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(3)]
    got = enc.encode_images(images)
    with torch.no_grad():
        ref = model(pixel_values=proc(images=images, return_tensors="pt")["pixel_values"])
    ref = torch.nn.functional.normalize(ref.pooler_output, dim=-1).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert enc.fingerprint["kind"] == "hf" and enc.fingerprint["files"]
    with pytest.raises(ValueError, match="unknown transformers image model"):
        make_encoder("hf:" + str(tmp_path / "missing"), device="cpu")
