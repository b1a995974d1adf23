"""Corrupt or incomplete checkpoint folders fail at load with an error naming the file and the fix.

Covers every loader prunekit owns: the shared folder reading (``prunecore.models.read_json`` /
``read_safetensors``), native LLaDA / Dream (``load_dllm``) and Provence
(``load_provence_model``), on tiny random-weight folders written here: truncated shards
(header and body), a broken ``config.json``, a NaN / infinite weight, an index that does not
match its shards, a Dream config without ``mask_token_id``.
"""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from prunecore.models import CheckpointError, nonfinite_tensors, read_json, read_safetensors
from tests.helpers.dllm_folders import DREAM_CONFIG, write_folder
from tests.helpers.provence import tiny_bert as _tiny_bert
from tests.helpers.provence import tok_wordpiece as _tok_wordpiece
from tokenprune.localleap.models import load_dllm
from tokenprune.provence.model import load_provence_model, save_provence_model

SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


def truncate(path, keep):
    """Cut ``path`` to its first ``keep`` bytes (an interrupted download)."""
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def poison(path, key, value):
    """Set one element of tensor ``key`` of the safetensors file ``path`` to ``value``."""
    state = load_file(str(path))
    state[key].view(-1)[3] = value
    save_file(state, str(path))


@pytest.fixture
def llada(tmp_path):
    return write_folder(tmp_path / "llada", "llada", seed=0)  # two shards + index


@pytest.fixture(scope="module")
def provence(tmp_path_factory):
    tok = _tok_wordpiece()
    return save_provence_model(_tiny_bert(tok), tok, tmp_path_factory.mktemp("prov") / "m", max_length=64)


def copy_folder(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# ------------------------------------------------------------------ shared reading
@pytest.mark.parametrize("keep", [5, 200, -100], ids=["header_cut", "metadata_cut", "data_cut"])
def test_truncated_shard_names_the_file(llada, keep):
    shard = llada / SHARD2
    truncate(shard, keep if keep > 0 else shard.stat().st_size + keep)
    for load in (read_safetensors, load_dllm):
        with pytest.raises(
            CheckpointError, match=f"{re.escape(str(shard))}.*truncated or corrupt: download the checkpoint again"
        ):
            load(llada)


def test_missing_and_misplaced_shards_name_the_index(llada):
    index = llada / "model.safetensors.index.json"
    meta = json.loads(index.read_text())
    key = next(k for k, s in meta["weight_map"].items() if s == SHARD1)
    meta["weight_map"][key] = SHARD2  # the index says shard 2, the tensor is in shard 1
    index.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=f"maps 1 tensor.*{key} -> {SHARD2}.*different saves"):
        read_safetensors(llada)
    (llada / SHARD1).unlink()
    with pytest.raises(
        FileNotFoundError, match=f"{re.escape(str(llada / SHARD1))} is missing .listed in {re.escape(str(index))}"
    ):
        read_safetensors(llada)
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match=f"{re.escape(str(index))} has no weight_map"):
        read_safetensors(llada)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weight_is_found_at_load(llada, value):
    key = "model.transformer.blocks.1.ff_proj.weight"
    shard = next(s for s in (SHARD1, SHARD2) if key in load_file(str(llada / s)))
    poison(llada / shard, key, value)
    kind = "1 NaN, 0 infinite" if value != value else "0 NaN, 1 infinite"
    for load in (read_safetensors, load_dllm):
        with pytest.raises(
            CheckpointError, match=f"non-finite weights: {key} in {re.escape(str(llada / shard))} \\({kind}\\)"
        ):
            load(llada)


def test_nonfinite_tensors_every_dtype():
    big = torch.full((4, 4), 1e300, dtype=torch.float64)  # finite beyond float32: not an error
    state = {
        "ok": torch.randn(8, dtype=torch.bfloat16),
        "big": big,
        "ids": torch.arange(5),
        "nan16": torch.tensor([1.0, float("nan")], dtype=torch.float16),
        "empty": torch.zeros(0),
        "neg_inf": torch.tensor([-float("inf"), 1.0], dtype=torch.float64),
        "inf32": torch.tensor([[0.5, float("inf")]]),
        "nan_bf16": torch.tensor([float("nan"), 2.0], dtype=torch.bfloat16),
    }
    assert nonfinite_tensors(state) == ["nan16", "neg_inf", "inf32", "nan_bf16"]
    assert nonfinite_tensors({"big": big, "ids": torch.arange(3)}) == []


def test_bad_json_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "llada",\n "d_model": 3')
    with pytest.raises(
        CheckpointError, match=f"{re.escape(str(path))} is not valid JSON .*line 2 column.*restore the file"
    ):
        read_json(path)
    path.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=f"{re.escape(str(path))} must hold a JSON object, found a list"):
        read_json(path)
    path.write_bytes(b"\xff\xfe{")
    with pytest.raises(CheckpointError, match=f"cannot read {re.escape(str(path))}"):
        read_json(path)
    with pytest.raises(FileNotFoundError, match="nothing.json not found"):
        read_json(tmp_path / "nothing.json")


# ------------------------------------------------------------------ native LLaDA / Dream
def test_dllm_bad_config_names_the_file(llada):
    cfg = llada / "config.json"
    text = cfg.read_text()
    cfg.write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match=f"{re.escape(str(cfg))} is not valid JSON"):
        load_dllm(llada)
    cfg.write_text(json.dumps({**json.loads(text), "alibi": True}))
    with pytest.raises(CheckpointError, match=f"{re.escape(str(cfg))}: LLaDA config alibi=True is not supported"):
        load_dllm(llada)
    cfg.write_text(json.dumps({**json.loads(text), "d_model": 64, "n_heads": 8}))
    with pytest.raises(
        CheckpointError, match=f"do not have the shape {re.escape(str(cfg))} implies.*different checkpoints"
    ):
        load_dllm(llada)


@pytest.mark.parametrize("mask", ["absent", None, "60", -1], ids=["absent", "null", "string", "negative"])
def test_dream_config_without_mask_token_id_fails_at_load(tmp_path, mask):
    folder = write_folder(tmp_path / "dream", "dream", seed=0)
    cfg = {k: v for k, v in DREAM_CONFIG.items() if k != "mask_token_id"}
    if mask != "absent":
        cfg["mask_token_id"] = mask
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError, match=f"{re.escape(str(folder / 'config.json'))}: .*'mask_token_id'.*add it to config.json"
    ):
        load_dllm(folder)


# ------------------------------------------------------------------ Provence
def test_provence_corrupt_files_name_the_file(provence, tmp_path):
    weights = copy_folder(provence, tmp_path / "w") / "model.safetensors"
    truncate(weights, weights.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=f"{re.escape(str(weights))}.*truncated or corrupt: download"):
        load_provence_model(weights.parent)

    cfg = copy_folder(provence, tmp_path / "c") / "config.json"
    cfg.write_text(cfg.read_text()[:40])
    with pytest.raises(CheckpointError, match=f"{re.escape(str(cfg))} is not valid JSON"):
        load_provence_model(cfg.parent)

    cfg.write_text(json.dumps({**json.loads((provence / "config.json").read_text()), "num_attention_heads": 3}))
    with pytest.raises(CheckpointError, match=f"{re.escape(str(cfg))}: the backbone cannot be built.*attention heads"):
        load_provence_model(cfg.parent)

    marker = copy_folder(provence, tmp_path / "k") / "prunekit_provence.json"
    marker.write_text("{")
    with pytest.raises(CheckpointError, match=f"{re.escape(str(marker))} is not valid JSON"):
        load_provence_model(marker.parent)

    nan = copy_folder(provence, tmp_path / "n") / "model.safetensors"
    key = "token_classifier.weight"
    poison(nan, key, float("nan"))
    with pytest.raises(CheckpointError, match=f"non-finite weights: {key} in {re.escape(str(nan))} \\(1 NaN"):
        load_provence_model(nan.parent)


def test_provence_torch_bin_is_checked_too(provence, tmp_path):
    folder = copy_folder(provence, tmp_path / "b")
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    binary = folder / "pytorch_model.bin"
    torch.save(state, binary)
    model, _, _ = load_provence_model(folder)  # a good .bin loads
    assert torch.equal(model.token_classifier.weight, state["token_classifier.weight"])
    state["token_classifier.bias"][0] = float("inf")
    torch.save(state, binary)
    with pytest.raises(
        CheckpointError, match=f"token_classifier.bias in {re.escape(str(binary))} \\(0 NaN, 1 infinite"
    ):
        load_provence_model(folder)
    truncate(binary, binary.stat().st_size // 2)
    with pytest.raises(
        CheckpointError, match=f"cannot read weight file {re.escape(str(binary))}.*truncated or corrupt"
    ):
        load_provence_model(folder)
    binary.unlink()
    with pytest.raises(FileNotFoundError, match="holds no weights.*pytorch_model.bin"):
        load_provence_model(folder)


def test_provence_weights_of_another_model_name_the_folder(provence, tmp_path):
    folder = copy_folder(provence, tmp_path / "x")
    state = load_file(str(folder / "model.safetensors"))
    state["token_classifier.weight"] = torch.zeros(3, 32)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(
        CheckpointError, match=f"{re.escape(str(folder))}: checkpoint does not match.*token_classifier.weight"
    ):
        load_provence_model(folder)
