"""FoPru on Qwen2-VL (tiny random Qwen2VLForConditionalGeneration from a config, no hub).

Brute-force references written here: the vision attention (hand-made 2-D rotary, full N x N
per image, checked against the module's own output), the merged-token pooling (from hand-made
patch coordinates), the M-RoPE positions of the unpruned prompt, and a greedy decode loop
without cache over hand-built embeddings / positions of the kept tokens.
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration  # noqa: E402

from tests.helpers.qwen_vl import BATCH, IMG, PATCH_DIM, TWO_IMAGES, VE, VID, VS, bruteforce_mrope, qwen_inputs  # noqa: E402
from tokenprune import FoPru, fopru_select  # noqa: E402
from tokenprune.fopru import fopru_generate, merge_grid_scores  # noqa: E402
from tokenprune.fopru.adapters import make_adapter  # noqa: E402
from tokenprune.fopru.core import (  # noqa: E402
    compact_tokens,
    merged_scores_from_packed,
    packed_patch_to_raster,
    prune_mm_inputs,
)

GEN = dict(max_new_tokens=6, do_sample=False)


def _model(attn="sdpa", seed=0, depth=2):
    cfg = Qwen2VLConfig(
        vision_config=dict(
            depth=depth,
            embed_dim=32,
            hidden_size=32,
            num_heads=4,
            mlp_ratio=2,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
        ),
        text_config=dict(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0},
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            initializer_range=0.2,
        ),
        image_token_id=IMG,
        video_token_id=VID,
        vision_start_token_id=VS,
        vision_end_token_id=VE,
    )
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration._from_config(cfg, attn_implementation=attn).eval()


@pytest.fixture(scope="module")
def qwen():
    return _model()


def _capture(model, layer):
    """The Qwen2-VL adapter's attention capture on vision block ``layer``."""
    return make_adapter(model, method="colmean", layer=layer).capture


# ------------------------------------------------------------------ brute-force references
def _patch_coords(h, w):
    """(row, col) of each packed patch, written from the layout rule (2x2 windows contiguous)."""
    out = []
    for m in range((h // 2) * (w // 2)):
        bh, bw = divmod(m, w // 2)
        for r in range(4):
            dy, dx = divmod(r, 2)
            out.append((2 * bh + dy, 2 * bw + dx))
    return out


def _rot(x):
    return torch.cat((-x[..., x.shape[-1] // 2 :], x[..., : x.shape[-1] // 2]), dim=-1)


def _window_order(gh, gw, ws):
    """Qwen2.5-VL's merge-unit order inside its tower, written from the rule: windows of
    ws x ws merged tokens in raster order, raster order inside each window."""
    return [
        r * gw + c
        for wr in range(0, gh, ws)
        for wc in range(0, gw, ws)
        for r in range(wr, min(wr + ws, gh))
        for c in range(wc, min(wc + ws, gw))
    ]


def _unit_orders(grid, ws=None):
    """Per image, the merge-unit order of the tower's sequence (identity for Qwen2-VL)."""
    out = []
    for _, h, w in grid.tolist():
        out.append(list(range(h * w // 4)) if ws is None else _window_order(h // 2, w // 2, ws))
    return out


def _bruteforce_vision_attention(model, pixel_values, grid, block_idx, ws=None):
    """Per image full attention probs (heads, n, n) at a vision block (patches in the tower's
    order: window order when ``ws`` is given), and the check that the hand computation
    reproduces the module's own output."""
    attn = model.model.visual.blocks[block_idx].attn
    seen = {}
    h1 = attn.register_forward_pre_hook(lambda m, a, k: seen.__setitem__("x", a[0].detach()), with_kwargs=True)
    h2 = attn.register_forward_hook(lambda m, a, o: seen.__setitem__("y", o.detach()))
    try:
        with torch.no_grad():
            model.get_image_features(pixel_values=pixel_values, image_grid_thw=grid)
    finally:
        h1.remove()
        h2.remove()
    x = seen["x"]
    heads, d = attn.num_heads, attn.head_dim
    inv = 1.0 / (10000.0 ** (torch.arange(0, d // 2, 2, dtype=torch.float) / (d // 2)))
    coords = []
    for (_, h, w), order in zip(grid.tolist(), _unit_orders(grid, ws)):
        packed = _patch_coords(h, w)
        coords += [packed[4 * u + r] for u in order for r in range(4)]
    coords = torch.tensor(coords, dtype=torch.float)
    ang = torch.cat([coords[:, :1] * inv, coords[:, 1:] * inv], dim=-1)
    ang = torch.cat([ang, ang], dim=-1)[:, None, :]  # (N, 1, d)
    with torch.no_grad():
        q, k, v = attn.qkv(x).reshape(x.shape[0], 3, heads, d).unbind(1)  # (N, heads, d)
        q = q * ang.cos() + _rot(q) * ang.sin()
        k = k * ang.cos() + _rot(k) * ang.sin()
        probs, outs, a = [], [], 0
        for n in grid.prod(-1).tolist():
            qs, ks, vs = (t[a : a + n].transpose(0, 1) for t in (q, k, v))
            p = torch.softmax(qs @ ks.transpose(-1, -2) * d**-0.5, dim=-1)  # (heads, n, n)
            probs.append(p)
            outs.append((p @ vs).transpose(0, 1).reshape(n, heads * d))
            a += n
        y = attn.proj(torch.cat(outs))
    torch.testing.assert_close(y, seen["y"], rtol=1e-5, atol=1e-5)  # the reference is the model's attention
    return probs


def _bruteforce_merged_scores(probs, grid, ws=None):
    out = []
    for p, (_, h, w), order in zip(probs, grid.tolist(), _unit_orders(grid, ws)):
        s = p.mean(1).mean(0)  # mean over queries, then heads
        packed = _patch_coords(h, w)
        merged = torch.zeros(h // 2, w // 2)
        for j in range(h * w):
            r, c = packed[4 * order[j // 4] + j % 4]
            merged[r // 2, c // 2] += s[j] / 4
        out.append(merged.reshape(-1))
    return out


def _reference_generate(model, inp, kept, steps):
    """Greedy decode without cache over hand-built embeddings/positions of the kept tokens."""
    ids, mask, grid = inp["input_ids"], inp["attention_mask"], inp["image_grid_thw"].tolist()
    feats = model.get_image_features(
        pixel_values=inp["pixel_values"], image_grid_thw=inp["image_grid_thw"]
    ).pooler_output
    emb_tab = model.get_input_embeddings()
    rows, k = [], 0  # k: global image index (images are numbered row-major over the batch)
    for b in range(ids.shape[0]):
        row = ids[b][mask[b].bool()].tolist()
        e = emb_tab(torch.tensor(row)).detach().clone()
        keep_cols, row_grids, j = [], [], 0
        while j < len(row):
            if row[j] == IMG:
                n = grid[k][1] * grid[k][2] // 4
                e[j : j + n] = feats[k].detach()
                keep_cols += [j + s for s in kept[k].tolist()]
                row_grids.append(grid[k])
                j += n
                k += 1
            else:
                keep_cols.append(j)
                j += 1
        pos = bruteforce_mrope(row, row_grids)
        rows.append((e[keep_cols], pos[:, keep_cols]))
    L = max(e.shape[0] for e, _ in rows)
    B, D = len(rows), rows[0][0].shape[1]
    emb = torch.zeros(B, L, D)
    pos = torch.zeros(3, B, L, dtype=torch.long)
    am = torch.zeros(B, L, dtype=torch.long)
    for b, (e, p) in enumerate(rows):
        emb[b, L - e.shape[0] :] = e
        pos[:, b, L - e.shape[0] :] = p
        am[b, L - e.shape[0] :] = 1
    new = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(inputs_embeds=emb, attention_mask=am, position_ids=pos).logits[:, -1]
            tok = logits.argmax(-1)
            new.append(tok)
            emb = torch.cat([emb, emb_tab(tok)[:, None]], 1)
            am = torch.cat([am, torch.ones(B, 1, dtype=am.dtype)], 1)
            pos = torch.cat([pos, pos[..., -1:] + 1], -1)
    return torch.stack(new, 1), am.sum(1) - steps


# ------------------------------------------------------------------ pure helpers
def test_packed_patch_order_and_merged_pooling():
    for h, w in ((4, 6), (6, 4), (2, 2), (8, 10)):
        coords = _patch_coords(h, w)
        assert packed_patch_to_raster((h, w)).tolist() == [r * w + c for r, c in coords]
        # same layout as the vision rotary positions of transformers itself
        from transformers.vision_utils import get_vision_position_ids

        vp = get_vision_position_ids(torch.tensor([[1, h, w]]), 2)
        assert vp.tolist() == [list(c) for c in coords]
        s = torch.rand(3, h * w)
        got = merged_scores_from_packed(s, (h, w))
        # the merger takes 4 consecutive packed patches per merged token
        torch.testing.assert_close(got, s.view(3, -1, 4).mean(-1))
        ref = torch.zeros(3, h // 2, w // 2)
        for j, (r, c) in enumerate(coords):
            ref[:, r // 2, c // 2] += s[:, j] / 4
        torch.testing.assert_close(got, ref.reshape(3, -1))
        raster = torch.empty_like(s)
        raster[:, packed_patch_to_raster((h, w))] = s
        torch.testing.assert_close(got, merge_grid_scores(raster, (h, w), 2))
    with pytest.raises(ValueError, match="divisible"):
        packed_patch_to_raster((3, 4))
    with pytest.raises(ValueError, match="patches"):
        merged_scores_from_packed(torch.rand(1, 10), (4, 4))


def test_compact_tokens_matches_prune_mm_inputs():
    ids = torch.tensor([[0, 0, 5, IMG, IMG, IMG, IMG, 6], [7, IMG, IMG, IMG, IMG, 8, IMG, IMG]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
    kept = [torch.tensor([1, 3]), torch.tensor([0]), torch.tensor([0, 1])]
    ref_ids, ref_mask = prune_mm_inputs(ids, mask, IMG, [4, 4, 2], kept, pad_token_id=0)
    keep = torch.ones_like(ids, dtype=torch.bool)
    img_keep = torch.zeros(10, dtype=torch.bool)
    img_keep[torch.tensor([1, 3, 4, 8, 9])] = True
    keep[ids == IMG] = img_keep
    pos = torch.arange(16).view(1, 2, 8).expand(3, 2, 8) * torch.tensor([1, 2, 3]).view(3, 1, 1)
    new_mask, (new_ids, new_pos) = compact_tokens(keep, mask, [(ids, 0), (pos, -1)])
    assert new_ids.tolist() == [[0, 0, 5, IMG, IMG, 6], [0, 7, IMG, 8, IMG, IMG]]  # what keep says, pads too
    assert new_mask.tolist() == [[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]]
    no_pad_mask, (no_pad_ids,) = compact_tokens(keep & mask.bool(), mask, [(ids, 0)])
    assert torch.equal(no_pad_ids, ref_ids) and torch.equal(no_pad_mask, ref_mask)  # prune_mm_inputs drops pads
    # row 1 keeps columns 0 (text), 1 (image 1, patch 0), 5 (text), 6, 7 (image 2): flat 8, 9, 13, 14, 15
    assert new_pos[:, 1].tolist() == [[-1] + [f * v for v in (8, 9, 13, 14, 15)] for f in (1, 2, 3)]
    assert new_pos[:, 0].tolist() == [[0, f * 1, f * 2, f * 4, f * 6, f * 7] for f in (1, 2, 3)]  # pads carried


# ------------------------------------------------------------------ attention capture
@pytest.mark.parametrize("layer", [-1, -2])
def test_capture_equals_bruteforce_attention(qwen, layer):
    inp = qwen_inputs(BATCH)
    grid = inp["image_grid_thw"]
    block = layer + 2  # depth 2
    probs = _bruteforce_vision_attention(qwen, inp["pixel_values"], grid, block)
    cap = _capture(qwen, layer)
    cap.max_block_elems = 4 * 20 * 48  # 20 queries per block for the 48-patch image: 3 blocks
    with cap, torch.no_grad():
        qwen.get_image_features(pixel_values=inp["pixel_values"], image_grid_thw=grid)
    ref = torch.cat([p.mean(1) for p in probs], dim=1)  # (heads, N) per-image column means
    torch.testing.assert_close(cap.rows, ref, rtol=1e-5, atol=1e-6)
    assert cap.cu_seqlens.tolist() == [0, 24, 72]
    merged = [merged_scores_from_packed(s, (h, w)) for s, (_, h, w) in zip(cap.segment_scores(), grid.tolist())]
    for got, exp in zip(merged, _bruteforce_merged_scores(probs, grid)):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)
    assert not cap.module.qkv._forward_hooks and not cap.module._forward_pre_hooks


def test_capture_same_under_eager_vision_attention():
    sdpa, eager = _model("sdpa", seed=4), _model("eager", seed=4)
    inp = qwen_inputs(TWO_IMAGES, seed=3)
    rows = []
    for m in (sdpa, eager):
        cap = _capture(m, -1)
        with cap, torch.no_grad():
            f = m.get_image_features(pixel_values=inp["pixel_values"], image_grid_thw=inp["image_grid_thw"])
        rows.append((cap.rows, torch.cat(f.pooler_output)))
    torch.testing.assert_close(rows[0][0], rows[1][0])
    torch.testing.assert_close(rows[0][1], rows[1][1], rtol=1e-5, atol=1e-5)
    probs = _bruteforce_vision_attention(eager, inp["pixel_values"], inp["image_grid_thw"], 1)
    torch.testing.assert_close(rows[1][0], torch.cat([p.mean(1) for p in probs], 1), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ generate
@pytest.mark.parametrize("layout", [BATCH, TWO_IMAGES], ids=["batch2_leftpad", "two_images"])
def test_keep_one_identical_ids(qwen, layout):
    inp = qwen_inputs(layout)
    ref = qwen.generate(**inp, **GEN)
    for fp in ("mm_encoder_outputs", "inputs_embeds"):
        result = fopru_generate(qwen, inp, keep=1.0, method="colmean", feature_passing=fp, **GEN)
        out, st = result.sequences, result.stats
        assert torch.equal(out, ref), fp
        assert st.tokens_saved == 0
    with FoPru(qwen, keep=1.0, method="colmean", strategy="row") as fp:
        out = qwen.generate(**inp, **GEN)
    assert torch.equal(out, ref)
    assert fp.stats.extras["image_tokens_in"] == [int(g.prod()) // 4 for g in inp["image_grid_thw"]]


def test_keep_one_identical_with_beams_and_return_sequences(qwen):
    inp = qwen_inputs(BATCH, seed=8)
    for kw in (dict(num_beams=2), dict(do_sample=True, top_k=5, num_return_sequences=2)):
        torch.manual_seed(0)
        ref = qwen.generate(**inp, max_new_tokens=4, **kw)
        torch.manual_seed(0)
        out = fopru_generate(qwen, inp, keep=1.0, method="colmean", max_new_tokens=4, **kw).sequences
        assert torch.equal(out, ref), kw
    out = fopru_generate(
        qwen, inp, keep=0.5, method="colmean", max_new_tokens=4, do_sample=True, num_return_sequences=2
    ).sequences
    assert out.shape[0] == 4 and torch.equal(out[::2, : inp["input_ids"].shape[1]], inp["input_ids"])


@pytest.mark.parametrize(
    "layout,keep",
    [(BATCH, 0.5), (BATCH, [2, 7]), (TWO_IMAGES, [0.25, 0.5])],
    ids=["batch_half", "batch_counts", "two_images"],
)
def test_pruned_equals_bruteforce_reference(qwen, layout, keep):
    inp = qwen_inputs(layout, seed=2)
    grid = inp["image_grid_thw"]
    result = fopru_generate(qwen, inp, keep=keep, method="colmean", restore_prompt=False, **GEN)
    out, st = result.sequences, result.stats
    # selection from brute-force attention at the default layer (-2 = block 0 of 2)
    probs = _bruteforce_vision_attention(qwen, inp["pixel_values"], grid, 0)
    keeps = keep if isinstance(keep, list) else [keep] * len(probs)
    kept = [fopru_select(s[None], kp)[0] for s, kp in zip(_bruteforce_merged_scores(probs, grid), keeps)]
    assert [k.tolist() for k in st.extras["kept_indices"]] == [k.tolist() for k in kept]
    new, n_prompt = _reference_generate(qwen, inp, kept, GEN["max_new_tokens"])
    assert torch.equal(out[:, -GEN["max_new_tokens"] :], new)
    assert st.extras["prompt_tokens_kept"] == n_prompt.tolist()
    assert st.extras["image_tokens_kept"] == [k.numel() for k in kept]
    assert st.tokens_saved == sum(st.extras["image_tokens_in"]) - sum(st.extras["image_tokens_kept"]) > 0
    # shrunk prompt: exactly K placeholders per image, text untouched
    assert int((out[:, : out.shape[1] - GEN["max_new_tokens"]] == IMG).sum()) == sum(st.extras["image_tokens_kept"])
    # the reference is sensitive to positions: naive compacted 1-D positions give other tokens
    if keep == 0.5:
        ids = out[:, : -GEN["max_new_tokens"]]
        mask = (torch.arange(ids.shape[1])[None] >= (ids.shape[1] - n_prompt)[:, None]).long()
        emb = qwen.get_input_embeddings()(ids)
        feats = qwen.get_image_features(pixel_values=inp["pixel_values"], image_grid_thw=grid).pooler_output
        emb = emb.masked_scatter((ids == IMG)[..., None].expand_as(emb), torch.cat([f[k] for f, k in zip(feats, kept)]))
        naive = qwen.generate(inputs_embeds=emb.detach(), attention_mask=mask, **GEN)
        assert not torch.equal(naive[:, -GEN["max_new_tokens"] :], new)


def test_batch_different_k_matches_single(qwen):
    inp = qwen_inputs(BATCH, seed=5)
    result = fopru_generate(qwen, inp, keep=[0.5, 4], method="colmean", strategy="row", **GEN)
    batch, st = result.sequences, result.stats
    assert st.extras["image_tokens_kept"] == [3, 4]
    for b, kp in enumerate([0.5, 4]):
        single = qwen_inputs([BATCH[b]], seed=5)
        a = 0 if b == 0 else 24
        single["pixel_values"] = inp["pixel_values"][a : a + int(inp["image_grid_thw"][b].prod())]
        result = fopru_generate(qwen, single, keep=kp, method="colmean", strategy="row", **GEN)
        one, st1 = result.sequences, result.stats
        assert torch.equal(st1.extras["kept_indices"][0], st.extras["kept_indices"][b])
        assert torch.equal(batch[b, -GEN["max_new_tokens"] :], one[0, -GEN["max_new_tokens"] :]), b
    assert torch.equal(batch[:, : inp["input_ids"].shape[1]], inp["input_ids"])  # restored prompt


def test_row_strategy_uses_each_images_merged_grid(qwen):
    inp = qwen_inputs(BATCH, seed=6)
    grid = inp["image_grid_thw"]
    st = fopru_generate(
        qwen, inp, keep=[3, 8], method="colmean", strategy="row", row_mode="rows", layer=-1, max_new_tokens=1
    ).stats
    probs = _bruteforce_vision_attention(qwen, inp["pixel_values"], grid, 1)
    scores = _bruteforce_merged_scores(probs, grid)
    for s, (_, h, w), kp, got in zip(scores, grid.tolist(), [3, 8], st.extras["kept_indices"]):
        exp = fopru_select(s[None], kp, strategy="row", grid=(h // 2, w // 2), row_mode="rows")[0]
        assert got.tolist() == exp.tolist()
    # image 0: merged grid 2x3, K=3 -> one whole merged row; image 1: 3x4, K=8 -> two rows
    assert st.extras["kept_indices"][0].tolist() in ([0, 1, 2], [3, 4, 5])
    rows1 = sorted({i // 4 for i in st.extras["kept_indices"][1].tolist()})
    assert len(rows1) == 2 and all(
        sum(1 for i in st.extras["kept_indices"][1].tolist() if i // 4 == r) == 4 for r in rows1
    )


def test_rope_deltas_continue_decode_without_position_ids(qwen):
    """After pruning, model.model.rope_deltas reproduces the explicit decode positions.

    (Single unpadded prompt, no attention mask: in transformers 5.24 the model's own
    rope_deltas path with a 2-D attention mask builds positions over the whole mask and fails
    for a 1-token decode step, with or without pruning; generate never takes that path.)
    """
    inp = qwen_inputs(TWO_IMAGES, seed=7)
    result = fopru_generate(qwen, inp, keep=[0.5, 2], method="colmean", restore_prompt=False, max_new_tokens=1)
    out, st = result.sequences, result.stats
    ids = out[:, :-1]
    feats = qwen.get_image_features(
        pixel_values=inp["pixel_values"], image_grid_thw=inp["image_grid_thw"]
    ).pooler_output
    emb = qwen.get_input_embeddings()(ids)
    emb = emb.masked_scatter(
        (ids == IMG)[..., None].expand_as(emb), torch.cat([f[k] for f, k in zip(feats, st.extras["kept_indices"])])
    ).detach()
    row = inp["input_ids"][0].tolist()
    full = bruteforce_mrope(row, inp["image_grid_thw"].tolist())
    starts = [j for j in range(len(row)) if row[j] == IMG and row[j - 1] != IMG]
    drop = {
        s + i
        for s, (_, h, w), k in zip(starts, inp["image_grid_thw"].tolist(), st.extras["kept_indices"])
        for i in range(h * w // 4)
        if i not in k.tolist()
    }
    pos = full[:, [j for j in range(len(row)) if j not in drop]][:, None]  # (3, 1, L')
    assert pos.shape[-1] == ids.shape[1]
    assert qwen.model.rope_deltas.view(-1).tolist() == [int(pos.max()) + 1 - ids.shape[1]]
    with torch.no_grad():
        pre = qwen(inputs_embeds=emb, position_ids=pos, use_cache=True)
        assert torch.equal(pre.logits[:, -1].argmax(-1), out[:, -1])
        nxt = out[:, -1:]
        c2, c3 = copy.deepcopy(pre.cache), copy.deepcopy(pre.cache)
        implicit = qwen(input_ids=nxt, cache=pre.cache).logits
        explicit = qwen(input_ids=nxt, cache=c2, position_ids=pos[..., -1:] + 1).logits
        wrong = qwen(input_ids=nxt, cache=c3, position_ids=pos[..., -1:]).logits  # off by one
    torch.testing.assert_close(implicit, explicit)
    assert not torch.allclose(implicit, wrong)


# ------------------------------------------------------------------ hygiene and errors
def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_removed_and_generate_restored_on_exception(qwen):
    inp = qwen_inputs(BATCH)
    before = _hook_count(qwen)
    with pytest.raises(ValueError, match="is outside"):
        with FoPru(qwen, keep=7, method="colmean"):  # image 0 has only 6 merged tokens
            assert "generate" in qwen.__dict__ and _hook_count(qwen) == before + 2
            qwen.generate(**inp, **GEN)
    assert _hook_count(qwen) == before and "generate" not in qwen.__dict__
    with pytest.raises(RuntimeError, match="boom"):
        with FoPru(qwen, keep=0.5, method="colmean"):
            raise RuntimeError("boom")
    assert _hook_count(qwen) == before and "generate" not in qwen.__dict__
    fopru_generate(qwen, inp, keep=0.5, method="colmean", max_new_tokens=1)
    assert _hook_count(qwen) == before


def test_validation_errors(qwen):
    inp = qwen_inputs(BATCH)
    with pytest.raises(ValueError, match="CLS"):
        fopru_generate(qwen, inp, keep=0.5, method="cls", **GEN)
    with pytest.raises(ValueError, match="CLS"):
        FoPru(qwen, keep=0.5, method="cls").__enter__()
    assert "generate" not in qwen.__dict__
    # no method given: the family default (colmean; the tower has no CLS token)
    result = fopru_generate(qwen, inp, keep=0.5, **GEN)
    out, st = result.sequences, result.stats
    ref = fopru_generate(qwen, inp, keep=0.5, method="colmean", **GEN).sequences
    assert torch.equal(out, ref) and FoPru(qwen).adapter.method == "colmean"
    with pytest.raises(ValueError, match="image_grid_thw"):
        fopru_generate(qwen, {k: v for k, v in inp.items() if k != "image_grid_thw"}, method="colmean", **GEN)
    bad = dict(inp, image_grid_thw=torch.tensor([[2, 4, 6], [1, 6, 8]]))
    with pytest.raises(ValueError, match="t=1"):
        fopru_generate(qwen, bad, method="colmean", **GEN)
    with pytest.raises(ValueError, match="videos"):
        fopru_generate(qwen, dict(inp, pixel_values_videos=torch.zeros(4, PATCH_DIM)), method="colmean", **GEN)
    with pytest.raises(ValueError, match="grid"):
        fopru_generate(qwen, inp, method="colmean", strategy="row", grid=(2, 3), **GEN)
    with pytest.raises(ValueError, match="position_ids"):
        fopru_generate(qwen, inp, method="colmean", position_ids=torch.zeros(3, 2, 5), **GEN)
    with pytest.raises(ValueError, match="entries"):
        fopru_generate(qwen, inp, keep=[0.5], method="colmean", **GEN)
    with pytest.raises(ValueError, match="within"):
        fopru_generate(qwen, inp, kept_indices=[torch.tensor([0, 6]), torch.tensor([1])], method="colmean", **GEN)
    with pytest.raises(ValueError, match="out of range"):
        FoPru(qwen, method="colmean", layer=3)
    with pytest.raises(ValueError, match="image tokens"):
        fopru_generate(
            qwen,
            dict(inp, image_grid_thw=torch.tensor([[1, 4, 4], [1, 6, 8]]), pixel_values=inp["pixel_values"][8:]),
            method="colmean",
            **GEN,
        )
    # explicit kept_indices bypass scoring and are used as given
    result = fopru_generate(
        qwen, inp, kept_indices=[torch.tensor([5, 0]), torch.tensor([11])], method="colmean", max_new_tokens=2
    )
    out, st = result.sequences, result.stats
    assert [k.tolist() for k in st.extras["kept_indices"]] == [[0, 5], [11]]


# ------------------------------------------------------------------ Qwen2.5-VL (windowed vision attention)
WS = 2  # window_size 16 / merge 2 / patch 4: windows of 2 x 2 merged tokens


def _model25(attn="sdpa", seed=0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(
        vision_config=dict(
            depth=2,
            hidden_size=32,
            out_hidden_size=32,
            intermediate_size=32,
            num_heads=4,
            patch_size=4,
            fullatt_block_indexes=[1],
            window_size=16,
        ),
        text_config=dict(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 1e4},
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            initializer_range=0.2,
        ),
        image_token_id=IMG,
        video_token_id=VID,
        vision_start_token_id=VS,
        vision_end_token_id=VE,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, attn_implementation=attn).eval()
    model.generation_config.eos_token_id = None  # fixed-length runs: the references do not stop at EOS
    return model


@pytest.fixture(scope="module")
def qwen25():
    return _model25()


BIG = [[("t", [5]), ("i", (8, 12)), ("t", [6, 7])], [("t", [5, 9]), ("i", (6, 8)), ("t", [8])]]  # 4 and 2x2 windows


def test_qwen2_5_window_order_is_the_models():
    from transformers.vision_utils import get_vision_window_index

    grid = torch.tensor([[1, 8, 12], [1, 6, 8], [1, 4, 4]])
    idx, _ = get_vision_window_index(grid, spatial_merge_size=2, window_size=16, patch_size=4)
    offsets = [0, 24, 36]
    assert idx.tolist() == [o + u for o, order in zip(offsets, _unit_orders(grid, WS)) for u in order]


def test_qwen2_5_capture_equals_bruteforce_and_unpermutes(qwen25):
    inp = qwen_inputs(BIG, seed=3)
    grid = inp["image_grid_thw"]
    probs = _bruteforce_vision_attention(qwen25, inp["pixel_values"], grid, 1, ws=WS)
    ref = _bruteforce_merged_scores(probs, grid, ws=WS)
    adapter = make_adapter(qwen25, method="colmean")  # layer=None: the last full-attention block
    assert adapter.capture.module is qwen25.model.visual.blocks[1].attn
    enc = adapter.encode_with_capture(
        {k: inp[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
    )
    for got, exp in zip(enc.scores, ref):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)
    # merged-token order of the scores is the order of the features the LLM sees
    feats = qwen25.get_image_features(pixel_values=inp["pixel_values"], image_grid_thw=grid).pooler_output
    assert all(torch.equal(a, b) for a, b in zip(enc.features, feats))
    assert [s.numel() for s in enc.scores] == [24, 12]
    with pytest.raises(ValueError, match="windowed-attention block"):
        FoPru(qwen25, method="colmean", layer=-2)


@pytest.mark.parametrize("layout", [BIG, TWO_IMAGES], ids=["batch2_leftpad", "two_images"])
def test_qwen2_5_keep_one_identical_ids(qwen25, layout):
    inp = qwen_inputs(layout, seed=4)
    ref = qwen25.generate(**inp, **GEN)
    for fp in ("mm_encoder_outputs", "inputs_embeds"):
        result = fopru_generate(qwen25, inp, keep=1.0, method="colmean", feature_passing=fp, **GEN)
        out, st = result.sequences, result.stats
        assert torch.equal(out, ref), fp
        assert st.tokens_saved == 0 and st.tokens_in == st.tokens_kept
    with FoPru(qwen25, keep=1.0, method="colmean") as fp:
        assert torch.equal(qwen25.generate(**inp, **GEN), ref)
    assert fp.stats.extras["image_tokens_in"] == [int(g.prod()) // 4 for g in inp["image_grid_thw"]]


@pytest.mark.parametrize("layout,keep", [(BIG, [0.25, 5]), (TWO_IMAGES, 0.5)], ids=["batch", "two_images"])
def test_qwen2_5_pruned_equals_bruteforce_reference(qwen25, layout, keep):
    inp = qwen_inputs(layout, seed=5)
    grid = inp["image_grid_thw"]
    result = fopru_generate(qwen25, inp, keep=keep, method="colmean", restore_prompt=False, **GEN)
    out, st = result.sequences, result.stats
    probs = _bruteforce_vision_attention(qwen25, inp["pixel_values"], grid, 1, ws=WS)
    keeps = keep if isinstance(keep, list) else [keep] * len(probs)
    scores = _bruteforce_merged_scores(probs, grid, ws=WS)
    kept = [fopru_select(s[None], kp)[0] for s, kp in zip(scores, keeps)]
    assert [k.tolist() for k in st.extras["kept_indices"]] == [k.tolist() for k in kept]
    new, n_prompt = _reference_generate(qwen25, inp, kept, GEN["max_new_tokens"])
    assert torch.equal(out[:, -GEN["max_new_tokens"] :], new)
    assert st.extras["prompt_tokens_kept"] == n_prompt.tolist()
    assert st.tokens_kept == sum(k.numel() for k in kept) and st.tokens_in == sum(s.numel() for s in scores)
    assert st.forward_passes == GEN["max_new_tokens"] and st.extras["vision_encodings"] == 1  # LM calls; 1 encoding


def test_unsupported_families_fail_at_construction():
    from transformers import (
        InternVLConfig,
        InternVLForConditionalGeneration,
        Mistral3Config,
        Mistral3ForConditionalGeneration,
    )

    tc = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    internvl = InternVLForConditionalGeneration._from_config(
        InternVLConfig(
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=4,
                image_size=[32, 32],
                patch_size=[4, 4],
            ),
            text_config=dict(tc, model_type="qwen2", num_key_value_heads=2),
            image_token_id=IMG,
        )
    )
    mistral3 = Mistral3ForConditionalGeneration._from_config(
        Mistral3Config(
            vision_config=dict(
                model_type="pixtral",
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=4,
                image_size=32,
                patch_size=4,
                head_dim=8,
            ),
            text_config=dict(tc, model_type="mistral", num_key_value_heads=2, head_dim=8),
            image_token_id=IMG,
        )
    )
    for model, model_type in ((internvl, "internvl"), (mistral3, "mistral3")):
        for build in (lambda m: FoPru(m, keep=0.5), lambda m: fopru_generate(m, {"input_ids": None}, keep=0.5)):
            with pytest.raises(TypeError, match=f"does not support .*{model_type}.*Supported families.*Qwen2.5-VL"):
                build(model)
        assert "generate" not in model.__dict__ and "forward" not in model.__dict__


# ------------------------------------------------------------------ forward inside the context, videos
@pytest.mark.parametrize("build", [lambda: _model(), lambda: _model25()], ids=["qwen2_vl", "qwen2_5_vl"])
def test_forward_inside_context_is_the_pruned_prefill(build):
    model = build()
    inp = qwen_inputs(BATCH, seed=9)
    step = dict(max_new_tokens=1, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with FoPru(model, keep=0.5, method="colmean") as fp:
        first = model.generate(**inp, **step).logits[0]
        with torch.no_grad():
            out = model(**inp)
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__
    assert out.logits.shape[1] == max(fp.stats.extras["prompt_tokens_kept"])  # the shrunk prompt, shortest padding
    assert (
        len(fp.history) == 2 and fp.history[0].extras["image_tokens_kept"] == fp.history[1].extras["image_tokens_kept"]
    )
    torch.testing.assert_close(out.logits[:, -1], first, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # unpruned forward differs: the context really pruned it
        assert not torch.allclose(model(**inp).logits[:, -1], first, atol=1e-3)


def test_videos_are_refused_not_run_unpruned(qwen):
    vid = qwen_inputs(BATCH)
    video = {
        "input_ids": torch.tensor([[5] + [VID] * 6 + [6]]),
        "pixel_values_videos": torch.randn(48, PATCH_DIM),
        "video_grid_thw": torch.tensor([[2, 4, 6]]),
    }
    with FoPru(qwen, keep=0.5, method="colmean"):
        for call in (qwen.generate, qwen):
            with pytest.raises(ValueError, match="videos are not supported"):
                call(**video, max_new_tokens=1) if call is qwen.generate else call(**video)
            with pytest.raises(ValueError, match="videos are not supported"):
                call(**dict(vid, **{k: v for k, v in video.items() if k != "input_ids"}))
        text_only = qwen.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False)
    assert torch.equal(text_only, qwen.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False))
