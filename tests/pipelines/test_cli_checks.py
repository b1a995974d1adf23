"""`prunekit filter` checks every option and input before any user code runs or any stage
starts; unreadable inputs are named; the report shows input problems as a table.

An ``--encoder`` module here writes a marker file from its top-level code, so a test sees
whether prunekit imported it.
"""

from __future__ import annotations

import io
import sys
import tarfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.cli import main
from pipelines.encoders import EncoderSpec, PixelProjectionEncoder, module_on_path
from pipelines.shards import run_filter

FAST = ["--clusters", "2", "--method", "random", "--quiet"]
MARKER_MODULE = """
import pathlib
pathlib.Path({marker!r}).write_text("imported")
from pipelines.encoders import PixelProjectionEncoder


def make(**kwargs):
    return PixelProjectionEncoder(**kwargs)
"""


def png(seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def good_shard(path: Path, n: int = 12, prefix: str = "k") -> str:
    return write_tar(path, [(f"{prefix}{i:03d}.png", png(i)) for i in range(n)])


@pytest.fixture
def marker_encoder(tmp_path, monkeypatch) -> tuple[str, Path]:
    """(``--encoder`` spec of a module whose import writes a marker file, that marker path);
    one module name per test, removed from sys.modules afterwards."""
    name = f"marker_enc_{tmp_path.name.replace('-', '_')}"
    folder = tmp_path / "modules"
    folder.mkdir()
    marker = tmp_path / "imported.marker"
    (folder / f"{name}.py").write_text(MARKER_MODULE.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(folder))
    yield f"{name}:make", marker
    sys.modules.pop(name, None)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def hf_parquet(path: Path, rows: int = 8) -> str:
    pq.write_table(pa.table({"image": [png(i) for i in range(rows)], "uid": [f"u{i}" for i in range(rows)]}), path)
    return str(path)


# --------------------------------------------------------------------------- the encoder runs last


@pytest.mark.parametrize(
    "bad, names",
    [
        (["--max-pixels", "0"], "--max-pixels"),
        (["--encoder-kwargs", "{bad"], "--encoder-kwargs is not JSON"),
        (["--encoder-kwargs", "[1, 2]"], "--encoder-kwargs must be a JSON object"),
        (["--jpeg-draft", "-1"], "--jpeg-draft"),
        (["--decode-workers", "-2"], "--decode-workers"),
        (["--chunk-rows", "0"], "--chunk-rows"),
        (["--threads", "0"], "--threads"),
        (["--device", "cuda:99"], "--device cuda:99"),
    ],
)
def test_a_bad_option_fails_before_the_encoder_module_is_imported(marker_encoder, tmp_path, capsys, bad, names):
    spec, marker = marker_encoder
    shard = good_shard(tmp_path / "a.tar")
    out = tmp_path / "out"
    rc = main(["filter", shard, "--out", str(out), "--encoder", spec, *FAST, *bad])
    err = one_error_line(capsys)
    assert not marker.exists(), "the --encoder module was imported before the options were checked"
    assert not out.exists()
    assert rc == 2 and names in err


def test_a_missing_shard_or_a_foreign_out_fails_before_the_encoder_module_is_imported(marker_encoder, tmp_path, capsys):
    spec, marker = marker_encoder
    shard = good_shard(tmp_path / "a.tar")
    rc = main(["filter", shard, str(tmp_path / "missing.tar"), "--out", str(tmp_path / "o1"), "--encoder", spec, *FAST])
    err = one_error_line(capsys)
    assert rc == 2 and "missing.tar" in err and "does not exist" in err
    assert not marker.exists() and not (tmp_path / "o1").exists()

    foreign = tmp_path / "o2"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("mine")
    rc = main(["filter", shard, "--out", str(foreign), "--encoder", spec, *FAST])
    err = one_error_line(capsys)
    assert rc == 2 and "thesis.tex" in err and "choose another --out" in err
    assert not marker.exists()
    assert sorted(p.name for p in foreign.iterdir()) == ["thesis.tex"]

    # the same command with good inputs does import it (the marker can appear)
    rc = main(["filter", shard, "--out", str(tmp_path / "o3"), "--encoder", spec, *FAST])
    assert rc == 0 and marker.read_text() == "imported"


def test_an_encoder_module_that_is_not_there_is_named_before_any_work(tmp_path, capsys, monkeypatch):
    shard = good_shard(tmp_path / "a.tar")
    out = tmp_path / "out"
    rc = main(["filter", shard, "--out", str(out), "--encoder", "no_such_encoder_mod:make", *FAST])
    err = one_error_line(capsys)
    assert rc == 2 and "no module 'no_such_encoder_mod'" in err and "PYTHONPATH" in err
    assert not out.exists()
    rc = main(["filter", shard, "--out", str(out), "--encoder", "pipelines.encoders", *FAST])
    assert rc == 2 and "MODULE:FACTORY" in one_error_line(capsys)

    # a package's __init__ is not run to find its submodule
    pkg = tmp_path / "mods" / f"pkg_{tmp_path.name.replace('-', '_')}"
    pkg.mkdir(parents=True)
    marker = tmp_path / "init.marker"
    (pkg / "__init__.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    (pkg / "enc.py").write_text("def make():\n    return None\n")
    monkeypatch.syspath_prepend(str(pkg.parent))
    assert module_on_path(f"{pkg.name}.enc") and not module_on_path(f"{pkg.name}.nothere")
    assert not marker.exists() and pkg.name not in sys.modules
    rc = main(["filter", shard, "--out", str(out), "--encoder", f"{pkg.name}.enc:make", *FAST, "--max-pixels", "0"])
    assert rc == 2 and "--max-pixels" in one_error_line(capsys)
    assert not marker.exists() and not out.exists()


def test_encoder_spec_parse_checks_without_importing():
    spec = EncoderSpec.parse("pipelines.encoders:PixelProjectionEncoder", '{"dim": 8}')
    assert (spec.module, spec.factory, spec.kwargs) == ("pipelines.encoders", "PixelProjectionEncoder", {"dim": 8})
    assert spec.load().fingerprint["dim"] == 8
    for bad in ("", ":make", "mod:", "mod:not-a-name", "a..b:make", "a/b:make"):
        with pytest.raises(ValueError, match="MODULE:FACTORY"):
            EncoderSpec.parse(bad)


# --------------------------------------------------------------------------- options that fail late


def test_device_cuda_without_cuda_fails_before_any_stage_folder(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    shard = good_shard(tmp_path / "a.tar")
    out = tmp_path / "out"
    enc = ["--encoder", "pipelines.encoders:PixelProjectionEncoder"]
    rc = main(["filter", shard, "--out", str(out), *enc, *FAST, "--device", "cuda"])
    err = one_error_line(capsys)
    assert not out.exists(), sorted(p.name for p in out.iterdir())
    assert rc == 2 and "--device cuda" in err and "no CUDA device" in err and "--device cpu" in err


def test_streaming_with_disk_output_fails_before_any_stage_folder(tmp_path, capsys):
    data = hf_parquet(tmp_path / "data.parquet")
    out = tmp_path / "out"
    enc = ["--encoder", "pipelines.encoders:PixelProjectionEncoder"]
    rc = main(
        ["filter", "--hf-dataset", data, "--out", str(out), *enc, *FAST]
        + ["--streaming", "--hf-output-format", "disk", "--hf-cache-dir", str(tmp_path / "cache")]
    )
    err = one_error_line(capsys)
    assert not out.exists(), sorted(p.name for p in out.iterdir())
    assert rc == 2 and "--hf-output-format disk" in err and "--hf-output-format parquet" in err


# --------------------------------------------------------------------------- unreadable inputs named


@pytest.mark.parametrize("layout", ["file", "folder", "streaming"])
def test_a_corrupt_parquet_dataset_file_is_named(tmp_path, capsys, layout):
    folder = tmp_path / "data"
    folder.mkdir()
    hf_parquet(folder / "train-00000.parquet")
    bad = folder / "train-00001.parquet"
    bad.write_bytes(b"not a parquet file at all")
    source = str(bad) if layout == "file" else str(folder)
    extra = ["--streaming"] if layout == "streaming" else []
    out = tmp_path / "out"
    rc = main(
        ["filter", "--hf-dataset", source, "--out", str(out), "--encoder", "pipelines.encoders:PixelProjectionEncoder"]
        + [*FAST, "--hf-cache-dir", str(tmp_path / "cache"), *extra]
    )
    err = one_error_line(capsys)
    assert rc == 2 and f"{bad} is not a readable parquet file" in err
    assert not out.exists()


@pytest.mark.parametrize("content", [b"", b"this is not a tar archive " * 40], ids=["empty", "garbage"])
def test_an_empty_or_garbage_tar_is_named_not_blamed_on_clusters(tmp_path, capsys, content):
    tar = tmp_path / "bad.tar"
    tar.write_bytes(content)
    enc = ["--encoder", "pipelines.encoders:PixelProjectionEncoder"]
    rc = main(["filter", str(tar), "--out", str(tmp_path / "out"), *enc, *FAST])
    err = one_error_line(capsys)
    assert rc == 2 and str(tar) in err and "--clusters" not in err
    assert ("empty file" if not content else "not a tar file") in err
    assert not (tmp_path / "out" / "embed" / "chunks").exists()


def test_unreadable_tars_beside_good_ones_are_named_in_one_line_each(tmp_path):
    good = good_shard(tmp_path / "good.tar")
    empty, garbage = tmp_path / "empty.tar", tmp_path / "garbage.tar"
    empty.write_bytes(b"")
    garbage.write_bytes(b"garbage " * 300)
    res = run_filter(
        [good, str(empty), str(garbage)],
        tmp_path / "out",
        encoder=PixelProjectionEncoder(dim=16),
        clusters=2,
        steps=[{"method": "random", "keep": 0.5}],
        progress=False,
        log=lambda *_: None,
    )
    errors = res.stages["embed"].summary["corrupt_shards"]
    assert len(errors) == 2 and all("\n" not in e for e in errors)
    assert str(empty) in errors[0] and "empty file" in errors[0]
    assert str(garbage) in errors[1] and "not a tar file" in errors[1]
    with pytest.raises(ValueError, match=r"--clusters 50 is more than the 12 samples in the shards \(2 shard\(s\)"):
        run_filter([good, str(empty), str(garbage)], tmp_path / "k", encoder=res.stages["embed"].encoder, clusters=50)


# --------------------------------------------------------------------------- the report


class TableText(HTMLParser):
    """The text of an HTML page: its ``<h2>`` headings, and each table as rows of cell texts
    (``<br>`` inside a cell becomes a newline), keyed by the heading before it."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.heading, self.in_heading, self.cell = "", False, None

    def handle_starttag(self, tag, attrs):
        if tag == "h2":
            self.in_heading, self.heading = True, ""
        elif tag == "table":
            self.tables[self.heading] = []
        elif tag == "tr":
            self.tables[self.heading].append([])
        elif tag in ("td", "th"):
            self.cell = ""
        elif tag == "br" and self.cell is not None:
            self.cell += "\n"

    def handle_endtag(self, tag):
        if tag == "h2":
            self.in_heading = False
        elif tag in ("td", "th"):
            self.tables[self.heading][-1].append(self.cell)
            self.cell = None

    def handle_data(self, data):
        if self.in_heading:
            self.heading += data
        elif self.cell is not None:
            self.cell += data


def test_report_shows_input_problems_as_a_readable_table(tmp_path):
    good = good_shard(tmp_path / "good.tar", n=16)
    odd = write_tar(
        tmp_path / "odd.tar",
        [("o1.png", png(100)), ("broken.png", b"not an image"), ("textonly.txt", b"caption"), ("../up.png", png(101))],
    )
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"garbage " * 300)
    out = tmp_path / "out"
    enc = ["--encoder", "pipelines.encoders:PixelProjectionEncoder"]
    assert main(["filter", good, odd, str(garbage), "--out", str(out), *enc, *FAST]) == 0
    assert main(["report", str(out)]) == 0
    page = TableText()
    page.feed((out / "report" / "index.html").read_text())
    assert "Input problems" in page.tables, list(page.tables)
    rows = page.tables["Input problems"]
    assert rows[0] == ["problem", "count", "examples"]
    by_problem = {r[0]: r[1:] for r in rows[1:]}
    count, text = by_problem["unreadable shard"]
    assert count == "1" and str(garbage) in text and "not a tar file" in text
    assert by_problem["image could not be decoded (undecodable)"] == ["1", f"broken in {odd}"]
    assert by_problem["no image member (missing_image)"] == ["1", f"textonly in {odd}"]
    count, text = by_problem["member names with ../ or an absolute path (copied as they are)"]
    assert count == "1" and "../up.png" in text
    # the stage summaries are one field per line, not a JSON blob
    stages = {r[0]: r for r in page.tables["Stages"][1:]}
    summary_lines = stages["embed"][2].splitlines()
    assert "undecodable: 1" in summary_lines and "missing_image: 1" in summary_lines


def test_a_corrupt_precomputed_embedding_file_is_named_before_out_is_created(tmp_path, capsys):
    emb, meta = tmp_path / "img_emb_0.npy", tmp_path / "metadata_0.parquet"
    emb.write_bytes(b"junk, not an array")
    pq.write_table(pa.table({"key": ["a", "b"]}), meta)
    out = tmp_path / "out"
    rc = main(["filter", "--embeddings", str(emb), "--metadata", str(meta), "--out", str(out), *FAST])
    err = one_error_line(capsys)
    assert not out.exists()
    assert rc == 2 and f"{emb} is not a readable .npy" in err
