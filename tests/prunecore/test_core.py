"""The shared core's small pieces: the one budget rule, stable top-k, dtypes, atomic writes and
digests, the model loader, and the one TokenStats type."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch

from prunecore.budget import (
    check_keep,
    keep_count,
    keep_counts,
    keep_from_sparsity,
    rank_order,
    torch_rank,
    torch_top_k,
)
from prunecore.device import resolve_device, resolve_dtype
from prunecore.io import atomic_path, atomic_write_json, file_digest, json_digest
from prunecore.models import load_tokenizer, load_transformers
from tokenprune.stats import TokenStats


@pytest.mark.parametrize(
    ("n", "keep", "k"), [(5, 0.5, 3), (4, 0.5, 2), (3, 0.5, 2), (10, 0.25, 3), (7, 1.0, 7), (7, 3, 3)]
)
def test_keep_count_rounds_half_up(n, keep, k):
    assert keep_count(n, keep) == k


def test_keep_count_errors_name_the_fix():
    with pytest.raises(ValueError, match="outside \\(0, 1\\]"):
        keep_count(10, 1.5)
    with pytest.raises(ValueError, match="outside \\[0, n=10\\]"):
        keep_count(10, 11)
    with pytest.raises(TypeError, match="not bool"):
        check_keep(True)
    with pytest.raises(ValueError, match="gives 0 < 1; pass a larger fraction"):
        keep_count(3, 0.1, minimum=1)


def test_keep_counts_per_row_equal_the_scalar_rule():
    n = torch.tensor([0, 1, 2, 3, 5, 7, 10, 101])
    for keep in (0.1, 0.25, 0.5, 0.7, 1.0):
        assert keep_counts(n, keep).tolist() == [keep_count(int(v), keep) for v in n]
    assert keep_counts(n, 4, clamp=True).tolist() == [0, 1, 2, 3, 4, 4, 4, 4]
    assert [keep_count(int(v), 4, clamp=True) for v in n] == [0, 1, 2, 3, 4, 4, 4, 4]


def test_a_count_above_n_raises_the_same_way_in_both_budget_functions():
    for call in (lambda: keep_count(3, 4), lambda: keep_counts(torch.tensor([5, 3]), 4)):
        with pytest.raises(ValueError, match="clamp=True"):
            call()


def test_keep_from_sparsity_is_the_one_converter_and_its_own_inverse():
    assert keep_from_sparsity(0.25) == 0.75 and keep_from_sparsity(keep_from_sparsity(0.25)) == 0.25
    assert keep_from_sparsity([0.0, 0.5]) == [1.0, 0.5]
    assert keep_from_sparsity(np.array([0.1, 0.9])).tolist() == pytest.approx([0.9, 0.1])
    with pytest.raises(TypeError, match="count"):
        keep_from_sparsity(1)
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        keep_from_sparsity(1.5)


def test_torch_rank_and_top_k_break_ties_towards_lower_indices():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    assert torch_rank(scores).tolist() == [[4, 0, 1, 3, 2], [0, 1, 2, 3, 4]]
    assert torch_top_k(scores, 2).tolist() == [[1, 2], [0, 1]]
    assert torch_top_k(scores, 2, largest=False).tolist() == [[0, 3], [0, 1]]
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, size=50).astype(np.float32)  # many ties
    assert torch_rank(torch.from_numpy(x)).argsort().numpy().tolist() == rank_order(x).tolist()


def test_resolve_dtype_and_device():
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("float16") is torch.float16
    assert resolve_dtype("auto", "cpu") is torch.float32 and resolve_dtype(torch.float64) is torch.float64
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        resolve_dtype("fp8")
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")


def test_atomic_path_publishes_whole_files_or_nothing(tmp_path):
    target = tmp_path / "a" / "x.json"
    atomic_write_json(target, {"b": 1, "a": [1, 2]})
    assert json.loads(target.read_text()) == {"a": [1, 2], "b": 1}
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"a": [1, 2], "b": 1}  # untouched
    assert os.listdir(target.parent) == ["x.json"]  # no temporary left
    assert file_digest(target, chunk_size=3) == hashlib.sha256(target.read_bytes()).hexdigest()
    assert json_digest({"a": 1, "b": 2}) == json_digest({"b": 2, "a": 1}) != json_digest({"a": 2, "b": 2})


def test_model_loader_never_runs_a_folders_remote_code(tmp_path):
    from transformers import BertConfig, BertModel

    folder = tmp_path / "bert"
    BertModel(
        BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(folder)
    model = load_transformers(folder, dtype="fp32", device="cpu")
    assert type(model).__name__ == "BertModel" and not model.training
    # a folder whose config asks for its own code: refused, never executed, never prompted
    (folder / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "evil.EvilModel", "AutoConfig": "evil.EvilConfig"}
    config["model_type"] = "evil"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError):
        load_transformers(folder, device="cpu")
    with pytest.raises((ValueError, OSError)):
        load_tokenizer(folder)


def test_token_stats_add_up_and_flatten():
    a = TokenStats("ftp", tokens_in=10, tokens_kept=7, forward_passes=1, extras={"layers": 2, "rule": "x"})
    b = TokenStats("ftp", tokens_in=6, tokens_kept=3, forward_passes=2, extras={"layers": 3, "rule": "y"})
    total = a + b
    assert (total.tokens_in, total.tokens_kept, total.forward_passes) == (16, 10, 3)
    assert total.extras == {"layers": 5, "rule": "y"} and a.extras == {"layers": 2, "rule": "x"}
    assert total.tokens_saved == 6 and total.keep_ratio == pytest.approx(10 / 16)
    assert TokenStats("fopru").keep_ratio == 1.0
    flat = total.as_dict()
    assert flat["method"] == "ftp" and flat["tokens_saved"] == 6 and flat["layers"] == 5
    with pytest.raises(ValueError, match="cannot add fopru stats to ftp stats"):
        a + TokenStats("fopru")


def test_generation_holds_the_prompt_and_names_the_generated_part():
    from tokenprune import Generation

    seq = torch.arange(10).reshape(2, 5)
    g = Generation(seq, ["a", "b"], TokenStats("fopru", 4, 2, 3), prompt_length=3)
    assert g.generated.tolist() == [[3, 4], [8, 9]] and g.stats.forward_passes == 3
