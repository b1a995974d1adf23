"""FoPru on LLaVA-NeXT (any-res): packed layout == the model's pack_image_features, selection
== brute force, keep=1.0 identical ids, pruned run == hand-built reference, errors, hygiene.
Tiny random models built from configs (no hub)."""

import random

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)

from tokenprune import FoPru  # noqa: E402
from tokenprune.fopru import fopru_generate  # noqa: E402
from tokenprune.fopru.adapters.llava_next import anyres_layout  # noqa: E402
from tokenprune.fopru.core import anyres_select  # noqa: E402

IMG = 99
CROP, PATCH = 16, 4  # 4x4 = 16 patches per crop
SIDE, P = CROP // PATCH, (CROP // PATCH) ** 2
PINS = [[16, 32], [32, 16], [32, 32], [16, 48]]
SIZES = torch.tensor([[20, 37], [30, 14]])  # wide (2x2 crops) and tall (2x1 crops)
GEN = dict(max_new_tokens=6, do_sample=False)


def _text_cfg():
    return LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        max_position_embeddings=512,
        pad_token_id=0,
    )


def _tiny_llava_next(attn="sdpa", seed=0, pins=PINS, crop=CROP, patch=PATCH, hidden=32, layers=3):
    torch.manual_seed(seed)
    vc = CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=crop,
        patch_size=patch,
        projection_dim=hidden,
    )
    cfg = LlavaNextConfig(
        vision_config=vc,
        text_config=_text_cfg(),
        image_token_id=IMG,
        image_grid_pinpoints=pins,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    return LlavaNextForConditionalGeneration._from_config(cfg, attn_implementation=attn).eval()


@pytest.fixture(scope="module")
def model():
    return _tiny_llava_next()


def _n_crops(size, pins=PINS):
    return anyres_layout(size, pins, CROP, PATCH).n_crops + 1


def _inputs(model, sizes=SIZES, heads=((1, 2), (5,)), tails=((3, 4), (6, 7, 8)), seed=1):
    """Left-padded batch, one image per sample, placeholder runs of the packed length."""
    n = [_n_crops(s) for s in sizes]
    pv = torch.randn(len(sizes), max(n), 3, CROP, CROP, generator=torch.Generator().manual_seed(seed))
    lens = [len(anyres_layout(s, PINS, CROP, PATCH)) for s in sizes]
    rows = [list(h) + [IMG] * ln + list(t) for h, ln, t in zip(heads, lens, tails)]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pv, "image_sizes": sizes.clone()}


# ------------------------------------------------------------------ layout == pack_image_features
def _packed_indices(m, size, n_crops, p):
    """The model's own pack_image_features on a tensor of crop-patch indices (newline = -1)."""
    feats = [torch.arange(n_crops * p, dtype=torch.float64).view(n_crops, p, 1)]
    packed, lens = m.pack_image_features(
        feats, torch.tensor([size]), "default", image_newline=torch.tensor([-1.0], dtype=torch.float64)
    )
    assert int(lens[0]) == packed[0].shape[0]
    return packed[0][:, 0].long()


def test_layout_equals_pack_image_features_llava16_geometry():
    """336 px / patch 14 crops with the LLaVA-1.6 pinpoints, many sizes and aspect ratios."""
    pins = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    m = _tiny_llava_next(pins=pins, crop=336, patch=14, hidden=8, layers=1)
    rng = random.Random(0)
    sizes = [[rng.randint(1, 2000), rng.randint(1, 2000)] for _ in range(40)]
    sizes += [[336, 336], [672, 1344], [100, 1000], [1000, 100], [1, 1], [480, 640], [641, 480]]
    seen_padding = 0
    for size in sizes:
        lay = anyres_layout(size, pins, 336, 14)
        ref = _packed_indices(m, size, lay.n_crops + 1, 576)
        assert torch.equal(lay.source, ref), size
        hh, ww = lay.unpadded
        nph, npw = lay.grid
        seen_padding += (hh, ww) != (nph * 24, npw * 24)
        # rows: base rows, then big-grid rows each closed by exactly one newline
        assert lay.n_visual == 576 + hh * ww and len(lay) == lay.n_visual + hh
        big_rows = lay.row[576:].view(hh, ww + 1)
        assert torch.equal(big_rows, (24 + torch.arange(hh))[:, None].expand(hh, ww + 1))
        assert torch.equal(lay.row[:576], torch.arange(576) // 24)
    assert seen_padding > 20  # unpadding was exercised in both directions


def test_layout_equals_pack_image_features_tiny(model):
    for size in [[20, 37], [30, 14], [16, 16], [5, 47], [47, 5], [33, 33]]:
        lay = anyres_layout(size, PINS, CROP, PATCH)
        assert torch.equal(lay.source, _packed_indices(model, size, lay.n_crops + 1, P)), size
        # and it is the placeholder count the model's get_image_features produces
    pv = torch.randn(2, 5, 3, CROP, CROP)
    feats = model.get_image_features(pixel_values=pv, image_sizes=SIZES, return_dict=True).pooler_output
    assert [f.shape[0] for f in feats] == [len(anyres_layout(s, PINS, CROP, PATCH)) for s in SIZES]


def test_layout_errors():
    with pytest.raises(ValueError, match="image_size"):
        anyres_layout([20], PINS, CROP, PATCH)
    with pytest.raises(ValueError, match="multiple"):
        anyres_layout([20, 30], PINS, 16, 5)
    with pytest.raises(ValueError, match="grid_pinpoints"):
        anyres_layout([20, 30], [], CROP, PATCH)


# ------------------------------------------------------------------ selection == brute force
def _ref_select(crop_scores, lay, k, norm, newline):
    s = crop_scores.double()
    if norm == "sum":
        s = s / s.sum(1, keepdim=True)
    elif norm == "max":
        s = s / s.max(1, keepdim=True).values
    flat = s.reshape(-1).tolist()
    src = lay.source.tolist()
    vis = [(flat[c], pos) for pos, c in enumerate(src) if c >= 0]
    vis.sort(key=lambda t: (-t[0], t[1]))  # descending, ties -> lower position
    kept = {pos for _, pos in vis[:k]}
    rows = lay.row.tolist()
    hit = {rows[pos] for pos in kept}
    for pos, c in enumerate(src):
        if c < 0 and (newline == "all" or (newline == "row" and rows[pos] in hit)):
            kept.add(pos)
    return sorted(kept)


@pytest.mark.parametrize("norm", ["sum", "max", "none"])
@pytest.mark.parametrize("newline", ["row", "all", "none"])
def test_anyres_select_brute_force(norm, newline):
    g = torch.Generator().manual_seed(3)
    for size in ([20, 37], [30, 14], [5, 47]):
        lay = anyres_layout(size, PINS, CROP, PATCH)
        # crops on very different scales so that the normalisation matters
        scale = torch.rand(lay.n_crops + 1, 1, generator=g) * 10
        scores = torch.rand(lay.n_crops + 1, P, generator=g) * scale
        for k in (1, 3, lay.n_visual // 4, lay.n_visual - 1, lay.n_visual):
            got = anyres_select(scores, lay, k, anyres_norm=norm, newline=newline)
            assert got.tolist() == _ref_select(scores, lay, k, norm, newline), (size, k)
            assert int((lay.source[got] >= 0).sum()) == k  # exact K visual tokens
        frac = anyres_select(scores, lay, 0.25, anyres_norm=norm, newline=newline)
        assert int((lay.source[frac] >= 0).sum()) == int(0.25 * lay.n_visual + 0.5)


def test_anyres_norm_changes_selection():
    lay = anyres_layout([20, 37], PINS, CROP, PATCH)
    scores = torch.rand(lay.n_crops + 1, P, generator=torch.Generator().manual_seed(0))
    scores[0] *= 100  # base view on a much larger scale
    raw = anyres_select(scores, lay, P, anyres_norm="none", newline="none")
    assert torch.equal(raw, torch.arange(P))  # raw scores: the base view wins everything
    summed = anyres_select(scores, lay, P, anyres_norm="sum", newline="none")
    assert int((summed >= P).sum()) > P // 2  # normalised: crops compete again


def test_anyres_select_errors():
    lay = anyres_layout([20, 37], PINS, CROP, PATCH)
    good = torch.rand(lay.n_crops + 1, P)
    with pytest.raises(ValueError, match="crop_scores must be"):
        anyres_select(good[:-1], lay, 4)
    with pytest.raises(ValueError, match="NaN"):
        anyres_select(torch.full_like(good, float("nan")), lay, 4)
    with pytest.raises(ValueError, match="anyres_norm"):
        anyres_select(good, lay, 4, anyres_norm="softmax")
    with pytest.raises(ValueError, match="newline"):
        anyres_select(good, lay, 4, newline="some")
    with pytest.raises(ValueError, match="is outside"):
        anyres_select(good, lay, lay.n_visual + 1)
    with pytest.raises(TypeError, match="floating"):
        anyres_select(torch.ones(lay.n_crops + 1, P, dtype=torch.long), lay, 4)


# ------------------------------------------------------------------ generate plumbing
def test_keep_one_identical_ids(model):
    inp = _inputs(model)
    ref = model.generate(**inp, **GEN)
    result = fopru_generate(model, inp, keep=1.0, **GEN)
    out, st = result.sequences, result.stats
    assert torch.equal(out, ref)
    lens = [len(anyres_layout(s, PINS, CROP, PATCH)) for s in SIZES]
    assert st.extras["image_tokens_in"] == lens and st.extras["image_tokens_kept"] == lens and st.tokens_saved == 0
    assert st.extras["newline_in"] == st.extras["newline_kept"] == [4, 8] and st.extras["visual_kept"] == [48, 48]
    out2 = fopru_generate(model, inp, keep=1.0, feature_passing="inputs_embeds", **GEN).sequences
    assert torch.equal(out2, ref)
    with FoPru(model, keep=1.0, anyres_norm="max", newline="row") as fp:
        out3 = model.generate(**inp, **GEN)
    assert torch.equal(out3, ref)
    assert fp.stats.extras["image_tokens_kept"] == lens


def _eager_scores(model, inp, layer=-2):
    """Reference scores from an eager copy's full attention maps (no hooks)."""
    eager = _tiny_llava_next(attn="eager")
    eager.load_state_dict(model.state_dict())
    n = [_n_crops(s) for s in inp["image_sizes"]]
    pv = torch.cat([inp["pixel_values"][i, : n[i]] for i in range(len(n))])
    with torch.no_grad():
        att = eager.model.vision_tower(pixel_values=pv, output_attentions=True).attentions
    a = att[len(att) + layer + 1 - 1]  # hidden_states[layer] is produced by this layer
    return list(a[:, :, 0, 1:].mean(1).split(n))


@pytest.mark.parametrize("passing", ["mm_encoder_outputs", "inputs_embeds"])
def test_pruned_equals_manual_reference(model, passing):
    inp = _inputs(model)
    keep = [0.25, 10]
    result = fopru_generate(model, inp, keep=keep, restore_prompt=False, feature_passing=passing, **GEN)
    out, st = result.sequences, result.stats
    feats = model.get_image_features(
        pixel_values=inp["pixel_values"], image_sizes=inp["image_sizes"], return_dict=True
    ).pooler_output
    scores = _eager_scores(model, inp)
    rows, img_feats = [], []
    for b, size in enumerate(inp["image_sizes"].tolist()):
        lay = anyres_layout(size, PINS, CROP, PATCH)
        k = keep[b] if isinstance(keep[b], int) else int(keep[b] * lay.n_visual + 0.5)
        kept = _ref_select(scores[b], lay, k, "sum", "row")
        assert st.extras["kept_indices"][b].tolist() == kept
        ids = inp["input_ids"][b][inp["attention_mask"][b].bool()].tolist()  # run shrunk, padding rebuilt
        s = ids.index(IMG)
        row = ids[:s] + [IMG] * len(kept) + ids[s + len(lay) :]
        rows.append((row, [1] * len(row)))
        img_feats.append(feats[b][kept])
    width = max(len(r) for r, _ in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r, _ in rows])
    mask = torch.tensor([[0] * (width - len(r)) + m for r, m in rows])
    emb = model.get_input_embeddings()(ids).detach()
    emb[ids == IMG] = torch.cat(img_feats).detach()
    ref = model.generate(input_ids=ids, inputs_embeds=emb, attention_mask=mask, **GEN)
    assert torch.equal(out[:, : ids.shape[1]], ids)
    assert torch.equal(out[:, ids.shape[1] :], ref[:, -GEN["max_new_tokens"] :])
    assert st.extras["visual_kept"] == [12, 10]
    assert st.tokens_saved == sum(st.extras["image_tokens_in"]) - sum(len(r) for r in st.extras["kept_indices"])


def test_batch_matches_single_and_kept_indices_bypass(model):
    inp = _inputs(model, seed=5)
    result = fopru_generate(model, inp, keep=[0.5, 7], newline="all", **GEN)
    batch, st = result.sequences, result.stats
    assert st.extras["newline_kept"] == st.extras["newline_in"] and st.extras["visual_kept"] == [24, 7]
    for b, kp in enumerate([0.5, 7]):
        single = {k: v[b : b + 1] for k, v in inp.items()}
        m = single["attention_mask"][0].bool()
        single["input_ids"], single["attention_mask"] = single["input_ids"][:, m], single["attention_mask"][:, m]
        one = fopru_generate(model, single, keep=kp, newline="all", **GEN).sequences
        assert torch.equal(batch[b, -6:], one[0, -6:]), b
    # explicit packed positions reproduce the same run
    result = fopru_generate(model, inp, kept_indices=st.extras["kept_indices"], **GEN)
    again, st2 = result.sequences, result.stats
    assert torch.equal(again, batch) and st2.extras["image_tokens_kept"] == st.extras["image_tokens_kept"]
    assert torch.equal(batch[:, : inp["input_ids"].shape[1]], inp["input_ids"])


# ------------------------------------------------------------------ errors and hygiene
def _hook_count(m):
    return sum(len(mod._forward_hooks) for mod in m.modules())


def test_errors(model):
    inp = _inputs(model)
    no_sizes = {k: v for k, v in inp.items() if k != "image_sizes"}
    with pytest.raises(ValueError, match="image_sizes"):
        fopru_generate(model, no_sizes, keep=0.5, **GEN)
    with pytest.raises(ValueError, match="strategy='row' is not supported"):
        fopru_generate(model, inp, keep=0.5, strategy="row", **GEN)
    with pytest.raises(ValueError, match="anyres_norm"):
        fopru_generate(model, inp, keep=0.5, anyres_norm="l2", **GEN)
    with pytest.raises(ValueError, match="is outside"):
        fopru_generate(model, inp, keep=49, **GEN)
    with pytest.raises(ValueError, match="packed positions"):
        fopru_generate(model, inp, kept_indices=[torch.tensor([0]), torch.tensor([56])], **GEN)
    with pytest.raises(ValueError, match="entries"):
        fopru_generate(model, inp, keep=[0.5], **GEN)
    # plain LLaVA with image_sizes still refuses, naming the model
    llava = LlavaForConditionalGeneration._from_config(
        LlavaConfig(vision_config=model.config.vision_config, text_config=model.config.text_config, image_token_id=IMG)
    ).eval()
    with pytest.raises(ValueError, match="LlavaForConditionalGeneration"):
        fopru_generate(
            llava,
            {"input_ids": inp["input_ids"], "pixel_values": torch.zeros(1, 3, 16, 16), "image_sizes": SIZES[:1]},
            keep=0.5,
        )


def test_hooks_removed_and_generate_restored(model):
    inp = _inputs(model)
    before = _hook_count(model)
    with FoPru(model, keep=0.5) as fp:
        assert _hook_count(model) == before + 2 and "generate" in model.__dict__
        model.generate(**inp, **GEN)
    assert fp.stats.extras["visual_kept"] == [24, 24]
    assert _hook_count(model) == before and "generate" not in model.__dict__
    with pytest.raises(ValueError, match="is outside"):
        with FoPru(model, keep=1000):
            model.generate(**inp, **GEN)
    assert _hook_count(model) == before and "generate" not in model.__dict__


def test_siglip_tower_colmean_full_strategy():
    """CLS-free tower (SigLIP, strategy 'full'): colmean scores, keep=1.0 identical ids."""
    from transformers import SiglipVisionConfig

    torch.manual_seed(4)
    vc = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=CROP,
        patch_size=PATCH,
    )
    cfg = LlavaNextConfig(
        vision_config=vc,
        text_config=_text_cfg(),
        image_token_id=IMG,
        image_grid_pinpoints=PINS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    m = LlavaNextForConditionalGeneration._from_config(cfg).eval()
    inp = _inputs(m, seed=9)
    ref = m.generate(**inp, **GEN)
    out = fopru_generate(m, inp, keep=1.0, method="colmean", layer=-1, **GEN).sequences
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="CLS"):
        fopru_generate(m, inp, keep=0.5, method="cls", **GEN)
    st = fopru_generate(m, inp, keep=0.3, method="colmean", layer=-1, **GEN).stats
    assert st.extras["visual_kept"] == [14, 14]
