"""The shard pipeline never loses or corrupts data: lock, ownership, verified resume,
early validation, one-line CLI errors, tar member names, API checks.

Shards: small generated PNGs (weight-free pixel-projection encoder), so every run takes
about a second; the CLI runs in subprocesses where the test is about processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dataprune import dbp, semdedup, ssp
from pipelines.cli import main
from pipelines.shards import ShardError, iter_shard
from pipelines.shards.outdir import ForeignFiles, OutputLocked, output_lock
from prunecore import Clustering
from tests.helpers import REPO
from tests.helpers.safe_shards import CLI_OPTS, cli, consistent, member, png, run, sample, write_shard

# --------------------------------------------------------------------------- the lock


@pytest.mark.slow
def test_second_run_on_a_locked_out_exits_naming_the_holder_or_waits(shards, tmp_path):
    out = tmp_path / "o"
    run(shards, out)
    with output_lock(out):
        with pytest.raises(OutputLocked, match=rf"in use by pid {os.getpid()} on host"):
            run(shards, out)
        cmd, env = cli(*shards, "--out", out, *CLI_OPTS)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2
        assert f"pid {os.getpid()}" in r.stderr and "--wait-lock" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        log = tmp_path / "waiter.log"
        with open(log, "wb") as fh:
            waiter = subprocess.Popen(cmd + ["--wait-lock"], env=env, stdout=fh, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while b"waiting" not in log.read_bytes() and waiter.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert b"is in use by pid" in log.read_bytes() and waiter.poll() is None  # blocked on the lock
    assert waiter.wait(timeout=300) == 0, log.read_text()[-2000:]
    consistent(out)


@pytest.mark.slow
def test_two_processes_racing_on_one_out_never_corrupt_it(shards, tmp_path):
    out = tmp_path / "race"
    procs = []
    for keep in ("0.5", "0.4"):
        cmd, env = cli(*shards, "--out", out, *CLI_OPTS, "--keep", keep)
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert {rc for rc, _ in results} <= {0, 2}
    assert any(rc == 0 for rc, _ in results)
    for rc, err in results:
        if rc == 2:
            assert "in use by pid" in err, err
    consistent(out)
    # a third run with one of the two settings ends consistent too (reuses or redoes work)
    cmd, env = cli(*shards, "--out", out, *CLI_OPTS, "--keep", "0.4", "--verify")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    consistent(out)
    keep = pd.read_parquet(out / "select" / "keep.parquet")
    assert keep["kept"].sum() == int(np.floor(0.4 * len(keep) + 0.5))
    assert not list(out.rglob(".*.tmp"))


# --------------------------------------------------------------------------- ownership


def test_foreign_files_in_out_are_refused_and_kept(shards, tmp_path):
    out = tmp_path / "o"
    (out / "write").mkdir(parents=True)
    (out / "write" / "important.txt").write_text("x")
    with pytest.raises(ForeignFiles, match="write/important.txt"):
        run(shards, out)
    assert (out / "write" / "important.txt").read_text() == "x"
    assert sorted(p.name for p in out.rglob("*")) == ["important.txt", "write"]  # nothing written
    rc = main(["filter", *shards, "--out", str(out), *CLI_OPTS])
    assert rc == 2 and (out / "write" / "important.txt").exists()
    # a folder prunekit made, with a foreign file added later: refused too, nothing deleted
    mine = tmp_path / "mine"
    run(shards, mine)
    (mine / "select" / "notes.md").write_text("mine")
    with pytest.raises(ForeignFiles, match="select/notes.md"):
        run(shards, mine, steps=[{"method": "random", "keep": 0.3}])
    assert (mine / "select" / "notes.md").exists() and (mine / "select" / "keep.parquet").exists()
    assert json.loads((mine / ".prunekit.json").read_text())["tool"] == "prunekit"


def test_a_concurrent_runs_marker_being_published_is_not_foreign(tmp_path):
    """Two runs starting on a new --out at once: one may see the other's marker temporary."""
    from pipelines.shards.outdir import MARKER, claim_output
    from prunecore.io import atomic_path

    out = tmp_path / "o"
    out.mkdir()
    with atomic_path(out / MARKER) as tmp:
        tmp.write_text("{}")
        claim_output(out, {})  # the other run's temporary is prunekit's own: no refusal
    (out / ".notes.abc.tmp").write_text("x")  # a temporary prunekit never writes there
    with pytest.raises(ForeignFiles, match=".notes.abc.tmp"):
        claim_output(out, {})


def test_input_shards_inside_out_are_refused(shards, tmp_path):
    out = tmp_path / "o"
    run(shards, out)
    inside = [str(p) for p in sorted((out / "write").glob("*.tar"))]
    before = {p: Path(p).read_bytes() for p in inside}
    with pytest.raises(ForeignFiles, match="lies inside the output folder"):
        run(inside, out, clusters=2)
    assert {p: Path(p).read_bytes() for p in inside} == before
    consistent(out)


# --------------------------------------------------------------------------- verified resume


@pytest.mark.slow
def test_tampered_output_shard_keep_list_and_chunk_are_detected_and_repaired(shards, tmp_path):
    out = tmp_path / "o"
    ref = run(shards, out)
    original = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.suffix in (".tar", ".npy", ".parquet")}
    assert all(st.skipped for st in run(shards, out).stages.values())

    # 1. an output shard edited in place (same size; its mtime moves): found by the default check
    tar = out / "write" / "shard-000001.tar"
    data = bytearray(tar.read_bytes())
    data[1000] ^= 0xFF
    tar.write_bytes(bytes(data))
    res = run(shards, out)
    assert [st.skipped for st in res.stages.values()] == [True, True, True, False]
    assert any("shard-000001.tar" in r for r in res.stages["write"].repaired)
    assert "repaired" in res.table()
    assert tar.read_bytes() == original[tar]
    # a deleted output shard is rewritten as well
    (out / "write" / "shard-000000.tar").unlink()
    run(shards, out)
    assert (out / "write" / "shard-000000.tar").read_bytes() == original[out / "write" / "shard-000000.tar"]

    # 2. the keep-list with one `kept` flipped: select is redone and gives the original back
    keep_path = out / "select" / "keep.parquet"
    keep = pd.read_parquet(keep_path)
    keep.loc[keep.index[0], "kept"] = not keep.loc[keep.index[0], "kept"]
    keep.to_parquet(keep_path, index=False)
    res = run(shards, out)
    assert not res.stages["select"].skipped and res.stages["select"].repaired
    pd.testing.assert_frame_equal(res.keep, ref.keep)
    assert res.stages["write"].skipped  # the repaired keep-list is the same, so the shards stand
    consistent(out)

    # 3. an embedding chunk overwritten with the same size and its old mtime: only --verify sees it
    chunk = out / "embed" / "chunks" / "00001.img.npy"
    st = chunk.stat()
    arr = np.load(chunk)
    np.save(chunk, np.zeros_like(arr))
    os.utime(chunk, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert chunk.stat().st_size == st.st_size
    assert all(s.skipped for s in run(shards, out).stages.values())  # the cheap check trusts it
    res = run(shards, out, verify=True)
    assert not res.stages["embed"].skipped and "chunks/00001.img.npy" in res.stages["embed"].repaired[0]
    assert chunk.read_bytes() == original[chunk]
    assert (out / "embed" / "chunks" / "00000.img.npy").stat().st_mtime_ns != chunk.stat().st_mtime_ns
    pd.testing.assert_frame_equal(res.keep, ref.keep)
    consistent(out)
    assert all(s.skipped for s in run(shards, out, verify=True).stages.values())


# --------------------------------------------------------------------------- validation, CLI errors


@pytest.mark.parametrize(
    "bad, names",
    [
        (["--keep", "1.5"], "keep"),
        (["--clusters", "0"], "--clusters"),
        (["--shard-max-count", "0"], "--shard-max-count"),
        (["--batch-size", "0"], "--batch-size"),
        (["--dedup-eps", "3"], "--dedup-eps"),
        (["--method", "dbp", "--temperature", "0"], "--temperature"),
        (["--method", "dbp", "--balance", "2"], "--balance"),
        (["--kmeans-iter", "-1"], "--kmeans-iter"),
        (["--device", "gpu7"], "--device"),
        (["--shard-max-size", "0"], "--shard-max-size"),
    ],
)
def test_bad_parameters_fail_before_any_work_with_one_line(shards, tmp_path, capsys, bad, names):
    out = tmp_path / "o"
    canary = tmp_path / "factory_was_called"
    # the encoder factory (here os:system) must not even be called: validation comes first
    opts = ["--encoder", "os:system", "--encoder-kwargs", json.dumps({"command": f"touch {canary}"}), "--quiet"]
    rc = main(["filter", *shards, "--out", str(out), *opts, *bad])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and names in err, err
    assert not out.exists() and not canary.exists()


@pytest.mark.slow
def test_validation_in_a_subprocess_writes_nothing(shards, tmp_path):
    out = tmp_path / "o"
    cmd, env = cli(*shards, "--out", out, *CLI_OPTS, "--keep", "1.5")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "outside (0, 1]" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not out.exists()


def test_duplicate_keys_and_too_many_clusters_are_found_before_embedding(shards, tmp_path):
    with pytest.raises(ShardError, match=r"duplicate keys: 30 key\(s\)"):
        run([shards[0], shards[1], shards[0]], tmp_path / "dup")
    assert not (tmp_path / "dup" / "embed" / "chunks").exists()
    with pytest.raises(ValueError, match="--clusters 500 is more than the 90 samples"):
        run(shards, tmp_path / "k", clusters=500)
    assert not (tmp_path / "k" / "embed" / "chunks").exists()


def test_cli_failures_are_one_line_with_exit_code_2(shards, tmp_path, capsys, monkeypatch):
    import errno

    import pipelines.shards.select as select_mod

    def disk_full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(select_mod, "save_parquet", disk_full)
    rc = main(["filter", *shards, "--out", str(tmp_path / "full"), *CLI_OPTS])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "no space left" in err and "rerun" in err
    monkeypatch.undo()

    # a corrupt metadata parquet (precomputed embeddings): named, with the fix
    np.save(tmp_path / "img_emb_0.npy", np.ones((4, 8), np.float16))
    (tmp_path / "metadata_0.parquet").write_bytes(b"not a parquet file at all")
    rc = main(
        [
            "filter",
            "--embeddings",
            str(tmp_path / "img_emb_0.npy"),
            "--metadata",
            str(tmp_path / "metadata_0.parquet"),
            "--out",
            str(tmp_path / "pq"),
            "--clusters",
            "2",
            "--method",
            "random",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "metadata_0.parquet is not a readable parquet" in err

    # a checkpoint torch refuses to unpickle (weights_only): exit 2, one line naming it
    cfg = tmp_path / "tiny-vit.json"
    cfg.write_text(
        json.dumps(
            {
                "embed_dim": 16,
                "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
                "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 16, "heads": 1, "layers": 1},
            }
        )
    )
    ckpt = tmp_path / "evil.pt"
    import pickle

    ckpt.write_bytes(pickle.dumps({"state_dict": Path("x")}))
    rc = main(
        ["filter", *shards, "--out", str(tmp_path / "ck"), "--model", str(cfg), "--pretrained", str(ckpt)]
        + ["--clusters", "3", "--quiet"]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "evil.pt" in err and "Traceback" not in err


def test_encoder_help_says_it_runs_your_code():
    from pipelines.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices["filter"]
    text = " ".join(sub.format_help().split())
    assert "IMPORTS that module and CALLS that factory" in text and "only code you trust" in text


# --------------------------------------------------------------------------- tar member names


@pytest.fixture(scope="module")
def odd_shard(tmp_path_factory) -> tuple[str, str]:
    """One PAX shard (dotted names, links, devices, traversal names) and one GNU shard whose
    member name is latin-1 bytes (not UTF-8)."""
    root = tmp_path_factory.mktemp("odd")
    members = [m for i in range(6) for m in sample(f"ok_{i}", 500 + i)]
    members += [member("dotted.b.png", png(600)), member("dotted.txt", b"dotted caption")]
    members += [member("lnk.png", kind=tarfile.SYMTYPE), member("lnk.txt", kind=tarfile.SYMTYPE)]
    members += [member("dev.png", kind=tarfile.CHRTYPE)]
    members += [member("../evil.png", png(601)), member("/abs/root.png", png(602))]
    pax = root / "odd.tar"
    write_shard(pax, members)
    gnu = root / "latin.tar"
    latin = [*sample("plain", 700), member("caf\xe9.png", png(701))]
    write_shard(gnu, latin, encoding="latin-1", fmt=tarfile.GNU_FORMAT)
    return str(pax), str(gnu)


def test_odd_member_names_are_grouped_like_webdataset_counted_and_reported(odd_shard, tmp_path):
    import webdataset as wds

    pax, gnu = odd_shard
    res = run([pax, gnu], tmp_path / "o", clusters=2, steps=[{"method": "random", "keep": 1.0}])
    keep = res.keep.set_index("key")
    assert keep.loc["dotted", "reason"] == "" and keep.loc["dotted", "kept"]  # a.b.png is an image of key a
    assert keep.loc["lnk", "reason"] == "no_image" and keep.loc["dev", "reason"] == "no_image"
    assert keep.loc["caf\\xe9", "reason"] == "non_utf8_name" and keep.loc["caf\\xe9", "shard"] == gnu
    assert keep.loc["../evil", "kept"] and keep.loc["/abs/root", "kept"]
    s = res.stages["embed"].summary
    assert (s["no_image"], s["non_utf8_name"], s["unsafe_names"], s["special_members"]) == (2, 1, 2, 3)
    assert any("../evil.png" in note for note in s["name_examples"])
    table = res.table()
    assert "2 no image" in table and "1 non-UTF-8" in table and "2 unsafe member name" in table
    # every sample is accounted for in the keep-list: 6 ok + dotted + lnk + dev + 2 traversal + 2 in gnu
    assert len(keep) == 13
    # traversal names are copied byte-identical into the output shards
    names = [m.name for p in res.manifest["paths"] for m in tarfile.open(p)]
    assert "../evil.png" in names and "/abs/root.png" in names
    # the grouping is webdataset's: same keys (and member suffixes) for the regular members
    ours = {s.key: sorted(s.members) for s in iter_shard(pax) if s.members}
    theirs = {}
    for smp in wds.WebDataset(pax, shardshuffle=False, empty_check=False):
        theirs[smp["__key__"]] = sorted(k for k in smp if not k.startswith("__"))
    assert ours == theirs
    # --strict refuses traversal / non-UTF-8 names and link-only samples before embedding
    evil = tmp_path / "evil.tar"
    write_shard(evil, [*sample("fine", 800), member("../evil.png", png(801))])
    for shard, what in ((str(evil), "unsafe name: '../evil.png'"), (gnu, "non utf8 name"), (pax, "no regular member")):
        with pytest.raises(ShardError, match=what):
            run([shard], tmp_path / f"strict_{Path(shard).stem}", clusters=1, strict=True)
        assert not (tmp_path / f"strict_{Path(shard).stem}" / "embed" / "chunks").exists()


# --------------------------------------------------------------------------- API


def test_api_rejects_bad_cluster_labels_and_nan_similarities():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((20, 4)).astype(np.float32)
    good = Clustering(
        centroids=rng.standard_normal((3, 4)).astype(np.float32),
        labels=np.arange(20) % 3,
        sim=np.full(20, 0.5, np.float32),
    )
    negative = Clustering(good.centroids, np.where(np.arange(20) == 4, -1, good.labels), good.sim)
    with pytest.raises(ValueError, match=r"cluster label -1 at row 4 is outside \[0, 3\)"):
        ssp(emb, 0.5, clustering=negative)
    too_big = Clustering(good.centroids, np.where(np.arange(20) == 7, 3, good.labels), good.sim)
    with pytest.raises(ValueError, match=r"cluster label 3 at row 7"):
        dbp(emb, 0.5, clustering=too_big, temperature=0.5)
    nan_sim = Clustering(good.centroids, good.labels, np.where(np.arange(20) == 2, np.nan, good.sim))
    with pytest.raises(ValueError, match="non-finite value.*row 2"):
        semdedup(emb, 0.1, clustering=nan_sim)
    assert semdedup(emb, 0.1, clustering=good).keep.shape == (20,)


# --------------------------------------------------------------------------- the memory benchmark runs


@pytest.mark.slow
def test_memory_benchmark_prints_bytes_per_row():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, str(REPO / "benchmarks" / "pipeline_memory.py"), "--sizes", "20000", "--clusters", "10"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    row = [line for line in r.stdout.splitlines() if line.startswith("| 20,000 |")]
    assert len(row) == 1
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert float(cells[5]) > 0 and "<= 100" in cells[7]  # bytes/row measured, target named
