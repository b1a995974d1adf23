"""FoPru on Qwen3-VL (tiny random Qwen3VLForConditionalGeneration from a config, no hub):
Qwen2-VL-style scoring and M-RoPE positions, plus deepstack features pruned at the same kept
merged tokens as the main features.

References: the vision attention recomputed by hand from the attention module's own inputs
(checked to reproduce its output); a hand-shrunk prompt with hand-gathered main and deepstack
features and hand-built M-RoPE positions, run through the model's plain forward."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration  # noqa: E402
from transformers.models.qwen3_vl.modeling_qwen3_vl import (  # noqa: E402
    BaseModelOutputWithDeepstackFeatures,
    apply_rotary_pos_emb_vision,
)

from tests.helpers.qwen_vl import BATCH, IMG, TWO_IMAGES, VE, VID, VS, bruteforce_mrope, qwen_inputs  # noqa: E402
from tokenprune.fopru import FoPru, fopru_generate, fopru_select  # noqa: E402
from tokenprune.fopru.adapters import make_adapter  # noqa: E402

STEP = dict(max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)


def _model(seed=0):
    cfg = Qwen3VLConfig(
        vision_config=dict(
            depth=3,
            hidden_size=32,
            intermediate_size=64,
            num_heads=4,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=32,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0, 1],
        ),
        text_config=dict(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 1e4},
            pad_token_id=0,
        ),
        image_token_id=IMG,
        video_token_id=VID,
        vision_start_token_id=VS,
        vision_end_token_id=VE,
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration._from_config(cfg).eval()
    model.generation_config.eos_token_id = None  # fixed-length runs
    return model


@pytest.fixture(scope="module")
def qwen3():
    return _model()


def _inputs(layout, seed):
    inp = qwen_inputs(layout, seed=seed)
    return inp


def _reference_merged_scores(model, inp, block):
    """Per image colmean scores per merged token, from the block's own inputs by hand."""
    attn = model.model.visual.blocks[block].attn
    seen = {}
    h1 = attn.register_forward_pre_hook(lambda m, a, k: seen.update(x=a[0], **k), with_kwargs=True)
    h2 = attn.register_forward_hook(lambda m, a, o: seen.update(y=o))
    try:
        with torch.no_grad():
            model.get_image_features(pixel_values=inp["pixel_values"], image_grid_thw=inp["image_grid_thw"])
    finally:
        h1.remove()
        h2.remove()
    x, (cos, sin) = seen["x"], seen["position_embeddings"]
    heads, d = attn.num_heads, attn.head_dim
    with torch.no_grad():
        q, k, v = attn.qkv(x).reshape(x.shape[0], 3, heads, d).unbind(1)
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        outs, scores, a = [], [], 0
        for n in inp["image_grid_thw"].prod(-1).tolist():
            qs, ks, vs = (t[a : a + n].transpose(0, 1) for t in (q, k, v))
            p = torch.softmax(qs @ ks.transpose(-1, -2) * d**-0.5, dim=-1)
            outs.append((p @ vs).transpose(0, 1).reshape(n, heads * d))
            scores.append(p.mean(1).mean(0).view(-1, 4).mean(-1))  # 4 consecutive patches per merged token
            a += n
        torch.testing.assert_close(attn.proj(torch.cat(outs)), seen["y"], rtol=1e-5, atol=1e-5)
    return scores


def _reference_logits(model, inp, kept, wrong_deepstack=False):
    """First-step logits of the hand-shrunk prompt (plain forward, hand-gathered features and
    hand-built positions); ``wrong_deepstack`` gathers the deepstack features at other tokens."""
    grid = inp["image_grid_thw"].tolist()
    out = model.get_image_features(pixel_values=inp["pixel_values"], image_grid_thw=inp["image_grid_thw"])
    ids, pos, k = [], [], 0
    for row, m in zip(inp["input_ids"].tolist(), inp["attention_mask"].tolist()):
        row = [t for t, a in zip(row, m) if a]
        full = bruteforce_mrope(row, [g for g in grid[k : k + row.count(VS)]])
        cols, j = [], 0
        while j < len(row):
            if row[j] == IMG:
                n = grid[k][1] * grid[k][2] // 4
                cols += [j + s for s in kept[k].tolist()]
                j += n
                k += 1
            else:
                cols.append(j)
                j += 1
        ids.append([row[c] for c in cols])
        pos.append(full[:, cols])
    width = max(map(len, ids))
    input_ids = torch.tensor([[0] * (width - len(r)) + r for r in ids])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])
    position_ids = torch.zeros(3, len(ids), width, dtype=torch.long)
    for b, p in enumerate(pos):
        position_ids[:, b, width - p.shape[1] :] = p
    feats = [f[kk] for f, kk in zip(out.pooler_output, kept)]
    ds_kept = [torch.arange(kk.numel()) if wrong_deepstack else kk for kk in kept]
    deep = [[f[kk] for f, kk in zip(level, ds_kept)] for level in out.deepstack_features]
    image = BaseModelOutputWithDeepstackFeatures(pooler_output=feats, deepstack_features=deep)
    with torch.no_grad():
        logits = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            mm_encoder_outputs={"image": image},
        ).logits[:, -1]
    return input_ids, logits


@pytest.mark.parametrize("layout", [BATCH, TWO_IMAGES], ids=["batch2_leftpad", "two_images"])
def test_keep_one_identical(qwen3, layout):
    inp = _inputs(layout, seed=1)
    ref = qwen3.generate(**inp, **STEP)
    result = fopru_generate(qwen3, inp, keep=1.0, **STEP)
    out, st = result.output, result.stats
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(out.logits[0], ref.logits[0], rtol=1e-5, atol=1e-5)
    assert st.tokens_saved == 0 and st.tokens_in == sum(int(g.prod()) // 4 for g in inp["image_grid_thw"])
    with FoPru(qwen3, keep=1.0) as fp:
        assert torch.equal(qwen3.generate(**inp, **STEP).sequences, ref.sequences)
    assert fp.adapter.method == "colmean"


@pytest.mark.parametrize("layout,keep", [(BATCH, [0.5, 5]), (TWO_IMAGES, 0.25)], ids=["batch", "two_images"])
def test_pruned_equals_manual_reference_with_deepstack(qwen3, layout, keep):
    inp = _inputs(layout, seed=2)
    result = fopru_generate(qwen3, inp, keep=keep, restore_prompt=False, **STEP)
    out, st = result.output, result.stats
    scores = _reference_merged_scores(qwen3, inp, block=1)  # layer=None: -2 = block 1 of 3
    keeps = keep if isinstance(keep, list) else [keep] * len(scores)
    kept = [fopru_select(s[None], kp)[0] for s, kp in zip(scores, keeps)]
    assert [k.tolist() for k in st.extras["kept_indices"]] == [k.tolist() for k in kept]
    ids, logits = _reference_logits(qwen3, inp, kept)
    assert torch.equal(out.sequences[:, : ids.shape[1]], ids)
    torch.testing.assert_close(out.logits[0], logits, rtol=1e-5, atol=1e-5)
    _, wrong = _reference_logits(qwen3, inp, kept, wrong_deepstack=True)
    assert not torch.allclose(wrong, logits, atol=1e-4)  # the deepstack gather matters
    assert st.tokens_kept == sum(k.numel() for k in kept)


def test_inputs_embeds_refused(qwen3):
    with pytest.raises(ValueError, match="deepstack"):
        make_adapter(qwen3, feature_passing="inputs_embeds")
