"""FoPru transformers adapter: hooks == eager attention, keep=1.0 identical ids, batching, the Generation result,
restore-on-exit. Tiny random models built from configs (no hub)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from tokenprune import FoPru, Generation, fopru_scores, fopru_select  # noqa: E402
from tokenprune.fopru import fopru_generate  # noqa: E402
from tokenprune.fopru.capture import AttentionRowCapture, vision_layers  # noqa: E402
from tokenprune.fopru.core import prune_mm_inputs  # noqa: E402
from tokenprune.generation import decode_continuations  # noqa: E402

IMG = 99
N = 64  # 32x32 image, patch 4 -> 8x8 grid


def _clip_cfg(**kw):
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=32,
        patch_size=4,
        projection_dim=32,
        **kw,
    )


def _llava(vision="clip", attn="sdpa", seed=0):
    torch.manual_seed(seed)
    vc = (
        _clip_cfg()
        if vision == "clip"
        else SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=32,
            patch_size=4,
        )
    )
    tc = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        max_position_embeddings=512,
        pad_token_id=0,
    )
    cfg = LlavaConfig(
        vision_config=vc,
        text_config=tc,
        image_token_id=IMG,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default" if vision == "clip" else "full",
    )
    return LlavaForConditionalGeneration._from_config(cfg, attn_implementation=attn).eval()


@pytest.fixture(scope="module")
def llava():
    return _llava()


def _inputs(texts=((1, 2), (1, 5)), tails=((3, 4, 5), (7, 8, 9)), seed=1):
    ids = torch.tensor([list(a) + [IMG] * N + list(b) for a, b in zip(texts, tails)])
    pv = torch.randn(len(texts), 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "pixel_values": pv, "attention_mask": torch.ones_like(ids)}


GEN = dict(max_new_tokens=6, do_sample=False)


# ------------------------------------------------------------------ hooks == eager
@pytest.mark.parametrize("layer", [-2, -1, 1])
def test_capture_equals_eager_clip(layer):
    torch.manual_seed(0)
    cfg = _clip_cfg()
    sdpa = CLIPVisionModel._from_config(cfg, attn_implementation="sdpa").eval()
    eager = CLIPVisionModel._from_config(cfg, attn_implementation="eager").eval()
    eager.load_state_dict(sdpa.state_dict())
    pv = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = eager(pixel_values=pv, output_attentions=True).attentions  # per layer (B,h,N,N)
    n_layers = len(vision_layers(sdpa))
    layer_idx = layer + n_layers if layer < 0 else layer - 1  # hidden_states index -> module index
    a = ref[layer_idx]
    for method, expect in (("cls", a[:, :, 0, :]), ("colmean", a.mean(2))):
        cap = AttentionRowCapture.for_model(sdpa, layer=layer, method=method)
        with cap, torch.no_grad():
            sdpa(pixel_values=pv)
        torch.testing.assert_close(cap.rows, expect, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            fopru_scores(cap.rows, method=method), fopru_scores(a, method=method), rtol=1e-5, atol=1e-6
        )
        assert not vision_layers(sdpa)[layer_idx].self_attn.q_proj._forward_hooks


def test_capture_equals_eager_siglip_colmean():
    torch.manual_seed(0)
    cfg = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=4
    )
    sdpa = SiglipVisionModel._from_config(cfg, attn_implementation="sdpa").eval()
    eager = SiglipVisionModel._from_config(cfg, attn_implementation="eager").eval()
    eager.load_state_dict(sdpa.state_dict())
    pv = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = eager(pixel_values=pv, output_attentions=True).attentions[0]
    cap = AttentionRowCapture.for_model(sdpa, layer=1, method="colmean")
    cap.query_block = 24  # exercise the blocked path (64 queries -> 3 blocks)
    with cap, torch.no_grad():
        sdpa(pixel_values=pv)
    torch.testing.assert_close(cap.rows, ref.mean(2), rtol=1e-5, atol=1e-6)


def test_capture_rejects_bad_layer(llava):
    with pytest.raises(ValueError, match="out of range"):
        AttentionRowCapture.for_model(llava, layer=-5)


# ------------------------------------------------------------------ input surgery
def test_prune_mm_inputs_left_pad_and_order():
    ids = torch.tensor([[0, 0, 5, IMG, IMG, IMG, IMG, 6], [7, IMG, IMG, IMG, IMG, 8, IMG, IMG]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
    # images: row0 run (4), row1 run (4), row1 second image (2)
    kept = [torch.tensor([1, 3]), torch.tensor([0]), torch.tensor([0, 1])]
    new_ids, new_mask = prune_mm_inputs(ids, mask, IMG, [4, 4, 2], kept, pad_token_id=0)
    r_ids, r_mask = prune_mm_inputs(ids, mask, IMG, [4, 4, 2], kept, padding_side="right")
    # padding is dropped and rebuilt to the shortest width (5 = row 1's kept tokens)
    assert r_ids.tolist() == [[5, IMG, IMG, 6, 0], [7, IMG, 8, IMG, IMG]]
    assert r_mask.tolist() == [[1, 1, 1, 1, 0], [1] * 5]
    assert new_ids.tolist() == [[0, 5, IMG, IMG, 6], [7, IMG, 8, IMG, IMG]]
    assert new_mask.tolist() == [[0, 1, 1, 1, 1], [1] * 5]
    with pytest.raises(ValueError, match="image tokens"):
        prune_mm_inputs(ids, mask, IMG, [4, 4], kept[:2])


# ------------------------------------------------------------------ generate plumbing
def test_keep_one_identical_ids(llava):
    inp = _inputs()
    ref = llava.generate(**inp, **GEN)
    result = fopru_generate(llava, inp, keep=1.0, **GEN)
    out, st = result.sequences, result.stats
    assert torch.equal(out, ref)
    assert st.extras["image_tokens_in"] == [N, N] and st.extras["image_tokens_kept"] == [N, N] and st.tokens_saved == 0
    out2 = fopru_generate(llava, inp, keep=1.0, feature_passing="inputs_embeds", **GEN).sequences
    assert torch.equal(out2, ref)
    with FoPru(llava, keep=1.0) as fp:
        out3 = llava.generate(**inp, **GEN)
    assert torch.equal(out3, ref)
    assert fp.stats.extras["image_tokens_kept"] == [N, N]


def test_keep_one_identical_with_beams_and_return_sequences(llava):
    inp = _inputs()
    kw = dict(GEN, do_sample=True, top_k=5, num_return_sequences=2)
    torch.manual_seed(0)
    ref = llava.generate(**inp, **kw)
    torch.manual_seed(0)
    out = fopru_generate(llava, inp, keep=1.0, **kw).sequences
    assert out.shape[0] == 4 and torch.equal(out, ref)
    out = fopru_generate(llava, inp, keep=0.5, **dict(GEN, num_beams=2, num_return_sequences=2)).sequences
    assert torch.equal(out[::2, : inp["input_ids"].shape[1]], inp["input_ids"])
    assert torch.equal(out[1::2, : inp["input_ids"].shape[1]], inp["input_ids"])


def test_keep_one_identical_ids_eager_model():
    m = _llava(attn="eager", seed=3)
    inp = _inputs(seed=4)
    ref = m.generate(**inp, **GEN)
    with FoPru(m, keep=1.0, strategy="row"):
        out = m.generate(**inp, **GEN)
    assert torch.equal(out, ref)


def test_pruned_equals_manual_reference(llava):
    """Pruned generate == plain generate on hand-built shrunk prompt + selected features."""
    inp = _inputs()
    result = fopru_generate(llava, inp, keep=0.25, restore_prompt=False, **GEN)
    out, st = result.sequences, result.stats
    # reference: same features and selection, prompt shrunk by hand
    feats = llava.get_image_features(pixel_values=inp["pixel_values"], return_dict=True).pooler_output
    cap = AttentionRowCapture.for_model(llava, layer=-2)
    with cap, torch.no_grad():
        llava.get_image_features(pixel_values=inp["pixel_values"])
    idx = fopru_select(fopru_scores(cap.rows), 0.25)
    assert [t.tolist() for t in st.extras["kept_indices"]] == idx.tolist()
    rows = []
    emb_rows = []
    for b in range(2):
        ids = inp["input_ids"][b].tolist()
        s = ids.index(IMG)
        rows.append(ids[:s] + [IMG] * 16 + ids[s + N :])
        emb_rows.append(feats[b][idx[b]])
    ids = torch.tensor(rows)
    emb = llava.get_input_embeddings()(ids)
    emb[ids == IMG] = torch.cat(emb_rows).detach()
    ref = llava.generate(input_ids=ids, inputs_embeds=emb, attention_mask=torch.ones_like(ids), **GEN)
    ref_new = ref[:, -GEN["max_new_tokens"] :]
    assert torch.equal(out[:, ids.shape[1] :], ref_new)
    assert torch.equal(out[:, : ids.shape[1]], ids)
    assert st.tokens_saved == 2 * (N - 16)


def test_batch_different_k_matches_single(llava):
    inp = _inputs(texts=((1, 2, 3), (1, 5, 6)), seed=5)
    result = fopru_generate(llava, inp, keep=[0.25, 10], **GEN)
    batch, st = result.sequences, result.stats
    assert st.extras["image_tokens_kept"] == [16, 10]
    assert st.extras["prompt_tokens_kept"] == [16 + 6, 10 + 6]
    for b, kp in enumerate([0.25, 10]):
        single = {k: v[b : b + 1] for k, v in inp.items()}
        one = fopru_generate(llava, single, keep=kp, **GEN).sequences
        assert torch.equal(batch[b, -GEN["max_new_tokens"] :], one[0, -GEN["max_new_tokens"] :]), b
    # restored prompt: original ids + new tokens
    assert torch.equal(batch[:, : inp["input_ids"].shape[1]], inp["input_ids"])


def test_two_images_in_one_prompt(llava):
    ids = torch.tensor([[1] + [IMG] * N + [2] + [IMG] * N + [3]])
    pv = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    inp = {"input_ids": ids, "pixel_values": pv, "attention_mask": torch.ones_like(ids)}
    ref = llava.generate(**inp, **GEN)
    out = fopru_generate(llava, inp, keep=1.0, **GEN).sequences
    assert torch.equal(out, ref)
    result = fopru_generate(llava, inp, keep=[8, 0.5], restore_prompt=False, **GEN)
    out, st = result.sequences, result.stats
    assert st.extras["image_tokens_kept"] == [8, 32]
    assert int((out[0] == IMG).sum()) == 40


def test_siglip_colmean_full_strategy():
    m = _llava(vision="siglip", seed=2)
    inp = _inputs(seed=6)
    ref = m.generate(**inp, **GEN)
    with FoPru(m, keep=1.0, method="colmean") as fp:
        assert torch.equal(m.generate(**inp, **GEN), ref)
    with pytest.raises(ValueError, match="CLS"):
        fopru_generate(m, inp, keep=0.5, method="cls", **GEN)
    assert FoPru(m).adapter.method == "colmean" and FoPru(_llava()).adapter.method == "cls"  # family defaults
    with FoPru(m, keep=0.5, method="colmean") as fp:
        m.generate(**inp, **GEN)
    assert fp.stats.extras["image_tokens_kept"] == [32, 32]


# ------------------------------------------------------------------ context manager hygiene
def _hook_count(model):
    return sum(len(mod._forward_hooks) for mod in model.modules())


def test_hooks_removed_and_generate_restored_on_exception(llava):
    inp = _inputs()
    before = _hook_count(llava)
    with pytest.raises(ValueError, match="is outside"):
        with FoPru(llava, keep=N + 1):
            assert "generate" in llava.__dict__
            assert _hook_count(llava) == before + 2
            llava.generate(**inp, **GEN)
    assert _hook_count(llava) == before
    assert "generate" not in llava.__dict__
    with pytest.raises(RuntimeError, match="boom"):
        with FoPru(llava, keep=0.5):
            raise RuntimeError("boom")
    assert _hook_count(llava) == before and "generate" not in llava.__dict__


def test_validation_errors(llava):
    inp = _inputs()
    with pytest.raises(ValueError, match="fraction"):
        FoPru(llava, keep=1.5)
    with pytest.raises(ValueError, match="at least 1"):
        fopru_generate(llava, inp, keep=0, **GEN)
    with pytest.raises(ValueError, match="grid"):
        fopru_generate(llava, inp, keep=0.5, strategy="row", grid=(4, 8 * 3), **GEN)
    with pytest.raises(ValueError, match="entries"):
        fopru_generate(llava, inp, keep=[0.5], **GEN)


def test_speed_benchmark_quick_path():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[3] / "benchmarks" / "fopru_speed.py"
    spec = importlib.util.spec_from_file_location("fopru_speed_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    med = mod.main(["--quick", "--threads", "1"])
    assert set(med) == {(m, b) for m in ("llava15", "qwen25vl") for b in (1, 2)}
    variants = {"plain", "fopru 0.5", "lower 0.5", "fopru 0.25", "lower 0.25"}
    assert all(set(m) == variants and all(t > 0 for t in m.values()) for m in med.values())


def test_public_names_resolve_to_the_package():
    import pipelines.generate as generate
    import tokenprune
    from tokenprune import fopru
    from tokenprune.fopru import api, core

    assert generate.fopru_generate is fopru.fopru_generate is api.fopru_generate
    assert generate.FoPru is tokenprune.FoPru is fopru.FoPru is api.FoPru
    assert tokenprune.fopru_scores is core.fopru_scores and tokenprune.fopru_select is core.fopru_select


def test_forward_inside_context_is_the_pruned_prefill(llava):
    """What evaluation harnesses call: model(**inputs) inside FoPru == the pruned generate's
    first step; labels are shrunk with the prompt (loss == loss on the hand-shrunk prompt)."""
    inp = _inputs()
    labels = inp["input_ids"].masked_fill(inp["input_ids"] == IMG, -100)
    step = dict(max_new_tokens=1, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with FoPru(llava, keep=0.25) as fp:
        first = llava.generate(**inp, **step).logits[0]
        with torch.no_grad():
            out = llava(**inp, labels=labels)
            again = llava(inp["input_ids"], pixel_values=inp["pixel_values"])  # positional input_ids too
    assert "forward" not in llava.__dict__ and "generate" not in llava.__dict__
    assert out.logits.shape[1] == 2 + 16 + 3 and len(fp.history) == 3
    torch.testing.assert_close(out.logits[:, -1], first, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again.logits, out.logits)
    kept = fp.stats.extras["kept_indices"]
    feats = llava.get_image_features(pixel_values=inp["pixel_values"], return_dict=True).pooler_output
    ids = torch.stack([torch.cat([r[:2], torch.full((16,), IMG), r[2 + N :]]) for r in inp["input_ids"]])
    emb = llava.get_input_embeddings()(ids).detach()
    emb[ids == IMG] = torch.cat([f[k] for f, k in zip(feats, kept)]).detach()
    with torch.no_grad():
        ref = llava(inputs_embeds=emb, labels=ids.masked_fill(ids == IMG, -100))
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ fopru_generate's Generation
FIXED = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)  # exactly 4 new tokens per row


class JoinTokenizer:
    """decode(ids) -> "i,j,k" (what a tokenizer's decode is asked for, made visible)."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return ",".join(str(i) for i in ids)


def test_generation_result_matches_the_context_manager(llava):
    inp = _inputs()
    res = fopru_generate(llava, inp, keep=0.25, **FIXED)
    assert isinstance(res, Generation) and res.output is None and res.texts == []
    with FoPru(llava, keep=0.25) as fp:
        ref = llava.generate(**inp, **FIXED)
    assert torch.equal(res.sequences, ref) and res.prompt_length == inp["input_ids"].shape[1]
    assert torch.equal(res.generated, ref[:, inp["input_ids"].shape[1] :]) and res.generated.shape == (2, 4)
    assert res.stats.as_dict().keys() == fp.stats.as_dict().keys()
    assert (res.stats.tokens_kept, res.stats.forward_passes) == (fp.stats.tokens_kept, fp.stats.forward_passes)
    texts = fopru_generate(llava, inp, tokenizer=JoinTokenizer(), keep=0.25, **FIXED).texts
    assert texts == [",".join(map(str, row)) for row in res.generated.tolist()]


def test_forward_passes_count_language_model_calls(llava):
    st = fopru_generate(llava, _inputs(), keep=8, **FIXED).stats
    # prefill + 3 decode steps of the LLM; the vision tower ran once
    assert (st.forward_passes, st.extras["vision_encodings"], st.tokens_kept) == (4, 1, 16)
    with FoPru(llava, keep=8) as fp:
        llava(**_inputs())
    assert (fp.stats.forward_passes, fp.stats.extras["vision_encodings"]) == (1, 1)
    assert not llava.get_decoder()._forward_pre_hooks  # the counting hook is removed


def test_deprecated_unpacking_keeps_the_old_values(llava):
    res = fopru_generate(llava, _inputs(), keep=0.25, **FIXED)
    with pytest.warns(DeprecationWarning, match="result.sequences"):
        out, st = res
    assert out is res.sequences and st is res.stats
    step = dict(FIXED, output_logits=True, return_dict_in_generate=True)
    res = fopru_generate(llava, _inputs(), keep=0.25, **step)
    assert torch.equal(res.sequences, res.output.sequences) and len(res.output.logits) == 4
    with pytest.warns(DeprecationWarning):
        out, _ = res
    assert out is res.output  # old callers still get generate's output object


def test_model_folder_loads_without_remote_code(llava, tmp_path):
    llava.save_pretrained(tmp_path / "llava")
    res = fopru_generate(str(tmp_path / "llava"), _inputs(), keep=0.25, **FIXED)
    assert torch.equal(res.sequences, fopru_generate(llava, _inputs(), keep=0.25, **FIXED).sequences)
    assert res.texts == []  # the folder ships no processor


def test_decode_continuations_cuts_at_the_first_eos():
    gen = torch.tensor([[5, 6, 2, 7, 2], [8, 9, 9, 9, 9]])
    assert decode_continuations(JoinTokenizer(), gen, [2, 3]) == ["5,6", "8,9,9,9,9"]
    assert decode_continuations(JoinTokenizer(), gen, []) == ["5,6,2,7,2", "8,9,9,9,9"]
