"""The vLLM plugin's pure parts (no vLLM needed): options and their one-line errors, the served
token count, the family registry, and the M-RoPE rule for pruned images checked against
transformers' Qwen2.5-VL and Qwen3-VL."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pipelines.vllm_plugin import FAMILIES, is_supported
from pipelines.vllm_plugin.options import ServeOptions, read_options, served_token_count
from pipelines.vllm_plugin.positions import Media, grid_positions, image_position_channels, prompt_positions
from prunecore.budget import keep_count

IMG, VID, VS, VE = 90, 91, 92, 93


def test_options_are_read_from_the_config():
    assert read_options(SimpleNamespace()) is None
    opts = read_options(SimpleNamespace(prunekit={"keep": 0.25, "layer": 2, "strategy": "row"}))
    assert opts == ServeOptions(keep=0.25, method="colmean", layer=2, strategy="row")


@pytest.mark.parametrize(
    "raw, names",
    [
        ({"keep": 2.5}, "keep=2.5"),
        ({"keep": 0}, "keep=0"),
        ({"keep": "a"}, "keep='a'"),
        ({"keep": True}, "keep=True"),
        ({}, "'keep' is missing"),
        ({"keep": 0.5, "kep": 1}, "unknown option(s) ['kep']"),
        ({"keep": 0.5, "method": "cls"}, "method='cls'"),
        ({"keep": 0.5, "strategy": "best"}, "strategy='best'"),
        ({"keep": 0.5, "layer": "last"}, "layer='last'"),
        ([0.5], "must be a JSON object"),
    ],
)
def test_a_bad_option_is_one_line_naming_it_and_the_fix(raw, names):
    with pytest.raises(ValueError) as err:
        read_options(SimpleNamespace(prunekit=raw))
    msg = str(err.value)
    assert msg.startswith("prunekit vLLM plugin: ") and names in msg and "; " in msg and "\n" not in msg


def test_served_token_count_is_the_budget_rule_with_counts_capped():
    for n in (1, 5, 24, 32, 1000):
        for keep in (0.1, 0.25, 0.5, 1.0):
            assert served_token_count(n, keep) == max(1, keep_count(n, keep))
    assert served_token_count(24, 100) == 24 and served_token_count(24, 6) == 6
    assert served_token_count(1, 0.1) == 1  # a tiny image keeps one token instead of failing the request


def test_supported_versions():
    assert is_supported("0.32.0") and is_supported("0.32.5rc1")
    assert not is_supported("0.31.9") and not is_supported("0.33.0") and not is_supported("dev")


def test_families_are_a_registry_that_refuses_a_second_class_for_an_architecture():
    assert FAMILIES.available() == [
        "LlavaForConditionalGeneration",
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen3VLForConditionalGeneration",
    ]
    assert FAMILIES["Qwen3VLForConditionalGeneration"] == "pipelines.vllm_plugin.qwen3_vl:PrunedQwen3VL"
    with pytest.raises(ValueError, match="'Qwen3VLForConditionalGeneration' is already registered"):
        FAMILIES.register("Qwen3VLForConditionalGeneration")("elsewhere:Other")
    with pytest.raises(ValueError, match=r"unknown vLLM family 'Gemma3'; choose from \['LlavaFor"):
        FAMILIES.lookup("Gemma3")


def qwen_vl(family: str):
    """A one-layer random Qwen2.5-VL or Qwen3-VL (transformers) with the test's special ids."""
    import transformers

    config_cls, model_cls = {
        "qwen2_5_vl": (transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration),
        "qwen3_vl": (transformers.Qwen3VLConfig, transformers.Qwen3VLForConditionalGeneration),
    }[family]
    cfg = config_cls(
        vision_config=dict(depth=1, hidden_size=16, out_hidden_size=16, intermediate_size=16, num_heads=2),
        text_config=dict(
            vocab_size=100,
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 1e4},
        ),
        image_token_id=IMG,
        video_token_id=VID,
        vision_start_token_id=VS,
        vision_end_token_id=VE,
    )
    return model_cls._from_config(cfg).eval()


GRIDS = [(4, 6), (8, 4)]  # merged (h, w): one wide, one tall image


def prompt(counts):
    """Token ids: text, image 1 (counts[0] pads), text, image 2 (counts[1] pads), text; and the pad offsets."""
    ids, offsets = [5, 6, 7], []
    for c in counts:
        ids += [VS]
        offsets.append(len(ids))
        ids += [IMG] * c + [VE, 8, 9]
    return ids + [10], offsets


def hf_positions(ids, grids, family):
    model = qwen_vl(family)
    input_ids = torch.tensor([ids])
    thw = torch.tensor([[1, 2 * h, 2 * w] for h, w in grids])
    mm_types = (input_ids == IMG).int()
    pos, _ = model.model.get_rope_index(
        input_ids, mm_token_type_ids=mm_types, image_grid_thw=thw, attention_mask=torch.ones_like(input_ids)
    )
    return pos[:, 0]  # (3, L)


FAMILY_NAMES = ["qwen2_5_vl", "qwen3_vl"]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_unpruned_prompt_positions_equal_transformers(family):
    ids, offsets = prompt([h * w for h, w in GRIDS])
    media = [Media(o, grid_positions(1, h, w), max(h, w)) for o, (h, w) in zip(offsets, GRIDS)]
    ours, delta = prompt_positions(len(ids), media)
    ref = hf_positions(ids, GRIDS, family)
    assert torch.equal(ours, ref)
    assert delta == int(ref.max()) + 1 - len(ids)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_pruned_positions_are_the_unpruned_ones_gathered_at_the_kept_tokens(family):
    """FoPru's rule in both runtimes: nothing shifts. The plugin's text positions are exact before
    the encoder runs; vLLM's recompute then puts each kept token at base + its channels."""
    full_ids, full_offsets = prompt([h * w for h, w in GRIDS])
    ref = hf_positions(full_ids, GRIDS, family)
    kept = [torch.tensor([0, 5, 7, 23]), torch.tensor([1, 2, 30])]
    ids, offsets = prompt([len(k) for k in kept])
    media = [Media(o, grid_positions(1, 1, len(k)), max(h, w)) for o, k, (h, w) in zip(offsets, kept, GRIDS)]
    ours, delta = prompt_positions(len(ids), media)
    for o, k, (h, w) in zip(offsets, kept, GRIDS):  # what vLLM's recompute writes from the channels
        ch = image_position_channels((h, w), k)
        base = int(ours[-1, o - 1]) + 1
        ours[:, o : o + len(k)] = ch[:, :3].T + base
        assert torch.equal(ch[:, 3], torch.full((len(k),), max(h, w)))
    keep_cols = torch.ones(len(full_ids), dtype=torch.bool)
    for fo, k, (h, w) in zip(full_offsets, kept, GRIDS):
        dropped = torch.ones(h * w, dtype=torch.bool)
        dropped[k] = False
        keep_cols[fo : fo + h * w] = ~dropped
    assert torch.equal(ours, ref[:, keep_cols])
    assert delta == int(ref.max()) + 1 - len(ids)


def test_overlapping_media_are_refused():
    with pytest.raises(ValueError, match="overlaps"):
        prompt_positions(10, [Media(2, grid_positions(1, 2, 2), 2), Media(4, grid_positions(1, 1, 2), 2)])
