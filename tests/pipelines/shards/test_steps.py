"""The selection-step table: defaults declared once, unknown names rejected, the CLI chain."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.cli import build_parser
from pipelines.shards import STEPS, FilterConfig, default_steps, filter_config
from pipelines.shards.steps import normalize_steps, run_step
from prunecore.cluster import kmeans


def test_normalize_fills_each_step_default_from_its_class():
    (dbp,) = normalize_steps([{"method": "dbp", "keep": 0.4}])
    assert dbp == {**STEPS["dbp"].defaults(), "method": "dbp", "keep": 0.4}
    with pytest.raises(ValueError, match="unknown parameter"):
        normalize_steps([{"method": "dbp", "eps": 0.1}])
    with pytest.raises(ValueError, match="unknown selection method"):
        normalize_steps([{"method": "nope"}])
    with pytest.raises(ValueError, match="exactly one of min"):
        normalize_steps([{"method": "clipscore"}])


def test_cli_without_step_flags_gives_the_step_defaults():
    args = build_parser().parse_args(["filter", "s.tar", "--out", "o", "--dedup-eps", "0.02"])
    steps = default_steps(dedup_eps=args.dedup_eps, method=args.method, keep=args.keep, order=args.order)
    assert normalize_steps(steps) == normalize_steps([{"method": "semdedup", "eps": 0.02}, {"method": "dbp"}])
    (ssp,) = default_steps(method="ssp", order="easy", temperature=0.1, seed=3)
    assert ssp == {"method": "ssp", "order": "easy"}  # dbp-only names are not passed to ssp
    with pytest.raises(TypeError, match="unknown step parameter"):
        default_steps(method="dbp", temprature=0.1)


def test_filter_config_takes_keywords_and_rejects_unknown_ones():
    cfg = filter_config(FilterConfig(clusters=7), seed=3)
    assert (cfg.clusters, cfg.seed, cfg.batch_size) == (7, 3, FilterConfig.batch_size)
    with pytest.raises(TypeError, match="unknown run_filter option"):
        filter_config(cluster=7)


def test_run_step_dispatches_through_the_table():
    x = np.random.default_rng(0).standard_normal((60, 8)).astype(np.float32)
    clu = kmeans(x, 3, seed=0, device="cpu")
    sel = run_step({"method": "random", "keep": 0.5}, x, clu)
    assert sel.keep.sum() == 30
    ssp = run_step({"method": "ssp", "keep": 20}, x, clu)
    assert ssp.keep.sum() == 20
