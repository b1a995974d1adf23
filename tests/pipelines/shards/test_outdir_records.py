"""What prunekit wrote is recorded, and ownership and completeness are decided from that record
(issue 22): repaired dataset output is rebuilt and re-verified, ``--verify`` covers it,
extra files in a stage folder are refused by name, user files are never deleted, and a stage
whose artifact is inconsistent is not recorded done (a rerun recovers).

Shards: the small generated PNGs of ``test_pipeline_safety`` (pixel-projection encoder).
Datasets: a ``save_to_disk`` folder with a precomputed embedding column (no encoder).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.cli import main
from pipelines.shards import PipelineError, run_filter
from pipelines.shards.outdir import ForeignFiles
from pipelines.shards.progress import watch_progress
from tests.helpers.safe_shards import CLI_OPTS, consistent, run

N_ROWS, DIM = 400, 8
DATASET_STEPS = [{"method": "random", "keep": 0.5}]


def files_of(folder: Path, *, records: bool = False) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path (stage records, which hold timings, only with ``records``)."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and (records or p.name != "_stage.json")
    }


def flip_byte(path: Path, offset: int, *, keep_mtime: bool = False) -> None:
    """Change one byte of ``path`` in place (same size); ``keep_mtime``: put its mtime back."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


# --------------------------------------------------------------------------- dataset output


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    """A ``save_to_disk`` folder: ``uid`` strings and an ``emb`` column of DIM floats."""
    import datasets

    rng = np.random.default_rng(7)
    ds = datasets.Dataset.from_dict(
        {"uid": [f"u{i:04d}" for i in range(N_ROWS)], "emb": rng.standard_normal((N_ROWS, DIM)).tolist()}
    )
    path = tmp_path_factory.mktemp("hf") / "in"
    ds.save_to_disk(str(path))
    return path


def run_dataset(dataset_dir: Path, out: Path, fmt: str, **kw):
    opts = dict(clusters=4, steps=DATASET_STEPS, embedding_column="emb", id_column="uid", shard_max_count=50)
    opts.update(kw)
    return run_filter(
        None, out, hf_dataset=str(dataset_dir), hf_output_format=fmt, progress=False, log=lambda *_: None, **opts
    )


def loaded_rows(out: Path, fmt: str) -> int:
    """Rows a user gets from ``OUT/write/dataset`` (``load_from_disk`` or the parquet files)."""
    import datasets

    folder = out / "write" / "dataset"
    if fmt == "disk":
        return len(datasets.load_from_disk(str(folder)))
    return sum(pq.read_metadata(p).num_rows for p in folder.glob("*.parquet"))


@pytest.mark.parametrize("fmt", ["parquet", "disk"])
def test_a_deleted_or_edited_dataset_output_file_is_rebuilt_and_verified(dataset_dir, tmp_path, fmt):
    out = tmp_path / "o"
    ref = run_dataset(dataset_dir, out, fmt)
    kept = int(ref.keep["kept"].sum())
    assert ref.manifest["samples"] == kept == loaded_rows(out, fmt) == N_ROWS // 2
    original = files_of(out / "write" / "dataset")
    data = sorted(f for f in original if f.endswith((".parquet", ".arrow")))
    assert len(data) == (4 if fmt == "parquet" else 4)  # 200 rows in shards of 50 (save_to_disk: num_shards)

    # a data file deleted: the rerun rebuilds it, the dataset loads whole, the manifest agrees
    (out / "write" / "dataset" / data[1]).unlink()
    res = run_dataset(dataset_dir, out, fmt)
    assert [st.skipped for st in res.stages.values()] == [True, True, True, False]
    assert any(data[1] in r for r in res.stages["write"].repaired)
    assert files_of(out / "write" / "dataset") == original
    assert loaded_rows(out, fmt) == kept
    assert all(st.skipped for st in run_dataset(dataset_dir, out, fmt).stages.values())

    # one byte changed (its mtime moves): found by the default check, rebuilt identical
    flip_byte(out / "write" / "dataset" / data[0], 200)
    res = run_dataset(dataset_dir, out, fmt)
    assert not res.stages["write"].skipped and res.stages["write"].repaired
    assert files_of(out / "write" / "dataset") == original
    manifest = json.loads((out / "write" / "manifest.json").read_text())
    assert manifest["samples"] == kept and {f["file"] for f in manifest["files"]} == set(original)
    assert all(st.skipped for st in run_dataset(dataset_dir, out, fmt).stages.values())


@pytest.mark.parametrize("fmt", ["parquet", "disk"])
def test_verify_covers_dataset_output(dataset_dir, tmp_path, fmt):
    out = tmp_path / "o"
    run_dataset(dataset_dir, out, fmt)
    original = files_of(out / "write" / "dataset")
    target = next(out / "write" / "dataset" / f for f in sorted(original) if f.endswith((".parquet", ".arrow")))
    flip_byte(target, 300, keep_mtime=True)  # same size, same mtime: only a hash sees it
    assert all(st.skipped for st in run_dataset(dataset_dir, out, fmt).stages.values())
    res = run_dataset(dataset_dir, out, fmt, verify=True)
    assert not res.stages["write"].skipped
    assert any(target.name in r and "sha256" in r for r in res.stages["write"].repaired)
    assert files_of(out / "write" / "dataset") == original
    assert all(st.skipped for st in run_dataset(dataset_dir, out, fmt, verify=True).stages.values())


def test_an_extra_file_in_the_dataset_output_is_refused(dataset_dir, tmp_path):
    out = tmp_path / "o"
    run_dataset(dataset_dir, out, "parquet")
    extra = out / "write" / "dataset" / "train-00009-of-00010.parquet"
    shutil.copy(out / "write" / "dataset" / "train-00000-of-00004.parquet", extra)
    with pytest.raises(ForeignFiles, match="write/dataset/train-00009-of-00010.parquet"):
        run_dataset(dataset_dir, out, "parquet", verify=True)
    assert extra.exists()


# --------------------------------------------------------------------------- extra and user files (shards)


def test_an_extra_tar_in_the_write_folder_is_refused_by_name(shards, tmp_path, capsys):
    out = tmp_path / "o"
    run(shards, out)
    n_listed = len(json.loads((out / "write" / "manifest.json").read_text())["shards"])
    extra = out / "write" / "shard-000099.tar"
    shutil.copy(shards[0], extra)  # an unfiltered tar that globbing write/*.tar would pick up
    with pytest.raises(ForeignFiles, match="write/shard-000099.tar"):
        run(shards, out, verify=True)
    rc = main(["filter", *shards, "--out", str(out), *CLI_OPTS, "--verify"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "write/shard-000099.tar" in err and "move them out" in err
    assert extra.read_bytes() == Path(shards[0]).read_bytes()
    assert len(list((out / "write").glob("*.tar"))) == n_listed + 1  # nothing deleted either
    extra.unlink()
    assert all(st.skipped for st in run(shards, out, verify=True).stages.values())
    consistent(out)


def test_user_files_named_like_artifacts_are_never_deleted(shards, tmp_path):
    out = tmp_path / "o"
    run(shards, out)
    before = files_of(out, records=True)
    user = {
        "write/my_backup.tar": Path(shards[1]).read_bytes(),
        "write/done/notes.json": b'{"note": "mine"}',
        "select/stats_x.parquet": b"PAR1 not really",
    }
    for rel, data in user.items():
        (out / rel).write_bytes(data)
    other_keep = [{"method": "semdedup", "eps": 0.01}, {"method": "random", "keep": 0.3}]
    with pytest.raises(ForeignFiles) as err:
        run(shards, out, steps=other_keep)
    assert all(rel in str(err.value) for rel in user)
    assert files_of(out, records=True) == {**before, **user}  # nothing deleted, nothing rewritten
    for rel in user:
        (out / rel).unlink()
    res = run(shards, out, steps=other_keep)
    assert not res.stages["select"].skipped and not res.stages["write"].skipped
    consistent(out)


# --------------------------------------------------------------------------- inconsistent artifacts


class Killed(BaseException):
    """Stands in for SIGKILL in-process (the stage record stays ``running``)."""


def kill_after(stage: str, count: int):
    """A block in which a progress observer raises :class:`Killed` once ``stage`` reaches ``count``."""

    def hook(name, n):
        if name == stage and n >= count:
            raise Killed

    return watch_progress(hook)


@pytest.mark.slow
def test_a_write_unit_broken_in_a_killed_run_is_redone_not_recorded_done(shards, tmp_path):
    ref = tmp_path / "ref"
    run(shards, ref)
    for broken in ("tar deleted", "done record garbled"):
        out = tmp_path / broken.replace(" ", "_")
        with kill_after("write", 25), pytest.raises(Killed):  # output shards 0 and 1 finished, 2 half
            run(shards, out)
        assert json.loads((out / "write" / "_stage.json").read_text())["state"] == "running"
        if broken == "tar deleted":
            (out / "write" / "shard-000000.tar").unlink()
        else:
            (out / "write" / "done" / "000001.json").write_text("{")
        res = run(shards, out)
        assert not res.stages["write"].skipped
        consistent(out)
        assert files_of(out / "write") == files_of(ref / "write")
        assert all(st.skipped for st in run(shards, out).stages.values())


@pytest.mark.slow
def test_an_embed_chunk_broken_in_a_killed_run_is_redone_not_recorded_done(shards, tmp_path):
    ref = tmp_path / "ref"
    run(shards, ref)
    out = tmp_path / "o"
    with kill_after("embed", 40), pytest.raises(Killed):  # chunk 0 finished, chunk 1 half
        run(shards, out)
    chunk = out / "embed" / "chunks" / "00000.img.npy"
    np.save(chunk, np.load(chunk)[:5])  # rows no longer match the chunk's keys
    res = run(shards, out)
    assert any("00000.img.npy" in r for r in res.stages["embed"].repaired)
    assert json.loads((out / "embed" / "_stage.json").read_text())["state"] == "done"
    assert files_of(out / "embed" / "chunks") == files_of(ref / "embed" / "chunks")
    consistent(out)
    assert all(st.skipped for st in run(shards, out).stages.values())


def test_an_artifact_that_stays_inconsistent_is_left_running(shards, tmp_path, monkeypatch):
    """A unit that comes out wrong twice: the stage fails naming it and stays ``running``."""
    from pipelines.shards.write import WriteStage

    out = tmp_path / "o"
    run(shards, out, write=False)
    monkeypatch.setattr(WriteStage, "inconsistent", lambda self, files: {"shard-000000.tar": "broken on purpose"})
    with pytest.raises(PipelineError, match=r"still inconsistent after redoing it \(shard-000000.tar"):
        run(shards, out)
    assert json.loads((out / "write" / "_stage.json").read_text())["state"] == "running"
    monkeypatch.undo()
    res = run(shards, out)
    assert not res.stages["write"].skipped
    consistent(out)


def test_a_dataset_shard_broken_in_a_killed_run_is_rewritten_not_recorded_done(dataset_dir, tmp_path):
    ref = tmp_path / "ref"
    run_dataset(dataset_dir, ref, "parquet")
    out = tmp_path / "o"
    with kill_after("write", 120), pytest.raises(Killed):  # shards 0 and 1 (50 rows each) finished, 2 half
        run_dataset(dataset_dir, out, "parquet")
    staged = out / "write" / "dataset.incomplete" / "train-00000-of-00004.parquet"
    staged.write_bytes(staged.read_bytes()[:100])  # a torn file under a finished name
    res = run_dataset(dataset_dir, out, "parquet")
    assert any("train-00000-of-00004.parquet" in r for r in res.stages["write"].repaired)
    assert files_of(out / "write" / "dataset") == files_of(ref / "write" / "dataset")
    assert loaded_rows(out, "parquet") == N_ROWS // 2
    assert all(st.skipped for st in run_dataset(dataset_dir, out, "parquet").stages.values())


def test_an_unreadable_stage_record_stops_the_run_naming_it(shards, tmp_path):
    out = tmp_path / "o"
    run(shards, out)
    before = files_of(out / "select")
    (out / "select" / "_stage.json").write_text('{"state": "do')  # torn by hand
    with pytest.raises(PipelineError, match=r"select/_stage.json is unreadable.*move .*select away"):
        run(shards, out)
    assert files_of(out / "select") == before  # nothing deleted: prunekit cannot tell what is its own


def test_a_running_record_from_before_ledgers_resumes_by_the_stage_patterns(shards, tmp_path):
    out = tmp_path / "o"
    run(shards, out)
    record = out / "write" / "_stage.json"
    old = json.loads(record.read_text())
    old = {k: v for k, v in old.items() if k not in ("owned", "files", "summary")} | {"state": "running"}
    record.write_text(json.dumps(old))
    (out / "write" / "shard-000001.tar").unlink()
    res = run(shards, out)
    assert not res.stages["write"].skipped
    consistent(out)
    assert "shard-000001.tar" in json.loads(record.read_text())["files"]
