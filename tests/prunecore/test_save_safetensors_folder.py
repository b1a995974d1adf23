"""prunecore.models.save_safetensors_folder: the one atomic writer of config.json + model.safetensors."""

from __future__ import annotations

import torch

from prunecore.models import read_json, read_safetensors, save_safetensors_folder


def test_round_trip_and_inputs_untouched(tmp_path):
    weight = torch.arange(6.0).reshape(2, 3).t()  # non-contiguous: saved contiguous
    state = {"a.weight": weight, "b.bias": torch.ones(2, dtype=torch.bfloat16)}
    folder = save_safetensors_folder(tmp_path / "ckpt", state, {"model_type": "x", "n": 2})
    assert folder == tmp_path / "ckpt"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert read_json(folder / "config.json") == {"model_type": "x", "n": 2}
    back = read_safetensors(folder)
    assert torch.equal(back["a.weight"], weight) and back["b.bias"].dtype == torch.bfloat16
    assert not weight.is_contiguous()  # the caller's tensor is not modified
