"""The FoPru vLLM plugin on Qwen3-VL (vLLM's CPU build): exact at keep=1.0, FoPru's kept tokens
(main and deepstack rows) at keep<1, and the text after a pruned image where it was unpruned."""

from __future__ import annotations

import json
import os
import subprocess
from types import SimpleNamespace

import torch
from conftest import ROOT
from images import SIZES_QWEN3

from pipelines.vllm_plugin.options import ServeOptions
from pipelines.vllm_plugin.positions import image_position_channels
from prunecore.budget import keep_count

MERGED = [(h // 32) * (w // 32) for h, w in SIZES_QWEN3]  # patch 16, merge 2


def test_keep_one_gives_the_same_tokens_as_vllm_without_the_plugin(engines_qwen3):
    off, keep1 = engines_qwen3["off"][1], engines_qwen3["keep1"][1]
    assert keep1["prompt_ids"] == off["prompt_ids"]
    assert keep1["output_ids"] == off["output_ids"]
    assert all(len(ids) == 8 for ids in off["output_ids"])


def test_keep_quarter_gives_the_language_model_keep_count_tokens_per_image(engines_qwen3, tiny_qwen3):
    image_token_id = json.loads((tiny_qwen3 / "config.json").read_text())["image_token_id"]
    off, pruned = engines_qwen3["off"][1], engines_qwen3["keep25"][1]
    assert pruned["registered_in_main"] is True
    for n, ids_off, ids in zip(MERGED, off["prompt_ids"], pruned["prompt_ids"]):
        assert ids_off.count(image_token_id) == n
        assert ids.count(image_token_id) == keep_count(n, 0.25)
        assert len(ids_off) - len(ids) == n - keep_count(n, 0.25)
    assert all(len(ids) == 8 for ids in pruned["output_ids"])  # a batch of two sizes generates


def test_kept_indices_equal_tokenprune_fopru_for_the_same_weights_and_image(engines_qwen3, tiny_qwen3):
    main_python = os.environ.get("PRUNEKIT_MAIN_PYTHON", str(ROOT / ".venv" / "bin" / "python"))
    ref = subprocess.run(
        [main_python, str(ROOT / "tests_vllm" / "fopru_reference.py"), str(tiny_qwen3), "0.25", "qwen3_vl"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=600,
    )
    assert ref.returncode == 0, ref.stderr[-3000:]
    expected = json.loads(ref.stdout.strip().splitlines()[-1])
    kept = engines_qwen3["keep25"][1]["kept"]
    assert [len(k) for k in kept] == [keep_count(n, 0.25) for n in MERGED]
    assert kept == expected


def test_text_after_a_pruned_image_keeps_its_unpruned_positions():
    """The served class's own position methods on a prompt with two pruned images: every
    position equals vLLM's unpruned Qwen3-VL layout gathered at the kept tokens (FoPru's rule)."""
    from vllm.model_executor.models.qwen3_vl import Qwen3VLForConditionalGeneration

    from pipelines.vllm_plugin.qwen3_vl import PrunedQwen3VL

    img, vs, ve = 90, 91, 92
    config = SimpleNamespace(
        image_token_id=img,
        video_token_id=93,
        vision_start_token_id=vs,
        vision_end_token_id=ve,
        vision_config=SimpleNamespace(spatial_merge_size=2),
    )
    grids = [(4, 6), (8, 4)]  # merged (h, w)
    kept = [torch.tensor([0, 5, 7, 23]), torch.tensor([1, 2, 30])]

    def prompt(counts):
        ids, offsets = [5, 6, 7], []
        for c in counts:
            offsets.append(len(ids) + 1)
            ids += [vs] + [img] * c + [ve, 8, 9]
        return ids + [10], offsets

    def features(offsets, counts):
        return [
            SimpleNamespace(
                modality="image",
                mm_position=SimpleNamespace(offset=o, length=c),
                data={"image_grid_thw": SimpleNamespace(data=torch.tensor([1, 2 * h, 2 * w]))},
            )
            for o, c, (h, w) in zip(offsets, counts, grids)
        ]

    full_ids, full_offsets = prompt([h * w for h, w in grids])
    full = [h * w for h, w in grids]
    ref, _ = Qwen3VLForConditionalGeneration._get_mrope_input_positions(full_ids, features(full_offsets, full), config)
    model = SimpleNamespace(
        prunekit=ServeOptions(keep=0.2), config=config, visual=SimpleNamespace(spatial_merge_size=2)
    )
    ids, offsets = prompt([len(k) for k in kept])
    positions, _ = PrunedQwen3VL.get_mrope_input_positions(model, ids, features(offsets, [len(k) for k in kept]))
    embeds = [
        torch.cat([torch.zeros(len(k), 8), image_position_channels(g, k).float()], 1) for k, g in zip(kept, grids)
    ]
    out, positions, delta = PrunedQwen3VL.recompute_mrope_positions(model, ids, embeds, positions, 0)
    assert [o.shape[1] for o in out] == [8, 8]
    keep_cols = torch.ones(len(full_ids), dtype=torch.bool)
    for fo, k, n in zip(full_offsets, kept, full):
        keep_cols[fo : fo + n] = False
        keep_cols[fo + k] = True
    assert torch.equal(positions, ref[:, keep_cols])
    assert delta == int(ref.max()) + 1 - len(ids)


def test_the_served_class_is_the_pruning_subclass():
    from vllm import ModelRegistry

    import pipelines.vllm_plugin as plugin

    assert plugin.register() is True
    assert ModelRegistry._try_load_model_cls("Qwen3VLForConditionalGeneration").__name__ == "PrunedQwen3VL"


def test_pruning_with_videos_allowed_stops_start_up_with_the_fix(monkeypatch):
    """vLLM's Qwen3-VL video layout changes once its pruning flag is on: refused at build time."""
    import pytest
    from vllm.model_executor.models.qwen3_vl import Qwen3VLForConditionalGeneration

    import pipelines.vllm_plugin.qwen2_5_vl as qwen2_5_vl
    from pipelines.vllm_plugin.qwen3_vl import PrunedQwen3VL

    def built(self, *, vllm_config, prefix=""):  # what vLLM's __init__ leaves that the check reads
        torch.nn.Module.__init__(self)
        self.config = SimpleNamespace(prunekit={"keep": 0.25})
        self.multimodal_config = SimpleNamespace(enable_mm_embeds=False, get_limit_per_prompt=vllm_config.get)
        self.use_data_parallel = False

    monkeypatch.setattr(Qwen3VLForConditionalGeneration, "__init__", built)
    monkeypatch.setattr(qwen2_5_vl, "get_tensor_model_parallel_world_size", lambda: 1)
    with pytest.raises(ValueError, match=r"""Qwen3-VL videos .*--limit-mm-per-prompt '\{"video": 0\}'"""):
        PrunedQwen3VL(vllm_config={"video": 1, "image": 2})
