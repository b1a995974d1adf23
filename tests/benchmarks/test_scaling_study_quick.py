"""The scaling study's --quick path (what CI runs) on a tiny slice of the MNIST test digits."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dataprune import kd_alpha

REPO = Path(__file__).resolve().parents[2]


def load_study():
    spec = importlib.util.spec_from_file_location("scaling_study", REPO / "benchmarks" / "scaling_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def study():
    return load_study()


def test_canonical_points(study):
    # every pruning method keeps all rows at f = 1: one plain "random" point serves them all
    assert study.canonical("ssp_hard", "ssl", 1.0, 0) == study.canonical("random", None, 1.0, 0)
    # random+KD with alpha 0 is plain random; default alpha comes from kd_alpha
    assert study.canonical("random_kd", None, 0.3, 1, 0.0) == study.canonical("random", None, 0.3, 1)
    assert study.canonical("random_kd", None, 0.3, 1)["alpha"] == round(kd_alpha(0.3), 4)
    assert study.canonical("dbp", "sup", 0.5, 0)["emb"] == "sup"
    assert study.canonical("random", "sup", 0.5, 0)["emb"] is None


def test_missing_fashion_files_give_a_clear_error(study, tmp_path):
    with pytest.raises(SystemExit, match="apt-get install -y dataset-fashion-mnist"):
        study.load_fashion(tmp_path)


@pytest.mark.slow
def test_quick_run_is_complete_and_resumable(study, shared_data, tmp_path):
    threads = torch.get_num_threads()
    argv = [
        "--quick",
        "--dataset",
        "mnist-test",
        "--data-dir",
        str(shared_data / "mnist"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--threads",
        "1",
        "--silent",
        "--plots",
        str(tmp_path / "plots"),
        "--results-json",
        str(tmp_path / "res.json"),
    ]
    try:
        first = study.main(argv)
        second = study.main(argv)
    finally:
        torch.set_num_threads(threads)
    results = first["results"]
    run = first["study"]
    n = run.n
    assert n == 800 and len(run.yte) == 400
    # quick grid: 10 method columns at 50% + random and random+KD at 100% + one extra seed
    # of random / random+KD at 50% + alpha sweep point (alpha=0.5; alpha=0 is random)
    assert first["trained"] == len(results) == 10 + 2 + 2 + 1
    for r in results:
        assert r["n_kept"] == int(round(r["fraction"] * n)), r
        assert 0.0 <= r["test_acc"] <= 1.0
    table = first["table"]
    for label in ("random", "random_kd", "ssp_hard[ssl]", "ssp_easy[sup]", "dbp[ssl]", "semdedup_dbp[sup]"):
        assert f"| {label} |" in table
    assert "alpha sweep" in table
    # resumable: the second run trains nothing and reads back the same numbers
    assert second["trained"] == 0
    assert [r["test_acc"] for r in second["results"]] == [r["test_acc"] for r in results]
    cache = run.dir
    for name in ("teacher.pt", "emb_ssl.npy", "emb_sup.npy", "recipe.json", "teacher_logits/logits.npy"):
        assert (cache / name).exists(), name
    assert run.teacher_logits().complete
    assert len(list((cache / "points").glob("*.json"))) == len(results)
    assert (tmp_path / "plots" / "scaling_mnist-test_accuracy.png").stat().st_size > 1000
    assert (tmp_path / "plots" / "scaling_mnist-test_alpha.png").exists()
    saved = json.loads((tmp_path / "res.json").read_text())
    assert len(saved["results"]) == len(results)

    # selections go through the library: SemDeDup+DBP keeps a subset of the dedup survivors
    rows, info = run.select("semdedup_dbp", "ssl", 0.5, 0)
    survivors, eps = run.dedup("ssl")
    assert info["semdedup_eps"] == eps
    assert np.isin(rows, survivors.indices).all()
    assert rows.size == min(400, survivors.n_kept)
    # SSP-easy and SSP-hard on the same prototypes split the rows at the score median
    hard, _ = run.select("ssp_hard", "sup", 0.5, 0)
    easy, _ = run.select("ssp_easy", "sup", 0.5, 0)
    assert hard.size == easy.size == 400 and np.intersect1d(hard, easy).size == 0
    # the KD teacher logits are the cached teacher's outputs on the training rows
    teacher = run.teacher()
    with torch.inference_mode():
        direct = teacher(run.xtr[:16])
    torch.testing.assert_close(run.teacher_logits().read(run.keys[:16]), direct, rtol=1e-4, atol=1e-4)
