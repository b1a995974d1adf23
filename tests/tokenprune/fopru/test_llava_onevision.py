"""FoPru on LLaVA-OneVision (any-res, CLS-free SigLIP tower; tiny random model from a config).

References: per-crop colmean scores from an eager copy's attention maps, packed with the
LLaVA-NeXT layout (checked against the model's own packing in test_fopru_llava_next.py) or,
for a downsampled grid, interpolated by hand; a hand-shrunk prompt with hand-gathered features."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration  # noqa: E402

from tokenprune.fopru import FoPru, fopru_generate  # noqa: E402
from tokenprune.fopru.adapters import make_adapter  # noqa: E402
from tokenprune.fopru.adapters.llava_next import anyres_layout  # noqa: E402
from tokenprune.fopru.core import anyres_select, normalise_crop_scores  # noqa: E402

IMG, VID = 99, 98
CROP, PATCH, P = 16, 4, 16
PINS = [[16, 32], [32, 16], [32, 32], [16, 48]]
SIZES = torch.tensor([[20, 37], [30, 14]])  # 2x2 and 2x1 crops
GEN = dict(max_new_tokens=6, do_sample=False)


def _model(attn="sdpa", seed=0, aspect="anyres_max_9"):
    cfg = LlavaOnevisionConfig(
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=CROP,
            patch_size=PATCH,
        ),
        text_config=dict(
            model_type="qwen2",
            vocab_size=100,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=0,
        ),
        image_token_id=IMG,
        video_token_id=VID,
        image_grid_pinpoints=PINS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=aspect,
    )
    torch.manual_seed(seed)
    return LlavaOnevisionForConditionalGeneration._from_config(cfg, attn_implementation=attn).eval()


@pytest.fixture(scope="module")
def model():
    return _model()


def _inputs(model, sizes=SIZES, seed=1, batch_num_images=None, heads=((1, 2), (5,)), tails=((3, 4), (6, 7, 8))):
    crops = 5 if batch_num_images is None else 1
    pv = torch.randn(len(sizes), crops, 3, CROP, CROP, generator=torch.Generator().manual_seed(seed))
    extra = {} if batch_num_images is None else {"batch_num_images": torch.tensor(batch_num_images)}
    feats = model.get_image_features(pixel_values=pv, image_sizes=sizes, return_dict=True, **extra).pooler_output
    lens = [f.shape[0] for f in feats]
    if batch_num_images is None:
        rows = [list(h) + [IMG] * n + list(t) for h, n, t in zip(heads, lens, tails)]
    else:  # all images in one prompt
        rows = [[1] + [t for n in lens for t in [IMG] * n + [2]]]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pv, "image_sizes": sizes.clone(), **extra}


def _eager_crop_scores(model, inp, counts):
    eager = _model(attn="eager", aspect=model.config.vision_aspect_ratio)
    eager.load_state_dict(model.state_dict())
    pv = torch.cat([inp["pixel_values"][i, :c] for i, c in enumerate(counts)])
    with torch.no_grad():
        att = eager.model.vision_tower(pixel_values=pv, output_attentions=True).attentions[-1]
    return list(att.mean(2).mean(1).split(counts))  # colmean per crop (crops, P)


def test_scores_and_selection_equal_the_anyres_layout(model):
    inp = _inputs(model)
    adapter = make_adapter(model, keep=0.3)
    assert adapter.method == "colmean"
    enc = adapter.encode_with_capture(inp)
    layouts = [anyres_layout(s, PINS, CROP, PATCH) for s in SIZES]
    ref = _eager_crop_scores(model, inp, [lay.n_crops + 1 for lay in layouts])
    for got, crop, lay, nl in zip(enc.scores, ref, layouts, enc.info["newline_masks"]):
        flat = normalise_crop_scores(crop, "sum").reshape(-1)
        exp = torch.where(lay.is_newline, torch.zeros(()), flat[lay.source.clamp_min(0)])
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)
        assert torch.equal(nl, lay.is_newline)
    for rule in ("row", "all", "none"):
        kept = make_adapter(model, keep=0.3, newline=rule).select(enc, [0.3, 7])
        for k, crop, lay, kp in zip(kept, ref, layouts, [0.3, 7]):
            assert k.tolist() == anyres_select(crop, lay, kp, newline=rule).tolist(), rule


def test_downsampled_grid_scores_follow_the_features():
    """anyres_max_1: the 2x2-crop grid (8x8 unpadded to 5x8 patches) is bilinearly downsampled."""
    model = _model(seed=3, aspect="anyres_max_1")
    inp = _inputs(model, seed=4)
    enc = make_adapter(model).encode_with_capture(inp)
    lay = anyres_layout(SIZES[0], PINS, CROP, PATCH)
    crop = _eager_crop_scores(model, inp, [5, 3])[0]
    flat = normalise_crop_scores(crop, "sum").reshape(-1)
    hh, ww = lay.unpadded
    big = flat[lay.source[P:][~lay.is_newline[P:]]].reshape(1, 1, hh, ww)
    ratio = (hh * ww / (1 * 4**2)) ** 0.5
    small = torch.nn.functional.interpolate(big, [int(hh // ratio), int(ww // ratio)], mode="bilinear")[0, 0]
    got = enc.scores[0]
    assert got.shape[0] == enc.features[0].shape[0] == P + small.shape[0] * (small.shape[1] + 1) < len(lay)
    grid_tokens = got[P:].reshape(small.shape[0], small.shape[1] + 1)
    torch.testing.assert_close(grid_tokens[:, :-1], small, rtol=1e-5, atol=1e-6)
    ref = model.generate(**inp, **GEN)
    result = fopru_generate(model, inp, keep=1.0, **GEN)
    out, st = result.sequences, result.stats
    assert torch.equal(out, ref) and st.tokens_saved == 0
    st = fopru_generate(model, inp, keep=0.5, **GEN).stats
    assert st.extras["visual_kept"] == [int(0.5 * n + 0.5) for n in st.extras["visual_in"]]


@pytest.mark.parametrize("multi", [False, True], ids=["batch2_leftpad", "two_images_one_prompt"])
def test_keep_one_identical_ids(model, multi):
    inp = _inputs(model, seed=5, batch_num_images=[2] if multi else None)
    ref = model.generate(**inp, **GEN)
    for passing in ("mm_encoder_outputs", "inputs_embeds"):
        result = fopru_generate(model, inp, keep=1.0, feature_passing=passing, **GEN)
        out, st = result.sequences, result.stats
        assert torch.equal(out, ref), passing
        assert st.tokens_in == st.tokens_kept
    if multi:  # each image of a multi-image prompt: one crop + one newline
        assert st.extras["visual_in"] == [P, P] and st.extras["newline_in"] == [1, 1]
    with FoPru(model, keep=1.0) as fp:
        assert torch.equal(model.generate(**inp, **GEN), ref)
    assert fp.stats.tokens_saved == 0


@pytest.mark.parametrize("multi", [False, True], ids=["batch", "two_images_one_prompt"])
def test_pruned_equals_manual_reference(model, multi):
    inp = _inputs(model, seed=6, batch_num_images=[2] if multi else None)
    keep = [0.25, 5]
    result = fopru_generate(model, inp, keep=keep, restore_prompt=False, **GEN)
    out, st = result.sequences, result.stats
    extra = {"batch_num_images": inp["batch_num_images"]} if multi else {}
    feats = model.get_image_features(
        pixel_values=inp["pixel_values"], image_sizes=inp["image_sizes"], return_dict=True, **extra
    ).pooler_output
    kept = st.extras["kept_indices"]
    assert st.extras["visual_kept"] == [int(0.25 * st.extras["visual_in"][0] + 0.5), 5]
    ids, mask, k = [], [], 0  # hand-shrunk prompt
    for row, m in zip(inp["input_ids"].tolist(), inp["attention_mask"].tolist()):
        new_row, new_mask, j = [], [], 0
        while j < len(row):
            if not m[j]:  # padding is rebuilt to the shortest width
                j += 1
            elif row[j] == IMG:
                new_row += [IMG] * len(kept[k])
                new_mask += [1] * len(kept[k])
                j += feats[k].shape[0]
                k += 1
            else:
                new_row.append(row[j])
                new_mask.append(m[j])
                j += 1
        ids.append(new_row)
        mask.append(new_mask)
    width = max(map(len, ids))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in ids])
    mask = torch.tensor([[0] * (width - len(r)) + r for r in mask])
    emb = model.get_input_embeddings()(ids).detach()
    emb[ids == IMG] = torch.cat([f[kk] for f, kk in zip(feats, kept)]).detach()
    ref = model.generate(input_ids=ids, inputs_embeds=emb, attention_mask=mask, **GEN)
    assert torch.equal(out[:, : ids.shape[1]], ids)
    assert torch.equal(out[:, ids.shape[1] :], ref[:, -GEN["max_new_tokens"] :])


def test_errors(model):
    inp = _inputs(model)
    with pytest.raises(ValueError, match="needs image_sizes"):
        fopru_generate(model, {k: v for k, v in inp.items() if k != "image_sizes"}, keep=0.5, **GEN)
    with pytest.raises(ValueError, match="strategy='row' is not supported"):
        FoPru(model, strategy="row")
    with pytest.raises(ValueError, match="CLS"):
        FoPru(model, method="cls")


def _video(model, seed=2):
    """A valid video-only call: one 2-frame video between two text tokens."""
    pv = torch.randn(1, 2, 3, CROP, CROP, generator=torch.Generator().manual_seed(seed))
    n = model.model.get_video_features(pixel_values_videos=pv, return_dict=True).pooler_output.shape[1]
    return {"input_ids": torch.tensor([[1] + [VID] * n + [2]]), "pixel_values_videos": pv}


def test_videos_are_refused_not_run_unpruned(model):
    """A video-only call and an image + video call raise inside the context (no stats recorded)
    and in fopru_generate; both calls are valid for the model (they run outside FoPru)."""
    video = _video(model)
    image = _inputs(model, sizes=SIZES[:1], heads=((1, 2),), tails=((3,),))
    ids = torch.cat([image["input_ids"], video["input_ids"]], dim=1)
    both = {**image, **video, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    for call in (video, both):
        assert model.generate(**call, **GEN).shape[1] == call["input_ids"].shape[1] + GEN["max_new_tokens"]
    with FoPru(model, keep=0.25) as fp:
        for call in (video, both):
            with pytest.raises(ValueError, match="videos are not supported.*pixel_values_videos"):
                model.generate(**call, **GEN)
            with pytest.raises(ValueError, match="videos are not supported"), torch.no_grad():
                model(**call)
            with pytest.raises(ValueError, match="videos are not supported"):
                model(**{**call, "pixel_values_videos": None, "image_sizes_videos": torch.tensor([[16, 16]])})
        assert fp.history == []
        text = model.generate(input_ids=torch.tensor([[5, 6, 7]]), **GEN)  # text-only: unchanged
    assert torch.equal(text, model.generate(input_ids=torch.tensor([[5, 6, 7]]), **GEN))
    with pytest.raises(ValueError, match="videos are not supported"):
        fopru_generate(model, both, keep=0.25, **GEN)
