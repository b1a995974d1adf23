"""The shard pipeline's one input interface, one embed stage, one write stage, and the
progress observers that replaced the kill hook in the library."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipelines.encoders import PixelProjectionEncoder
from pipelines.shards import default_steps, run_filter
from pipelines.shards.embed import EmbedStage
from pipelines.shards.inputs import DatasetChunks, DatasetInput, PrecomputedEmbeddings, TarShards
from pipelines.shards.progress import report_progress, watch_progress
from pipelines.shards.select import SelectArtifact
from pipelines.shards.write import TarOutput, WriteStage
from pipelines.shards.write_dataset import DatasetOutput

N = 40


def tiny_shard(path: Path, n: int = N) -> str:
    """A tar of ``n`` samples ``{i:04d}.png`` (8x8 images, two of every pixel pattern)."""
    rng = np.random.default_rng(0)
    patterns = rng.integers(0, 255, (n // 2, 8, 8, 3), dtype=np.uint8)
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(patterns[i // 2]).save(buf, format="PNG")
            info = tarfile.TarInfo(f"{i:04d}.png")
            info.size = buf.tell()
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    return str(path)


def embedding_dataset(n: int = 30):
    import datasets

    rng = np.random.default_rng(1)
    rows = {"id": [f"r{i}" for i in range(n)], "emb": rng.standard_normal((n, 4)).astype(np.float32).tolist()}
    return DatasetInput.open(
        datasets.Dataset.from_dict(rows), image_column=None, embedding_column="emb", id_column="id"
    )


def test_progress_observers_see_every_embed_and_write_sample_and_only_inside_their_block(tmp_path):
    shard = tiny_shard(tmp_path / "s-0.tar")
    seen = []
    steps = default_steps(dedup_eps=0.02, method="dbp", keep=0.5)
    with watch_progress(lambda stage, count: seen.append((stage, count))):
        res = run_filter(
            shard,
            tmp_path / "out",
            encoder=PixelProjectionEncoder(dim=8),
            clusters=2,
            steps=steps,
            batch_size=8,
            progress=False,
            log=lambda *_: None,
        )
    embed = [count for stage, count in seen if stage == "embed"]
    write = [count for stage, count in seen if stage == "write"]
    assert embed == list(range(1, N + 1))
    assert write == list(range(1, int(res.keep["kept"].sum()) + 1)) and write
    report_progress("embed", 1)  # the block is over: the observer is gone
    assert len(seen) == len(embed) + len(write)


def test_a_shard_list_is_the_tar_input_and_the_records_keep_their_shape(tmp_path):
    shard = tiny_shard(tmp_path / "s-0.tar")
    listed = EmbedStage(tmp_path / "a", [shard], encoder_fingerprint="enc", threads=1)
    given = EmbedStage(tmp_path / "a", TarShards([shard]), encoder_fingerprint="enc", threads=1)
    assert listed.fingerprint == given.fingerprint and listed.shards == [shard]
    # the parameter records of runs made before the inputs were one interface (resume as finished)
    assert list(given.params) == ["encoder", "batch_size", "image_exts", "text", "dtype", "strict", "decode", "threads"]
    assert list(given.inputs) == ["shards"]
    rows = EmbedStage(tmp_path / "b", DatasetChunks(embedding_dataset(), 8))
    assert list(rows.params) == ["encoder", "columns", "batch_size", "chunk_rows", "text", "dtype", "strict"]
    assert rows.params["encoder"] == {"column": "emb"} and list(rows.inputs) == ["dataset"]
    assert rows.shards == ["Dataset(rows)[0:8]", "Dataset(rows)[8:16]", "Dataset(rows)[16:24]", "Dataset(rows)[24:30]"]


def test_precomputed_embeddings_are_an_input_of_the_embed_stage(tmp_path):
    np.save(tmp_path / "e.npy", np.eye(3, dtype=np.float32))
    pd.DataFrame({"key": ["a", "b", "c"]}).to_parquet(tmp_path / "m.parquet")
    stage = EmbedStage(tmp_path / "o", PrecomputedEmbeddings([tmp_path / "e.npy"], [tmp_path / "m.parquet"]))
    assert stage.params == {"key_column": "key", "kind": "precomputed"}
    assert list(stage.inputs) == ["embeddings", "metadata", "texts", "shards"]
    assert stage.owned == ("keys.parquet", "embeddings.json") and stage.shards == []
    art = stage.run(lambda *_: None)
    assert art.keys["key"].tolist() == ["a", "b", "c"] and art.n_rows == 3


def test_the_write_stage_takes_a_tar_or_a_dataset_output(tmp_path):
    select = SelectArtifact(tmp_path, pd.DataFrame(), fingerprint="sel")
    tar = WriteStage(tmp_path / "t", select, [tiny_shard(tmp_path / "s-0.tar")], max_count=5)
    assert isinstance(tar.output, TarOutput)
    assert tar.params == {"max_count": 5, "max_size": 3_000_000_000, "prefix": "shard"}
    assert list(tar.inputs) == ["select", "shards"] and tar.owned == TarOutput.owned
    rows = WriteStage(tmp_path / "d", select, DatasetOutput(embedding_dataset(), max_count=5))
    assert rows.params == {"format": "disk", "max_count": 5, "max_size": 3_000_000_000}
    assert list(rows.inputs) == ["select", "dataset"] and rows.owned == DatasetOutput.owned


def test_the_old_dataset_stage_names_warn_and_build_the_one_stages(tmp_path):
    from pipelines.datasets import DatasetEmbedStage, DatasetWriteStage

    source = embedding_dataset()
    with pytest.warns(DeprecationWarning, match=r"EmbedStage\(out, DatasetChunks"):
        old = DatasetEmbedStage(tmp_path, source, chunk_rows=8)
    assert isinstance(old, EmbedStage)
    assert old.fingerprint == EmbedStage(tmp_path, DatasetChunks(source, 8)).fingerprint
    select = SelectArtifact(tmp_path, pd.DataFrame(), fingerprint="sel")
    with pytest.warns(DeprecationWarning, match=r"WriteStage\(out, select, DatasetOutput"):
        old_write = DatasetWriteStage(tmp_path, select, source, output_format="parquet")
    assert isinstance(old_write, WriteStage)
    new = WriteStage(tmp_path, select, DatasetOutput(source, output_format="parquet"))
    assert old_write.fingerprint == new.fingerprint


def test_the_old_ingest_stage_name_warns_and_builds_the_embed_stage(tmp_path):
    from pipelines.shards.ingest import IngestStage

    np.save(tmp_path / "e.npy", np.eye(3, dtype=np.float32))
    pd.DataFrame({"id": ["a", "b", "c"]}).to_parquet(tmp_path / "m.parquet")
    files = ([tmp_path / "e.npy"], [tmp_path / "m.parquet"])
    with pytest.warns(DeprecationWarning, match=r"EmbedStage\(out, PrecomputedEmbeddings"):
        old = IngestStage(tmp_path / "o", *files, key_column="id")
    assert isinstance(old, EmbedStage)
    assert old.fingerprint == EmbedStage(tmp_path / "o", PrecomputedEmbeddings(*files, key_column="id")).fingerprint
