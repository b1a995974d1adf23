"""One word per meaning in the shard pipeline's config, steps and CLI: ``precision`` (the
encoder's compute precision) vs ``storage_dtype`` (the stored chunks), ``order`` for every
step that ranks rows; the old names still work for one release with a warning, and a run
finished under the old names is not redone under the new ones."""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from pipelines.cli import build_parser, main
from pipelines.shards import FilterConfig, default_steps, filter_config
from pipelines.shards.select import SelectStage
from pipelines.shards.stage import VERSION
from pipelines.shards.steps import normalize_steps
from prunecore.io import json_digest

ENCODER = ["--encoder", "pipelines.encoders:PixelProjectionEncoder", "--clusters", "2", "--quiet"]


def tiny_shard(path, n=10) -> str:
    from PIL import Image

    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(n):
            buf = io.BytesIO()
            pixels = np.random.default_rng(i).integers(0, 255, size=(8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(buf, format="PNG")
            info = tarfile.TarInfo(f"k{i:03d}.png")
            info.size, info.mtime = buf.tell(), 1_700_000_000
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    return str(path)


def test_storage_dtype_is_the_option_and_dtype_its_deprecated_name():
    assert FilterConfig().storage_dtype == "float16" and FilterConfig().precision == "fp32"
    with pytest.warns(DeprecationWarning, match="'dtype' is deprecated.*use 'storage_dtype'"):
        cfg = FilterConfig(dtype="float32")
    assert cfg.storage_dtype == "float32"
    with pytest.warns(DeprecationWarning, match="'dtype' is deprecated"):
        assert filter_config(dtype="float32").storage_dtype == "float32"
    with pytest.warns(DeprecationWarning, match="'dtype' is deprecated"):
        assert replace(FilterConfig(), dtype="float32").storage_dtype == "float32"
    with pytest.warns(DeprecationWarning, match="'dtype' is deprecated"):
        assert cfg.dtype == "float32"
    assert "dtype" not in {f for f in vars(FilterConfig())}  # one field, not two


def test_cli_storage_dtype_and_the_deprecated_dtype_flag(capsys):
    args = build_parser().parse_args(["filter", "s.tar", "--out", "o", "--storage-dtype", "float32"])
    assert args.storage_dtype == "float32" and capsys.readouterr().err == ""
    args = build_parser().parse_args(["filter", "s.tar", "--out", "o", "--dtype", "float32"])
    assert args.storage_dtype == "float32"
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "prunekit filter: warning: --dtype is deprecated and will be removed in the next release: use --storage-dtype"
    ]
    args = build_parser().parse_args(["filter", "s.tar", "--out", "o"])
    assert args.storage_dtype == "float16" and args.precision == "fp32"
    # serve-dllm: --dtype meant the model's precision there: it is --precision now
    args = build_parser().parse_args(["serve-dllm", "folder", "--dtype", "float64"])
    assert args.precision == "float64"
    assert capsys.readouterr().err.count("--dtype is deprecated") == 1
    assert build_parser().parse_args(["serve-dllm", "folder"]).precision == "auto"


def test_order_sets_every_ranking_step_and_ssp_mode_is_deprecated(capsys):
    args = build_parser().parse_args(["filter", "s.tar", "--out", "o", "--method", "ssp", "--order", "easy"])
    assert default_steps(method=args.method, order=args.order) == [{"method": "ssp", "order": "easy"}]
    # the deprecated flag sets SSP's order only (as before), with one warning line
    argv = ["filter", "s.tar", "--out", "o", "--dedup-eps", "0.1", "--method", "ssp", "--ssp-mode", "easy"]
    args = build_parser().parse_args(argv)
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith("--ssp-mode is deprecated and will be removed in the next release: use --order")
    )
    with pytest.warns(DeprecationWarning, match=r"default_steps\(ssp_mode=\.\.\.\) is deprecated.*order="):
        steps = default_steps(method=args.method, dedup_eps=args.dedup_eps, ssp_mode=args.ssp_mode)
    assert steps == [{"method": "semdedup", "eps": 0.1}, {"method": "ssp", "order": "easy"}]
    with pytest.warns(DeprecationWarning, match="ssp step parameter 'mode' is deprecated.*use 'order'"):
        (old,) = normalize_steps([{"method": "ssp", "mode": "easy"}])
    assert old == {"method": "ssp", "keep": 0.5, "order": "easy"}
    with pytest.raises(ValueError, match=r"ssp order must be one of \('hard', 'easy'\), got 'random'"):
        normalize_steps([{"method": "ssp", "order": "random"}])


def test_the_select_fingerprint_keeps_the_spelling_runs_were_recorded_with(tmp_path):
    """A run finished before ``mode`` became ``order`` fingerprinted {"mode": ...}: the same."""
    artifact = SimpleNamespace(fingerprint="upstream")
    stage = SelectStage(tmp_path, artifact, artifact, [{"method": "ssp", "order": "easy"}], threads=1)
    recorded = {"method": "ssp", "keep": 0.5, "mode": "easy"}  # what the code before the rename wrote
    inputs = {"embed": "upstream", "cluster": "upstream"}
    params = {"steps": [recorded], "threads": 1}
    assert stage.fingerprint == json_digest({"stage": "select", "version": VERSION, "params": params, "inputs": inputs})
    assert stage.steps == [{"method": "ssp", "keep": 0.5, "order": "easy"}]  # what runs: the new name


def test_a_run_under_the_old_flags_is_not_redone_under_the_new_ones(tmp_path, capsys):
    shard, out = tiny_shard(tmp_path / "a.tar"), tmp_path / "out"
    old = ["--dtype", "float32", "--method", "ssp", "--ssp-mode", "easy", "--no-write"]
    assert main(["filter", shard, "--out", str(out), *ENCODER, *old]) == 0
    first = capsys.readouterr()
    assert first.err.count("is deprecated") == 2, first.err
    new = ["--storage-dtype", "float32", "--method", "ssp", "--order", "easy", "--no-write"]
    assert main(["filter", shard, "--out", str(out), *ENCODER, *new]) == 0
    second = capsys.readouterr()
    assert second.err == "" and second.out.count("skipped (up to date)") == 3, second.out
    embed = json.loads((out / "embed" / "_stage.json").read_text())
    assert embed["params"]["dtype"] == "float32"
    assert np.load(next((out / "embed" / "chunks").glob("*.img.npy"))).dtype == np.float32
    select = json.loads((out / "select" / "_stage.json").read_text())
    assert select["params"]["steps"] == [{"method": "ssp", "keep": 0.5, "mode": "easy"}]
