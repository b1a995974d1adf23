"""FoPru on Gemma 3 (tiny random Gemma3ForConditionalGeneration from a config, no hub): SigLIP
patches average-pooled to a fixed soft-token grid; scores on the pooled grid.

References written here: the pooled scores from an eager copy's full attention maps and
hand loops over each token's patch window; a greedy decode loop without cache over
hand-built embeddings, token types and positions of the kept tokens."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import Gemma3Config, Gemma3ForConditionalGeneration  # noqa: E402

from tokenprune.fopru import FoPru, fopru_generate, fopru_select  # noqa: E402
from tokenprune.fopru.adapters import make_adapter  # noqa: E402

IMG, BOI, EOI = 99, 97, 98
T = 16  # soft tokens per image (4 x 4), from 8 x 8 patches: pool kernel 2
STEP = dict(max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)


def _model(attn="sdpa", seed=0):
    cfg = Gemma3Config(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=4,
        ),
        text_config=dict(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            sliding_window=8,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=None,
        ),
        mm_tokens_per_image=T,
        image_token_id=IMG,
        boi_token_id=BOI,
        eoi_token_id=EOI,
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration._from_config(cfg, attn_implementation=attn).eval()
    with torch.no_grad():  # a projector with non-zero weights (it is zero-initialised)
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 1.0)
    return model


@pytest.fixture(scope="module")
def gemma():
    return _model()


def _inputs(rows, n_images, seed=1):
    """rows: token lists where "I" marks one image (BOI + T placeholders + EOI); left padding."""
    ids = [[t for x in r for t in ([BOI] + [IMG] * T + [EOI] if x == "I" else [x])] for r in rows]
    width = max(map(len, ids))
    input_ids = torch.tensor([[0] * (width - len(r)) + r for r in ids])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])
    pv = torch.randn(n_images, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "pixel_values": pv,
        "token_type_ids": (input_ids == IMG).long(),
    }


BATCH = ([5, 6, "I", 7], [5, "I", 8, 9, 10, 11])  # two prompts, different images, left padding
TWO = ([5, "I", 6, "I", 7],)  # two images in one prompt


def _reference_scores(model, pixel_values, layer=-1):
    eager = _model(attn="eager")
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        att = eager.model.vision_tower(pixel_values=pixel_values, output_attentions=True).attentions[layer]
    s = att.mean(2).mean(1)  # (n, 64) attention received, query then head mean
    out = torch.zeros(s.shape[0], T)
    for n in range(s.shape[0]):
        for j in range(64):
            r, c = divmod(j, 8)
            out[n, (r // 2) * 4 + c // 2] += s[n, j] / 4
    return out


def _reference_decode(model, inp, kept, steps):
    """Greedy loop without cache over the hand-shrunk prompt: kept features, token types, positions."""
    feats = model.get_image_features(pixel_values=inp["pixel_values"], return_dict=True).pooler_output
    rows, k = [], 0
    for ids, m in zip(inp["input_ids"].tolist(), inp["attention_mask"].tolist()):
        ids = [t for t, a in zip(ids, m) if a]
        out_ids, out_feat, j = [], [], 0
        while j < len(ids):
            if ids[j] == IMG:
                out_ids += [IMG] * len(kept[k])
                out_feat.append(feats[k][kept[k]])
                j += T
                k += 1
            else:
                out_ids.append(ids[j])
                j += 1
        rows.append((out_ids, out_feat))
    width = max(len(r) for r, _ in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r, _ in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r, _ in rows])
    emb = model.get_input_embeddings()(ids.masked_fill(ids == IMG, 0)).detach()
    emb[ids == IMG] = torch.cat([f for _, fs in rows for f in fs]).detach()
    tt = (ids == IMG).long()
    logits, new = [], []
    with torch.no_grad():
        for _ in range(steps):
            pos = (mask.cumsum(-1) - 1).clamp_min(0)
            lg = model(inputs_embeds=emb, attention_mask=mask, token_type_ids=tt, position_ids=pos).logits[:, -1]
            tok = lg.argmax(-1)
            logits.append(lg)
            new.append(tok)
            emb = torch.cat([emb, model.get_input_embeddings()(tok)[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            tt = torch.cat([tt, torch.zeros_like(tt[:, :1])], 1)
    return ids, torch.stack(new, 1), logits


def test_scores_on_the_pooled_grid(gemma):
    inp = _inputs(BATCH, 2)
    adapter = make_adapter(gemma)
    assert adapter.method == "colmean" and adapter.tokens_side == 4
    enc = adapter.encode_with_capture(inp)
    torch.testing.assert_close(enc.scores, _reference_scores(gemma, inp["pixel_values"]), rtol=1e-5, atol=1e-6)
    enc0 = make_adapter(gemma, layer=1).encode_with_capture(inp)  # hidden_states[1]: the first layer
    torch.testing.assert_close(
        enc0.scores, _reference_scores(gemma, inp["pixel_values"], layer=0), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match="CLS"):
        FoPru(gemma, method="cls")


@pytest.mark.parametrize("rows,n", [(BATCH, 2), (TWO, 2)], ids=["batch2_leftpad", "two_images"])
def test_keep_one_identical(gemma, rows, n):
    inp = _inputs(rows, n, seed=2)
    ref = gemma.generate(**inp, **STEP)
    result = fopru_generate(gemma, inp, keep=1.0, **STEP)
    out, st = result.output, result.stats
    assert torch.equal(out.sequences, ref.sequences)
    for got, exp in zip(out.logits, ref.logits):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)
    assert st.tokens_in == st.tokens_kept == n * T
    with pytest.raises(ValueError, match="inputs_embeds"):
        FoPru(gemma, feature_passing="inputs_embeds")
    with FoPru(gemma, keep=1.0, strategy="row") as fp:
        assert torch.equal(gemma.generate(**inp, **STEP).sequences, ref.sequences)
    assert fp.stats.extras["image_tokens_kept"] == [T] * n


@pytest.mark.parametrize("rows,n,keep", [(BATCH, 2, [0.25, 6]), (TWO, 2, 0.5)], ids=["batch", "two_images"])
def test_pruned_equals_manual_reference(gemma, rows, n, keep):
    inp = _inputs(rows, n, seed=3)
    result = fopru_generate(gemma, inp, keep=keep, restore_prompt=False, **STEP)
    out, st = result.output, result.stats
    scores = _reference_scores(gemma, inp["pixel_values"])
    keeps = keep if isinstance(keep, list) else [keep] * n
    kept = [fopru_select(scores[i : i + 1], kp)[0] for i, kp in enumerate(keeps)]
    assert [k.tolist() for k in st.extras["kept_indices"]] == [k.tolist() for k in kept]
    ids, new, logits = _reference_decode(gemma, inp, kept, STEP["max_new_tokens"])
    assert torch.equal(out.sequences[:, : ids.shape[1]], ids)
    assert torch.equal(out.sequences[:, ids.shape[1] :], new)
    for got, exp in zip(out.logits, logits):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)
    assert st.tokens_kept == sum(k.numel() for k in kept) and st.tokens_in == n * T
    assert st.extras["prompt_tokens_kept"] == (ids != 0).sum(1).tolist()


def test_forward_inside_context_is_the_pruned_prefill(gemma):
    inp = _inputs(BATCH, 2, seed=4)
    with FoPru(gemma, keep=0.25) as fp:
        first = gemma.generate(**inp, **STEP).logits[0]
        with torch.no_grad():
            out = gemma(**inp)
    torch.testing.assert_close(out.logits[:, -1], first, rtol=1e-5, atol=1e-5)
    assert out.logits.shape[1] == inp["input_ids"].shape[1] - (T - 4) and len(fp.history) == 2
