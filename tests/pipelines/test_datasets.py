"""Hugging Face datasets / parquet input and output of the filter pipeline (pipelines/datasets.py).

The dataset is built offline from the first samples of a CIFAR-10 webdataset shard (plus
exact copies of some images under new keys, so SemDeDup has duplicates to find), read as
``load_dataset("webdataset")``, as a ``save_to_disk`` folder and as a parquet table with a
precomputed embedding column. Encoder: the weight-free pixel projection.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataprune import Selection
from pipelines.datasets import DatasetInput, embedding_rows, load_local_dataset
from pipelines.encoders import PixelProjectionEncoder
from pipelines.shards import PipelineError, iter_shard, run_filter
from tests.helpers import REPO, artifact_bytes
from tests.helpers.shards import TINY_VIT

N_SRC, N_DUP, K, DIM, BATCH = 200, 8, 6, 32, 16
STEPS = [{"method": "semdedup", "eps": 0.02}, {"method": "dbp", "keep": 0.5}]
COMPARED = ["key", "kept", "reason", "cluster", "score"]


def quiet(**options) -> dict:
    return {"clusters": K, "steps": STEPS, "batch_size": BATCH, "progress": False, "log": lambda *_: None, **options}


@pytest.fixture(scope="module", params=[BATCH, 7], ids=lambda b: f"batch{b}")
def batch(request) -> int:
    """The batch size of the tests that compare input paths: a second size (7) that divides
    neither the shard nor any chunk size, so that an equality cannot hold by the luck of one
    batch layout on one machine."""
    return request.param


@pytest.fixture(scope="module")
def cifar_tar(shared_data, tmp_path_factory) -> Path:
    """One webdataset shard: the first N_SRC CIFAR-10 samples + N_DUP exact copies (new keys)."""
    src = shared_data / "cifar10" / "cifar10-train-00000.tar"
    samples: dict[str, list] = {}
    with tarfile.open(src) as tar:
        for info in tar:
            key = info.name.split(".", 1)[0]
            if key not in samples and len(samples) == N_SRC:
                break
            samples.setdefault(key, []).append((info, tar.extractfile(info).read()))
    path = tmp_path_factory.mktemp("wds") / "cifar-00000.tar"
    keys = list(samples)
    with tarfile.open(path, "w") as tar:
        for key in keys + [f"dup_{i:03d}" for i in range(N_DUP)]:
            members = samples[key] if key in samples else samples[keys[3 * int(key[4:])]]
            for info, data in members:
                new = tarfile.TarInfo(f"{key}.{info.name.split('.', 1)[1]}")
                new.size, new.mtime = len(data), info.mtime
                tar.addfile(new, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("hf_cache"))


@pytest.fixture(scope="module")
def wds(cifar_tar, cache_dir):
    """The shard as ``load_dataset("webdataset", data_files=...)``."""
    import datasets

    return datasets.load_dataset("webdataset", data_files=str(cifar_tar), split="train", cache_dir=cache_dir)


@pytest.fixture(scope="module")
def tar_run(cifar_tar, batch, tmp_path_factory):
    """The reference: the tar path on the same samples and parameters."""
    out = tmp_path_factory.mktemp("tar_out")
    return run_filter(str(cifar_tar), out, **quiet(encoder=PixelProjectionEncoder(dim=DIM), batch_size=batch))


def kept_rows(dataset, keep: pd.DataFrame) -> pa.Table:
    """The input rows the keep-list keeps, in input order, as Arrow."""
    return dataset.with_format("arrow")[keep.loc[keep["kept"], "index"].tolist()]


def test_webdataset_dataset_keep_list_equals_tar_path(cifar_tar, cache_dir, wds, tar_run, batch, tmp_path):
    import datasets

    res = run_filter(
        None,
        tmp_path / "out",
        **quiet(
            hf_dataset=str(cifar_tar),
            image_column="jpg",
            id_column="__key__",
            hf_cache_dir=cache_dir,
            encoder=PixelProjectionEncoder(dim=DIM),
            batch_size=batch,
        ),
    )
    keep = res.keep
    assert len(keep) == N_SRC + N_DUP
    pd.testing.assert_frame_equal(keep[COMPARED], tar_run.keep[COMPARED])
    assert (keep["reason"] == "duplicate").sum() >= N_DUP  # the planted copies are found
    assert keep["index"].tolist() == list(range(len(keep)))

    # the filtered dataset: the kept input rows, byte-identical, in input order
    out = datasets.load_from_disk(res.manifest["path"])
    assert out.features == wds.features
    assert out.data.table.equals(kept_rows(wds, keep))
    # ... and the same image bytes as the tar path's output shards
    tar_images = {s.key: s.get(("jpg",))[1] for p in tar_run.manifest["paths"] for s in iter_shard(p)}
    ds_images = {row["__key__"]: row["jpg"]["bytes"] for row in out.data.table.to_pylist()}
    assert ds_images == tar_images
    assert res.stages["write"].summary["samples"] == int(keep["kept"].sum())


@pytest.fixture(scope="module")
def emb_parquet(wds, tar_run, tmp_path_factory) -> Path:
    """The dataset as one parquet table with a fixed-size-list embedding column holding the
    tar path's embeddings (the rows the tar run stored)."""
    emb = np.load(tar_run.out / "embed" / "chunks" / "00000.img.npy").astype(np.float32)
    table = wds.data.table.replace_schema_metadata(None)
    column = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), DIM)
    path = tmp_path_factory.mktemp("parquet") / "data.parquet"
    pq.write_table(table.append_column("emb", column), path, row_group_size=64)
    return path


def test_parquet_embedding_column_keep_list_and_parquet_output(emb_parquet, cache_dir, tar_run, tmp_path):
    res = run_filter(
        None,
        tmp_path / "out",
        **quiet(
            hf_dataset=str(emb_parquet),
            embedding_column="emb",
            id_column="__key__",
            hf_cache_dir=cache_dir,
            hf_output_format="parquet",
            shard_max_count=40,
        ),
    )
    pd.testing.assert_frame_equal(res.keep[COMPARED], tar_run.keep[COMPARED])
    files = sorted(Path(res.manifest["path"]).glob("*.parquet"))
    n_kept = int(res.keep["kept"].sum())
    assert [f.name for f in files] == [f"train-{j:05d}-of-{len(files):05d}.parquet" for j in range(len(files))]
    assert len(files) == -(-n_kept // 40)
    written = pa.concat_tables([pq.read_table(f) for f in files])
    source = pq.read_table(emb_parquet)
    want = source.take(res.keep.loc[res.keep["kept"], "index"].to_numpy())
    assert written.replace_schema_metadata(None).equals(want.replace_schema_metadata(None))
    assert [f["sha256"] for f in json.loads((tmp_path / "out" / "write" / "manifest.json").read_text())["files"]]


def test_embedding_column_is_read_without_a_copy(emb_parquet, cache_dir):
    inp = DatasetInput.open(str(emb_parquet), embedding_column="emb", cache_dir=cache_dir)
    assert inp.dim == DIM and inp.image_column is None
    part = inp.arrow_view(["emb"])[:50]
    rows = embedding_rows(part.column("emb"), DIM, name="emb", start=0)
    assert rows.shape == (50, DIM) and rows.dtype == np.float32
    assert not rows.flags.owndata  # a view of the memory-mapped Arrow buffer
    want = np.asarray(pq.read_table(emb_parquet).column("emb").to_pylist()[:50], dtype=np.float32)
    np.testing.assert_array_equal(rows, want)


def test_save_to_disk_folder_and_dataset_object_give_the_same_keep_list(wds, tar_run, batch, tmp_path):
    folder = tmp_path / "disk"
    wds.save_to_disk(str(folder))
    opts = quiet(image_column="jpg", encoder=PixelProjectionEncoder(dim=DIM), write=False, batch_size=batch)
    a = run_filter(None, tmp_path / "a", hf_dataset=str(folder), **opts)
    b = run_filter(None, tmp_path / "b", hf_dataset=wds, **opts)
    # without an id column the keys are the row indices
    assert a.keep["key"].tolist() == [str(i) for i in range(N_SRC + N_DUP)]
    pd.testing.assert_frame_equal(a.keep, b.keep.assign(shard=a.keep["shard"]))
    pd.testing.assert_frame_equal(a.keep[COMPARED[1:]], tar_run.keep[COMPARED[1:]])
    assert "write" not in a.stages


def test_image_column_goes_through_the_decode_workers_with_identical_rows(wds, batch, tmp_path):
    """Dataset images are decoded by the embed stage's worker processes; the embeddings and the
    keep-list do not depend on how many there are."""
    enc = PixelProjectionEncoder(dim=DIM)
    opts = quiet(hf_dataset=wds, image_column="jpg", encoder=enc, write=False, batch_size=batch)
    runs = {workers: run_filter(None, tmp_path / f"w{workers}", decode_workers=workers, **opts) for workers in (0, 2)}
    pd.testing.assert_frame_equal(runs[0].keep, runs[2].keep)
    chunks = [sorted((r.out / "embed" / "chunks").glob("*.img.npy")) for r in runs.values()]
    assert len(chunks[0]) == len(chunks[1]) >= 1
    for a, b in zip(*chunks):
        assert np.load(a).tobytes() == np.load(b).tobytes()
    assert runs[2].stages["embed"].summary["images_per_s"] > 0


def test_selection_apply(wds):
    rng = np.random.default_rng(0)
    keep = rng.random(len(wds)) < 0.4
    sel = Selection.from_mask(keep, "quota")
    out = sel.apply(wds)
    assert len(out) == keep.sum()
    assert out.with_format("arrow")[:].equals(wds.with_format("arrow")[np.flatnonzero(keep).tolist()])
    every = sel.apply(wds, reason_column="prune_reason", keep_dropped=True)
    assert len(every) == len(wds)
    assert every["prune_reason"] == ["" if k else "quota" for k in keep]
    frame = pd.DataFrame({"x": np.arange(len(wds))})
    assert sel.apply(frame, reason_column="why")["x"].tolist() == np.flatnonzero(keep).tolist()
    assert sel.apply(np.arange(len(wds))).tolist() == np.flatnonzero(keep).tolist()
    assert sel.apply(list(range(len(wds)))) == np.flatnonzero(keep).tolist()
    with pytest.raises(ValueError, match="covers 208 rows but the dataset has 3"):
        sel.apply([1, 2, 3])
    # a stream (in 2 shards) is filtered lazily, row i of the stream being row i of the selection
    streamed = list(sel.apply(wds.to_iterable_dataset(num_shards=2), reason_column="why", keep_dropped=True))
    assert [r["__key__"] for r in streamed] == wds["__key__"]
    assert [r["why"] for r in streamed] == every["prune_reason"]
    kept_keys = [r["__key__"] for r in sel.apply(wds.to_iterable_dataset(num_shards=2))]
    assert kept_keys == out["__key__"]
    with pytest.raises(ValueError, match="more rows than the 5"):
        list(Selection.keep_all(5).apply(wds.to_iterable_dataset()))


def test_captions_from_the_text_column_give_the_tar_paths_clip_scores(cifar_tar, cache_dir, tmp_path):
    model = tmp_path / "prunekit-test-vit.json"
    model.write_text(json.dumps(TINY_VIT))
    opts = quiet(model=str(model), steps=[{"method": "clipscore", "keep": 0.5}], write=False)
    tar = run_filter(str(cifar_tar), tmp_path / "tar", **opts)
    res = run_filter(
        None,
        tmp_path / "ds",
        hf_dataset=str(cifar_tar),
        image_column="jpg",
        text_column="txt",
        id_column="__key__",
        hf_cache_dir=cache_dir,
        **opts,
    )
    pd.testing.assert_frame_equal(res.keep[COMPARED], tar.keep[COMPARED])
    assert set(res.keep.loc[~res.keep["kept"], "reason"]) == {"low_clip_score"}
    for kind in ("img", "txt"):
        a, b = (np.load(out / "embed" / "chunks" / f"00000.{kind}.npy") for out in (tmp_path / "tar", tmp_path / "ds"))
        np.testing.assert_array_equal(a, b)


def test_ray_backend_embeds_dataset_chunks_like_the_local_backend(wds, batch, tmp_path):
    ray = pytest.importorskip("ray", reason="ray is in the dev extra: pip install 'ray[data]'")
    import datasets

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}},
    )
    try:
        encoder = PixelProjectionEncoder(dim=DIM)
        opts = quiet(hf_dataset=wds, image_column="jpg", encoder=encoder, chunk_rows=64, batch_size=batch)
        local = run_filter(None, tmp_path / "local", **opts)
        remote = run_filter(None, tmp_path / "ray", backend="ray", **opts)
    finally:
        ray.shutdown()
    assert len(list((tmp_path / "ray" / "embed" / "chunks").glob("*.keys.parquet"))) == 4
    pd.testing.assert_frame_equal(remote.keep, local.keep)
    a, b = (datasets.load_from_disk(r.manifest["path"]).data.table for r in (local, remote))
    assert a.equals(b)


# --------------------------------------------------------------------------- kill / resume


def cli(command, out: Path, dataset: Path, *extra: str, die: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [*command(die), "filter", "--out", str(out), "--hf-dataset", str(dataset), *extra]
    cmd += ["--image-column", "jpg", "--id-column", "__key__", "--chunk-rows", "64", "--hf-output-format", "parquet"]
    cmd += ["--encoder", "pipelines.encoders:PixelProjectionEncoder", "--encoder-kwargs", json.dumps({"dim": DIM})]
    cmd += ["--clusters", str(K), "--dedup-eps", "0.02", "--method", "dbp", "--keep", "0.5"]
    cmd += ["--batch-size", str(BATCH), "--shard-max-count", "25", "--quiet"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("streaming", [False, True], ids=["save_to_disk", "streamed_tar"])
def test_killed_mid_embed_and_mid_write_resumes_to_identical_output(streaming, wds, cifar_tar, tmp_path, cli_command):
    if streaming:
        dataset, extra = cifar_tar, ("--streaming", "--hf-cache-dir", str(tmp_path / "cache"))
    else:
        dataset, extra = tmp_path / "disk", ()
        wds.save_to_disk(str(dataset))
    ref = tmp_path / "ref"
    r0 = cli(cli_command, ref, dataset, *extra)
    assert r0.returncode == 0, r0.stderr[-2000:]
    assert "filtered dataset:" in r0.stdout

    out = tmp_path / "killed"
    r1 = cli(cli_command, out, dataset, *extra, die="embed:130")  # dies inside chunk 2 (rows 128..191)
    assert r1.returncode == -9, r1.stderr[-2000:]
    chunks = out / "embed" / "chunks"
    assert (chunks / "00001.keys.parquet").exists() and not (chunks / "00002.keys.parquet").exists()
    assert json.loads((out / "embed" / "_stage.json").read_text())["state"] == "running"

    r2 = cli(cli_command, out, dataset, *extra, die="write:60")  # resumes embed, dies inside write
    assert r2.returncode == -9, r2.stderr[-2000:]
    assert "resuming" in r2.stdout
    staging = out / "write" / "dataset.incomplete"
    assert 1 <= len(list(staging.glob("*.parquet"))) < len(list((ref / "write" / "dataset").glob("*.parquet")))
    assert not (out / "write" / "dataset").exists()

    r3 = cli(cli_command, out, dataset, *extra)
    assert r3.returncode == 0, r3.stderr[-2000:]
    assert "| embed | skipped" in r3.stdout and "| write | ran" in r3.stdout
    assert not staging.exists()
    assert artifact_bytes(out) == artifact_bytes(ref)


# --------------------------------------------------------------------------- streaming


def test_streams_give_the_map_style_keep_list_and_rows(
    cifar_tar, emb_parquet, wds, tar_run, batch, cache_dir, tmp_path
):
    enc = PixelProjectionEncoder(dim=DIM)
    opts = quiet(
        image_column="jpg", id_column="__key__", hf_cache_dir=cache_dir, streaming=True, chunk_rows=50, batch_size=batch
    )
    res = run_filter(None, tmp_path / "tar", hf_dataset=str(cifar_tar), encoder=enc, shard_max_count=40, **opts)
    pd.testing.assert_frame_equal(res.keep[COMPARED], tar_run.keep[COMPARED])
    assert res.keep["shard"].iloc[-1] == f"{cifar_tar}[200:208]"  # 5 chunks, the last one partial
    files = sorted(Path(res.manifest["path"]).glob("*.parquet"))
    written = pa.concat_tables([pq.read_table(f) for f in files])
    assert written.equals(kept_rows(wds, res.keep).replace_schema_metadata(written.schema.metadata))
    assert written.schema.metadata == wds.data.schema.metadata  # the features (Image) travel along

    column = run_filter(
        None, tmp_path / "emb", hf_dataset=str(emb_parquet), **{**opts, "embedding_column": "emb", "write": False}
    )
    pd.testing.assert_frame_equal(column.keep[COMPARED], tar_run.keep[COMPARED])
    # an IterableDataset object in several shards
    obj = run_filter(None, tmp_path / "obj", hf_dataset=wds.to_iterable_dataset(num_shards=3), encoder=enc, **opts)
    pd.testing.assert_frame_equal(obj.keep[COMPARED], tar_run.keep[COMPARED])


def test_rows_are_the_same_in_every_input_path_even_for_a_layout_sensitive_encoder(
    cifar_tar, cache_dir, wds, batch, tmp_path
):
    """An encoder whose rows move with the batch layout (length, place) gives the same rows
    and keep-list through the tar, a map-style dataset cut in chunks of 64 rows and a stream
    cut in chunks of 50: encoder batches are fixed by row position in every input path."""
    from tests.helpers.encoders import LayoutSensitiveEncoder

    opts = quiet(encoder=LayoutSensitiveEncoder(dim=DIM), batch_size=batch, storage_dtype="float32", write=False)
    columns = {"image_column": "jpg", "id_column": "__key__"}
    runs = {
        "tar": run_filter(str(cifar_tar), tmp_path / "tar", **opts),
        "chunks": run_filter(None, tmp_path / "chunks", hf_dataset=wds, chunk_rows=64, **columns, **opts),
        "stream": run_filter(
            None,
            tmp_path / "stream",
            hf_dataset=str(cifar_tar),
            streaming=True,
            chunk_rows=50,
            hf_cache_dir=cache_dir,
            **columns,
            **opts,
        ),
    }
    rows = {
        name: np.concatenate([np.load(p) for p in sorted((run.out / "embed" / "chunks").glob("*.img.npy"))])
        for name, run in runs.items()
    }
    assert rows["tar"].shape == (N_SRC + N_DUP, DIM)
    for name in ("chunks", "stream"):
        assert rows[name].tobytes() == rows["tar"].tobytes(), name
        pd.testing.assert_frame_equal(runs[name].keep[COMPARED], runs["tar"].keep[COMPARED])


def test_resuming_a_stream_that_changed_is_refused(tmp_path):
    from datasets import Dataset

    rng = np.random.default_rng(2)
    emb = rng.standard_normal((40, 8)).astype(np.float32)

    def stream(keys):
        return Dataset.from_dict({"uid": keys, "emb": emb}).to_iterable_dataset()

    opts = quiet(embedding_column="emb", id_column="uid", clusters=2, chunk_rows=16, write=False)
    out = tmp_path / "out"
    run_filter(None, out, hf_dataset=stream([f"a{i}" for i in range(40)]), **opts)
    record = json.loads((out / "embed" / "_stage.json").read_text())
    (out / "embed" / "_stage.json").write_text(json.dumps({**record, "state": "running"}))  # as if killed
    (out / "embed" / "chunks" / "00002.keys.parquet").unlink()
    with pytest.raises(PipelineError, match="the stream changed since the interrupted run: 00000.keys.parquet"):
        run_filter(None, out, hf_dataset=stream([f"b{i}" for i in range(40)]), **opts)
    again = run_filter(None, out, hf_dataset=stream([f"a{i}" for i in range(40)]), **opts)
    assert again.stages["embed"].summary["samples"] == 40 and again.keep["key"].iloc[-1] == "a39"


# --------------------------------------------------------------------------- bad input


def png(value: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_null_and_undecodable_images_are_counted_and_strict_raises(tmp_path):
    from datasets import Dataset

    images = [png(10 * i) for i in range(12)] + [None, b"\x89PNG garbage"]
    ds = Dataset.from_dict({"image": images, "uid": [f"u{i}" for i in range(14)]})
    res = run_filter(
        None, tmp_path / "out", **quiet(hf_dataset=ds, id_column="uid", encoder=PixelProjectionEncoder(), clusters=2)
    )
    reasons = dict(zip(res.keep["key"], res.keep["reason"]))
    assert reasons["u12"] == "missing_image" and reasons["u13"] == "undecodable"
    assert res.stages["embed"].summary["missing_image"] == 1 and res.stages["embed"].summary["undecodable"] == 1
    assert "u12" not in load_local_dataset(res.manifest["path"])["uid"]
    with pytest.raises(PipelineError, match="row 12 .* has no image in column 'image'"):
        run_filter(None, tmp_path / "strict", **quiet(hf_dataset=ds, encoder=PixelProjectionEncoder(), strict=True))


def test_bad_columns_and_ids_give_clear_errors(tmp_path):
    from datasets import Dataset, DatasetDict

    enc = PixelProjectionEncoder()
    base = {"image": [png(i) for i in range(6)], "uid": ["a", "b", "c", "d", "e", "f"]}

    def run(ds, **kw):
        return run_filter(
            None, tmp_path / f"o{len(list(tmp_path.iterdir()))}", **quiet(hf_dataset=ds, clusters=2, **kw)
        )

    with pytest.raises(PipelineError, match=r"no column 'img' \(--image-column\); its columns: \['image', 'uid'\]"):
        run(Dataset.from_dict(base), image_column="img", encoder=enc)
    with pytest.raises(PipelineError, match="column 'uid' .* is string: --image-column needs encoded image bytes"):
        run(Dataset.from_dict(base), image_column="uid", encoder=enc)
    with pytest.raises(PipelineError, match="duplicate keys"):
        run(Dataset.from_dict({**base, "uid": ["a", "b", "a", "d", "e", "f"]}), id_column="uid", encoder=enc)
    with pytest.raises(PipelineError, match="id column 'uid' is null in row 2"):
        run(Dataset.from_dict({**base, "uid": ["a", "b", None, "d", "e", "f"]}), id_column="uid", encoder=enc)
    with pytest.raises(ValueError, match="splits \\['train', 'test'\\]: choose one with --split"):
        run(DatasetDict(train=Dataset.from_dict(base), test=Dataset.from_dict(base)), encoder=enc)
    with pytest.raises(TypeError, match="hf_dataset must be a path or a datasets Dataset"):
        run(42, encoder=enc)
    with pytest.raises(ValueError, match="a streaming input is written as parquet shards"):
        run(Dataset.from_dict(base).to_iterable_dataset(), encoder=enc, hf_output_format="disk")
    with pytest.raises(FileNotFoundError, match="no dataset at"):
        run(str(tmp_path / "nowhere.parquet"), encoder=enc)
    with pytest.raises(ValueError, match="remote"):
        run("s3://bucket/data.parquet", encoder=enc)
    (tmp_path / "x.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="either shards"):
        run_filter(str(tmp_path / "x.tar"), tmp_path / "both", hf_dataset=Dataset.from_dict(base), encoder=enc)


def test_cli_reports_dataset_errors(tmp_path, capsys):
    from datasets import Dataset

    from pipelines.cli import main

    folder = tmp_path / "disk"
    Dataset.from_dict({"emb": [[1.0, 0.0], [0.0, 1.0]]}).save_to_disk(str(folder))
    base = ["filter", "--out", str(tmp_path / "out"), "--quiet"]
    assert main(base + ["--hf-dataset", str(tmp_path / "none.parquet"), "--embedding-column", "emb"]) == 2
    assert "no dataset at" in capsys.readouterr().err
    assert main(base + ["--hf-dataset", str(folder), "--embedding-column", "vec"]) == 2
    assert "has no column 'vec' (--embedding-column); its columns: ['emb']" in capsys.readouterr().err
    assert main(base + ["--hf-dataset", str(folder)]) == 2  # images to embed, but no model
    assert "give --model" in capsys.readouterr().err


def test_embedding_column_nulls_ragged_and_dtype(tmp_path):
    from datasets import Dataset

    rng = np.random.default_rng(1)
    emb = rng.standard_normal((20, 4)).astype(np.float32).tolist()

    def run(column, **kw):
        ds = Dataset.from_dict({"emb": column})
        return run_filter(
            None,
            tmp_path / f"o{len(list(tmp_path.iterdir()))}",
            **quiet(hf_dataset=ds, embedding_column="emb", clusters=2, **kw),
        )

    res = run(emb[:5] + [None] + emb[6:9] + [[float("nan")] * 4] + emb[10:])  # variable-length list column
    assert res.keep.loc[[5, 9], "reason"].tolist() == ["no_embedding", "no_embedding"]
    assert res.keep["kept"].sum() == 9  # dbp keeps half of the 18 embedded rows
    with pytest.raises(
        PipelineError, match="ragged embedding lengths in column 'emb': row 7 has 3 values, the first row has 4"
    ):
        run(emb[:7] + [emb[7][:3]] + emb[8:])
    with pytest.raises(
        PipelineError, match="column 'emb' .* is list<item: string>: --embedding-column needs a list of floats"
    ):
        run([["a", "b"]] * 20)
    with pytest.raises(PipelineError, match="CLIP score needs caption embeddings"):
        run(emb, steps=[{"method": "clipscore", "keep": 0.5}])


# --------------------------------------------------------------------------- README


def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(title)
    end = text.find("\n## ", start)
    return text[start : end if end >= 0 else len(text)]


@pytest.mark.slow
def test_readme_datasets_example_runs_as_pasted(tmp_path):
    section = readme_section("### Pruning a Hugging Face dataset")
    python = re.findall(r"```python\n(.*?)```", section, re.S)
    shell = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert len(python) == 1 and len(shell) == 1
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_DATASETS_CACHE=str(tmp_path / "cache"))
    run = subprocess.run(
        [sys.executable, "-c", python[0]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| write | ran" in run.stdout
    command = shell[0].strip().replace("prunekit ", f"{sys.executable} -m pipelines.cli ", 1)
    cmd = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert cmd.returncode == 0, cmd.stderr[-3000:]
    assert "filtered dataset:" in cmd.stdout
    a = pd.read_parquet(tmp_path / "pruned" / "select" / "keep.parquet")
    b = pd.read_parquet(tmp_path / "pruned_cli" / "select" / "keep.parquet")
    pd.testing.assert_frame_equal(a, b)  # the CLI and the Python API agree
