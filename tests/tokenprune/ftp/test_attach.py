"""FTP routed layers on tiny random Llama / Qwen2 models: exactness, sparsity, cache, padding."""

from pathlib import Path

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from prunecore.budget import keep_count
from tokenprune.ftp import (
    CompactLayer,
    FTPCache,
    RandomRouter,
    StaticRouter,
    TokenRouter,
    attach_ftp,
    cache_nbytes,
    detach_ftp,
    ftp_routing,
    get_handle,
)

V = 97


BASE = {
    "vocab_size": V,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
}


def _build(config_cls, model_cls, seed, attn="sdpa", **overrides):
    torch.manual_seed(seed)
    cfg = config_cls(**(BASE | overrides))
    cfg._attn_implementation = attn
    return model_cls(cfg).eval()


def _llama(attn="sdpa", layers=4):
    return _build(LlamaConfig, LlamaForCausalLM, 0, attn, num_hidden_layers=layers)


def _qwen2():
    return _build(Qwen2Config, Qwen2ForCausalLM, 1, num_hidden_layers=3)


def _mistral(window=8):
    return _build(MistralConfig, MistralForCausalLM, 2, num_hidden_layers=3, sliding_window=window)


def _phi(attn="sdpa", qk_layernorm=False):
    return _build(
        PhiConfig,
        PhiForCausalLM,
        3,
        attn,
        num_hidden_layers=3,
        num_key_value_heads=4,
        partial_rotary_factor=0.5,
        qk_layernorm=qk_layernorm,
    )


MODELS = {
    "llama": _llama,
    "llama_eager": lambda: _llama("eager"),
    "qwen2": _qwen2,
    "mistral": _mistral,
    "phi": _phi,
}


def _ids(B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, V, (B, T), generator=g)


def _reference_logits(model, ids, decisions, window=None):
    """Brute force: every layer runs densely with an explicit mask (kept keys only, causal,
    plus the token itself), then skipped tokens are reset to their input."""
    base = model.model
    h = base.embed_tokens(ids)
    B, T = ids.shape
    pid = torch.arange(T)[None].expand(B, T)
    pe = base.rotary_emb(h, position_ids=pid)
    for l, layer in enumerate(base.layers):
        keep = decisions[l]
        allowed = torch.zeros(B, 1, T, T, dtype=torch.bool)
        for b in range(B):
            for q in range(T):
                allowed[b, 0, q, q] = True
                for k in range(q + 1):
                    if keep[b, k] and (window is None or k > q - window):
                        allowed[b, 0, q, k] = True
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
        out = layer(h, attention_mask=mask, position_embeddings=pe, position_ids=pid)
        h = torch.where(keep[..., None], out, h)
    norm = base.norm if hasattr(base, "norm") else base.final_layernorm
    return model.lm_head(norm(h))


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("router", ["static", "learned"])
def test_sparsity_zero_bit_identical(name, router):
    model = MODELS[name]()
    ids = _ids(2, 17)
    with torch.no_grad():
        ref = model(ids).logits
        r = StaticRouter() if router == "static" else TokenRouter()
        with attach_ftp(model, r, schedule=0.0) as handle:
            m = handle.model
            out = m(ids).logits
            gen = m.generate(ids[:1], max_new_tokens=4, do_sample=False)
        dense_gen = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
    assert torch.equal(out, ref)
    assert torch.equal(gen, dense_gen)


@pytest.mark.parametrize("name", list(MODELS))
def test_routed_matches_brute_force_reference(name):
    model = MODELS[name]()
    n = len(model.model.layers)
    ids = _ids(2, 12, seed=3)
    sched = [0.0, 0.5, 0.25, 0.4][:n]
    with torch.no_grad():
        h = attach_ftp(model, TokenRouter(), schedule=sched)
        with h.recording():
            out = model(ids).logits
        dec = h.decisions()
        h.detach()
        ref = _reference_logits(
            model, ids, dec, window=getattr(model.config, "sliding_window", None) if name == "mistral" else None
        )
        if name == "mistral":
            assert model.config.sliding_window < ids.shape[1]  # the window really bites
    assert torch.allclose(out, ref, atol=2e-5, rtol=1e-4)
    # a routed model differs from the dense one
    assert not torch.allclose(out, model(ids).logits, atol=1e-3)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_achieved_sparsity_per_block(name):
    model = MODELS[name]()
    n = len(model.model.layers)
    sched = [0.1, 0.3, 0.55, 0.2][:n]
    ids = _ids(3, 40)
    with torch.no_grad(), ftp_routing(model, TokenRouter(), schedule=sched) as h:
        with h.recording():
            model(ids)
        st = h.stats
        dec = h.decisions()
    for l, s in enumerate(sched):
        assert st.extras["sparsity_per_block"][l] == pytest.approx(s, abs=0.5 / 40 + 1e-9)
        assert (dec[l].sum(1) == keep_count(40, 1 - s)).all()
    assert 0 < st.extras["flops_saved_frac"] < 1
    assert st.extras["flops_saved_frac"] == pytest.approx(sum(sched) / n, abs=0.02)


@pytest.mark.parametrize("router", [RandomRouter(3), TokenRouter()], ids=["random", "learned"])
def test_nested_routing_has_no_reentry(router):
    model = _llama(layers=4)
    sched = [0.2, 0.5, 0.3, 0.6]  # block 2 keeps more than block 1: some re-entry needed
    ids = _ids(2, 30)
    with torch.no_grad(), ftp_routing(model, router, schedule=sched, nested=True) as h:
        with h.recording():
            routed = model(ids).logits
        nested = h.decisions()
    with torch.no_grad():
        ref = _reference_logits(model, ids, nested)  # the original layers, detached
    assert torch.allclose(routed, ref, atol=2e-5, rtol=1e-4)
    for l, s in enumerate(sched):  # exact counts still hold
        assert (nested[l].sum(1) == keep_count(30, 1 - s)).all()
    for l in range(1, 4):
        prev, cur = nested[l - 1], nested[l]
        if cur.sum() <= prev.sum():  # fewer kept: a subset
            assert not (cur & ~prev).any()
        else:  # more kept: a superset
            assert not (prev & ~cur).any()
    # the sink token is kept everywhere by the learned router, as without nesting
    if isinstance(router, TokenRouter):
        assert all(d[:, 0].all() for d in nested)
    # without nesting the same routers re-admit skipped tokens (the thing nesting prevents)
    with torch.no_grad(), ftp_routing(model, RandomRouter(3), schedule=sched) as h:
        with h.recording():
            model(ids)
        free = h.decisions()
    assert (free[2] & ~free[1]).sum() > (free[2].sum() - free[1].sum())


def test_detach_restores_modules_and_context_manager():
    model = _llama()
    originals = list(model.model.layers)
    ids = _ids(1, 9)
    ref = model(ids).logits
    h = attach_ftp(model, StaticRouter(), schedule=0.3)
    assert get_handle(model) is h
    assert all(type(m).__name__ == "RoutedLayer" for m in model.model.layers)
    assert model.model.layers[1].self_attn is originals[1].self_attn
    assert model.model.layers[1].hidden_size == originals[1].hidden_size
    with pytest.raises(ValueError, match="already attached"):
        attach_ftp(model, StaticRouter(), schedule=0.3)
    detach_ftp(model)
    assert all(a is b for a, b in zip(model.model.layers, originals))
    assert get_handle(model) is None
    assert not model.model._forward_pre_hooks
    assert not any(m._forward_hooks for m in model.modules())
    with attach_ftp(model, StaticRouter(), schedule=0.5) as handle:
        m = handle.model
        assert m is model and type(m.model.layers[0]).__name__ == "RoutedLayer"
        assert not torch.allclose(m(ids).logits, ref)
    assert all(a is b for a, b in zip(model.model.layers, originals))
    assert torch.equal(model(ids).logits, ref)


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), [0.1, 0.2], [0.1, 0.2, 0.3, 1.2]])
def test_bad_schedule_errors(bad):
    model = _llama()
    with pytest.raises(ValueError, match="schedule|outside"):
        attach_ftp(model, StaticRouter(), schedule=bad)
    assert get_handle(model) is None
    assert all(type(m).__name__ == "LlamaDecoderLayer" for m in model.model.layers)


def test_mistral_generate_beyond_sliding_window():
    model = _mistral(window=8)
    dec, T0 = _greedy_replay_check(model, RandomRouter(seed=3), [0.2, 0.5, 0.4], _ids(1, 11), steps=6)
    assert T0 + 6 > model.config.sliding_window


def test_qwen2_sliding_layers_refused():
    qcfg = Qwen2Config(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=0,
    )
    qcfg._attn_implementation = "sdpa"
    q = Qwen2ForCausalLM(qcfg).eval()
    with pytest.raises(ValueError, match="sliding-window"):
        attach_ftp(q, StaticRouter(), schedule=0.3)
    assert all(type(m).__name__ == "Qwen2DecoderLayer" for m in q.model.layers)


def test_bad_router_and_model_errors():
    model = _llama()
    with pytest.raises(TypeError, match="router"):
        attach_ftp(model, "static", 0.2)
    with pytest.raises(ValueError, match="decoder layers"):
        attach_ftp(torch.nn.Linear(3, 3), StaticRouter(), 0.2)
    h = attach_ftp(model, StaticRouter(), schedule=0.2, allow_full=True)
    with pytest.raises(ValueError, match="attention_mask"):
        model(_ids(1, 5), attention_mask=torch.ones(1, 1, 5, 5))
    with pytest.raises(ValueError, match="entries"):
        h.set_schedule([0.1])
    h.detach()


def _pad_left(rows):
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    am = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r) :] = r
        am[i, T - len(r) :] = 1
    return ids, am


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_padded_batch_rows_match_single_rows(name):
    model = MODELS[name]()
    rows = [_ids(1, 14, seed=5)[0], _ids(1, 9, seed=6)[0], _ids(1, 3, seed=7)[0]]
    ids, am = _pad_left(rows)
    n = len(model.model.layers)
    with torch.no_grad(), attach_ftp(model, StaticRouter(), schedule=[0.3, 0.5, 0.2, 0.4][:n]) as handle:
        m = handle.model
        batched = m(ids, attention_mask=am).logits
        st = get_handle(m).stats
        for i, r in enumerate(rows):
            single = m(r[None]).logits[0]
            assert torch.allclose(batched[i, -len(r) :], single, atol=1e-4), i
    assert all(t == 14 + 9 + 3 for t in st.extras["tokens_in_per_block"])
    # per-row top-k on valid tokens: floor(0.7*n + 0.5) for n = 14, 9, 3 kept in block 0
    assert st.extras["tokens_kept_per_block"][0] == 10 + 6 + 2


def _greedy_replay_check(model, router, sched, ids, am=None, steps=6):
    with torch.no_grad(), attach_ftp(model, router, schedule=sched) as handle:
        m = handle.model
        h = get_handle(m)
        with h.recording():
            out = m.generate(
                ids,
                attention_mask=am,
                max_new_tokens=steps,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=0,
            )
        dec = h.decisions()
        seq = out.sequences
        T0 = ids.shape[1]
        assert all(d.shape == (ids.shape[0], seq.shape[1] - 1) for d in dec)
        with h.forced(dec):
            for t in range(T0, seq.shape[1]):
                a = None if am is None else torch.cat([am, torch.ones(am.shape[0], t - T0, dtype=am.dtype)], 1)
                logits = m(seq[:, :t], attention_mask=a, use_cache=False).logits[:, -1]
                assert torch.equal(logits.argmax(-1), seq[:, t])
                assert torch.allclose(logits, out.scores[t - T0], atol=1e-4, rtol=1e-4)
    return dec, T0


@pytest.mark.parametrize("name", ["llama", "qwen2", "llama_eager", "mistral", "phi"])
def test_generate_with_cache_equals_full_recompute(name):
    model = _mistral(window=64) if name == "mistral" else MODELS[name]()
    n = len(model.model.layers)
    dec, T0 = _greedy_replay_check(model, RandomRouter(seed=2), [0.2, 0.5, 0.4, 0.3][:n], _ids(1, 11))
    decode = torch.cat([d[:, T0:] for d in dec[1:]])
    assert decode.any() and not decode.all()  # decode steps really skipped some blocks


def test_generate_padded_batch_cache_consistency():
    model = _llama()
    rows = [_ids(1, 10, seed=8)[0], _ids(1, 6, seed=9)[0]]
    ids, am = _pad_left(rows)
    dec, T0 = _greedy_replay_check(model, RandomRouter(seed=4), [0.3, 0.5, 0.2, 0.4], ids, am)
    assert not dec[0][1, :4].any()  # padding never routed into a block


def _cache_kw(model, cache):
    import inspect

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def _out_cache(out):
    return getattr(out, "cache", None) or out.past_key_values


def test_compact_cache_stores_only_computed_tokens():
    model = _llama()
    ids = _ids(1, 12)
    with torch.no_grad():
        dense = model(ids, use_cache=True)
        with attach_ftp(model, StaticRouter(), schedule=[0.0, 0.5, 0.5, 0.0]) as handle:
            m = handle.model
            out = m(ids, use_cache=True)
    cache = _out_cache(out)
    assert isinstance(cache, FTPCache) and cache.get_seq_length() == 12
    assert cache.layers[1].keys.shape[2] == 6  # sink + the 5 most recent of 12 (keep 0.5)
    assert cache.layers[1].slots[0].tolist() == [0, 7, 8, 9, 10, 11]
    assert cache.layers[0].keys.shape[2] == 12 and cache.layers[0].slots[0].tolist() == list(range(12))
    assert cache_nbytes(cache) == cache_nbytes(_out_cache(dense)) * (12 + 6 + 6 + 12) // 48


def test_compact_cache_grows_only_with_computed_tokens():
    model = _llama()
    ids = _ids(1, 11)
    with torch.no_grad(), attach_ftp(model, RandomRouter(2), schedule=[0.2, 0.5, 0.4, 0.3]) as handle:
        m = handle.model
        h = get_handle(m)
        with h.recording():
            out = m.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
        dec = h.decisions()
    cache = _out_cache(out)
    assert cache.get_seq_length() == 11 + 5  # the last generated token is never fed
    for l, layer in enumerate(cache.layers):
        assert layer.slots[0].tolist() == torch.nonzero(dec[l][0]).flatten().tolist()
        assert layer.keys.shape[2] == int(dec[l].sum()) and layer.valid.all()
    assert any(not d[0, 11:].all() for d in dec)  # some decode steps skipped a layer: no entry for them


def test_fully_skipped_block_allow_full():
    model = _llama()
    ids = _ids(1, 10)
    with torch.no_grad():
        with attach_ftp(model, StaticRouter(), schedule=[0.0, 1.0, 0.0, 0.0], allow_full=True) as handle:
            m = handle.model
            out = m(ids).logits
            g = m.generate(ids, max_new_tokens=3, do_sample=False)
        # reference: block 1 replaced by identity
        layers = model.model.layers
        orig = layers[1]

        class Identity(torch.nn.Module):
            attention_type = "full_attention"

            def forward(self, h, *a, **k):
                return h

        layers[1] = Identity()
        ref = model(ids).logits
        layers[1] = orig
    assert torch.allclose(out, ref, atol=1e-5)
    assert g.shape == (1, 13)


def test_learned_router_keeps_sink_in_prefill():
    model = _llama()
    ids, am = _pad_left([_ids(1, 12, seed=11)[0], _ids(1, 7, seed=12)[0]])
    r = TokenRouter()
    with torch.no_grad():  # probability increasing with position
        r.net[0].weight.zero_()
        r.net[0].weight[:, 0] = 1.0
        r.net[0].bias.zero_()
        r.net[2].weight.fill_(0.05)
        r.net[2].bias.fill_(-5.0)

    def run(router):
        with torch.no_grad(), attach_ftp(model, router, schedule=0.6) as handle:
            m = handle.model
            h = get_handle(m)
            with h.recording():
                m(ids, attention_mask=am)
            return h.decisions()

    dec = run(r)
    assert dec[2][0, 0] and dec[2][1, 5]  # first valid token of each row
    assert dec[2].sum(1).tolist() == [keep_count(12, 0.4), keep_count(7, 0.4)]
    assert dec[2][0, -4:].all()  # then the highest-probability (latest) ones
    r.keep_sink = False
    dec = run(r)
    assert not dec[2][0, 0] and not dec[2][1, 5]
    assert TokenRouter.load(r.save(Path(__import__("tempfile").mkdtemp()) / "r.safetensors")).keep_sink is False


def test_keep_is_the_budget_and_sparsity_its_alias():
    model = _llama()
    ids = _ids(2, 15)
    outs = []
    for kw in ({"keep": [1.0, 0.5, 0.7, 0.6]}, {"schedule": [0.0, 0.5, 0.3, 0.4]}):
        with torch.no_grad(), ftp_routing(model, StaticRouter(), **kw) as h:
            with h.recording():
                outs.append(model(ids).logits)
            dec = h.decisions()
            st = h.stats
        for l, k in enumerate([1.0, 0.5, 0.7, 0.6]):
            assert (dec[l].sum(1) == keep_count(15, k)).all()  # floor(k * n + 0.5): 8 of 15 at 0.5
        assert st.method == "ftp" and st.forward_passes == 1
        assert st.tokens_in == 4 * 30 and st.tokens_kept == 2 * sum(keep_count(15, k) for k in [1.0, 0.5, 0.7, 0.6])
        assert st.extras["keep_per_block"] == pytest.approx([1.0, 0.5, 0.7, 0.6])
    assert torch.equal(outs[0], outs[1])
    with pytest.raises(ValueError, match="not both"):
        attach_ftp(model, StaticRouter(), schedule=0.3, keep=0.7)
    with pytest.raises(TypeError, match="not bool"):
        attach_ftp(model, StaticRouter(), True)
    with pytest.raises(ValueError, match="outside"):
        attach_ftp(model, StaticRouter(), keep=0.0)
    assert get_handle(model) is None


class _Recorder(TokenRouter):
    """A TokenRouter that keeps the features it was shown."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def keep_prob(self, inputs):
        self.seen.append(inputs.score.clone())  # the state is updated in place by later layers
        return super().keep_prob(inputs)


@pytest.mark.parametrize("qk_layernorm", [False, True], ids=["plain", "qk_layernorm"])
def test_score_feature_is_the_real_attention_with_partial_rotary(qk_layernorm):
    """Phi rotates half of each head (partial_rotary_factor=0.5): the score factor must be the
    attention the model really computed, read from eager attention weights."""
    model = _phi("eager", qk_layernorm=qk_layernorm)
    assert model.model.layers[0].self_attn.rotary_ndims < model.model.layers[0].self_attn.head_dim
    ids = _ids(2, 13, seed=4)
    with torch.no_grad():
        attn = model(ids, output_attentions=True).attentions[0]  # (B, H, T, T) of the dense layer 0
        want = torch.log1p(attn[:, :, -1, :].mean(1) * 13)
        r = _Recorder()
        with attach_ftp(model, r, schedule=[0.0, 0.5, 0.5]):
            model(ids)
    got = r.seen[0]  # what layer 1's router saw: layer 0's attention of the last token
    assert torch.allclose(got, want, atol=1e-5)


def _rank_router():
    """Decode decision by the rank of the new token's score: keep when it ranks in the top ~45%."""
    r = TokenRouter()
    with torch.no_grad():
        for p in r.parameters():
            p.zero_()
        r.net[0].weight[0, 2] = -20.0  # rank feature
        r.net[0].bias[0] = 10.0
        r.net[2].weight[0, 0] = 1.0
        r.net[2].bias[0] = -1.0
    return r


def _replay_alone(model, router, sched, seq, T0):
    """Sum of log-probs of seq[T0:] when the row is decoded alone with the cache, token by token,
    and the same logits recomputed from scratch (no cache) with that run's decisions."""
    with torch.no_grad(), attach_ftp(model, router, schedule=sched) as handle:
        m = handle.model
        h = get_handle(m)
        with h.recording():
            out = m(seq[None, :T0], use_cache=True)
            logits, cache = [out.logits[0, -1]], _out_cache(out)
            for t in range(T0, len(seq) - 1):
                out = m(seq[None, t : t + 1], use_cache=True, **_cache_kw(m, cache))
                logits.append(out.logits[0, -1])
                cache = _out_cache(out)
        dec = h.decisions()
        with h.forced(dec):
            for t, lg in zip(range(T0, len(seq)), logits):
                full = m(seq[None, :t], use_cache=False).logits[0, -1]
                assert torch.allclose(full, lg, atol=1e-4, rtol=1e-4)
    lp = torch.stack([torch.log_softmax(lg, -1)[tok] for lg, tok in zip(logits, seq[T0:])])
    return float(lp.sum()), dec


def _cache_kw(model, cache):
    import inspect

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


BEAM_SCHED, BEAM_T0 = [0.0, 0.4, 0.5, 0.3], 10


def _beam_search(model):
    """3 beams, 7 new tokens, scores = sums of log-probs; returns (output, recorded decisions)."""
    with torch.no_grad(), attach_ftp(model, _rank_router(), schedule=BEAM_SCHED) as handle:
        m = handle.model
        h = get_handle(m)
        with h.recording():
            out = m.generate(
                _ids(1, BEAM_T0, seed=21),
                num_beams=3,
                num_return_sequences=3,
                max_new_tokens=7,
                do_sample=False,
                length_penalty=0.0,
                early_stopping=True,
                eos_token_id=None,
                return_dict_in_generate=True,
                output_scores=True,
                pad_token_id=0,
            )
        return out, h.decisions()


def test_beam_search_reorders_routing_state_with_the_cache():
    model = _llama()
    out, dec = _beam_search(model)
    # the router treats the beams differently in decode steps
    assert any((d[:, BEAM_T0:] != d[:1, BEAM_T0:]).any() for d in dec[1:])
    for b in range(3):
        want, alone = _replay_alone(model, _rank_router(), BEAM_SCHED, out.sequences[b], BEAM_T0)
        # brute force: the beam's score is the sum of the log-probs the row gets decoded alone
        assert out.sequences_scores[b].item() == pytest.approx(want, abs=1e-3)
    assert any(not a[:, BEAM_T0:].all() for a in alone[1:])  # decode steps really skipped blocks


def test_beam_search_without_reorder_is_caught(monkeypatch):
    """The check above fails when the per-layer validity is not reordered with the K/V."""

    def kv_only(self, index):
        kb, vb, sb, ob = self.buffers
        self.buffers = [kb.index_select(0, index), vb.index_select(0, index), sb, ob]
        self.set_views()

    monkeypatch.setattr(CompactLayer, "select_rows", kv_only)
    model = _llama()
    out, _ = _beam_search(model)
    monkeypatch.undo()
    replays = [_replay_alone(model, _rank_router(), BEAM_SCHED, out.sequences[b], BEAM_T0)[0] for b in range(3)]
    assert max(abs(out.sequences_scores[b].item() - r) for b, r in enumerate(replays)) > 1e-3


SYNCING = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.cpu,
    torch.Tensor.numpy,
}


class _ReadBackSpy(torch.overrides.TorchFunctionMode):
    """Records tensor reads to the host (item, tolist, bool(), int(), .cpu()) made by tokenprune code."""

    def __init__(self):
        super().__init__()
        self.hits = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in SYNCING:
            import inspect

            files = [f.filename for f in inspect.stack()[1:4]]
            if any("tokenprune" in f for f in files):
                self.hits.append((getattr(func, "__name__", str(func)), files))
        return func(*args, **(kwargs or {}))


def test_gpu_decode_step_reads_nothing_back(monkeypatch):
    """With host reads treated as costly (as on a GPU), a routed decode step of the learned router
    (batch 2, blended decisions) makes no host read in tokenprune code, and still equals a full
    recompute with its decisions."""
    import tokenprune.ftp.hooks as hooks_mod

    monkeypatch.setattr(hooks_mod, "reads_are_free", lambda device: False)
    model = _llama()
    with torch.no_grad(), attach_ftp(model, _rank_router(), schedule=[0.0, 0.4, 0.5, 0.3]) as handle:
        m = handle.model
        out = m(_ids(2, 12, seed=5), use_cache=True)
        cache, nxt = _out_cache(out), out.logits[:, -1:].argmax(-1)
        spy = _ReadBackSpy()
        with spy:
            for _ in range(3):
                out = m(nxt, use_cache=True, **_cache_kw(m, cache))
                cache, nxt = _out_cache(out), out.logits[:, -1:].argmax(-1)
        assert spy.hits == []
        st = get_handle(m).stats  # the one read
    assert st.extras["decode"]["tokens"] == 2 * 3
    # blended decode on the "GPU" path is exact too
    _greedy_replay_check(model, _rank_router(), [0.0, 0.4, 0.5, 0.3], _ids(2, 11, seed=6))


def test_cache_row_selection_moves_kv_and_routing_state_together():
    model = _llama()
    ids = torch.cat([_ids(1, 9, seed=7), _ids(1, 9, seed=8)])
    with torch.no_grad(), attach_ftp(model, TokenRouter(), keep=0.6) as handle:
        m = handle.model
        cache = _out_cache(m(ids, use_cache=True))
    lay = cache.layers[2]
    keys, slots, score = lay.keys.clone(), lay.slots.clone(), cache.score.clone()
    cache.batch_repeat_interleave(2)  # rows 0, 0, 1, 1
    cache.batch_select_indices(torch.tensor([1, 2]))  # rows 0, 1
    assert torch.equal(lay.keys, keys) and torch.equal(lay.slots, slots) and torch.equal(cache.score, score)
    cache.reorder_cache(torch.tensor([1, 1]))
    assert torch.equal(lay.keys[0], keys[1]) and torch.equal(lay.slots[0], slots[1])
    assert torch.equal(cache.score[0], score[1]) and cache.get_seq_length() == 9
    with pytest.raises(NotImplementedError, match="crop"):
        cache.crop(-1)


def _manual_greedy(model, ids, cache, steps, with_mask):
    """The plain decode loop: the caller passes its own ``cache`` at every call (prefill, then one token)."""
    cur, am, toks = ids, torch.ones_like(ids), []
    for _ in range(steps):
        kw = _cache_kw(model, cache) | ({"attention_mask": am} if with_mask else {})
        nxt = model(input_ids=cur, use_cache=True, **kw).logits[:, -1].argmax(-1, keepdim=True)
        toks.append(int(nxt))
        cur, am = nxt, torch.cat([am, torch.ones_like(nxt)], 1)
    return toks


@pytest.mark.parametrize("with_mask", [False, True], ids=["no_mask", "mask"])
@pytest.mark.parametrize("router", [StaticRouter(), RandomRouter(5)], ids=["static", "random"])
def test_manual_loop_with_callers_dynamic_cache_equals_generate(router, with_mask):
    """Issue 22: a loop passing its own DynamicCache gave other tokens than generate (or raised on the mask)."""
    from transformers import DynamicCache

    model, ids, steps = _llama(), _ids(1, 20, seed=4), 8
    with torch.no_grad(), attach_ftp(model, router, keep=0.7) as handle:
        m = handle.model
        ref = m.generate(ids, max_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 20:]
        cache = DynamicCache()
        assert _manual_greedy(m, ids, cache, steps, with_mask) == ref.tolist()
        # the caller's cache holds the sequence (FTP's compact layers), not an empty dense cache
        assert cache.get_seq_length() == 20 + steps - 1
        dense_bytes = 4 * 2 * 2 * 16 * (20 + steps - 1) * 4  # layers, K/V, kv heads, head dim, slots, fp32
        assert 0 < cache_nbytes(cache) < dense_bytes
        cache.reset()  # a reset cache starts a new sequence
        assert _manual_greedy(m, ids, cache, steps, with_mask) == ref.tolist()


def test_manual_loop_with_callers_other_cache_is_refused():
    """A cache FTP cannot fill (StaticCache) is refused for a continuation; generate with it still works."""
    from transformers import StaticCache

    model, ids = _llama(), _ids(1, 20, seed=4)
    kw = {"do_sample": False, "eos_token_id": None, "pad_token_id": 0, "max_new_tokens": 5}
    with torch.no_grad(), attach_ftp(model, StaticRouter(), keep=0.7) as handle:
        m = handle.model
        ref = m.generate(ids, **kw)
        for _ in range(2):  # generate reuses its static cache object across calls
            assert torch.equal(m.generate(ids, cache_implementation="static", **kw), ref)
        cache = StaticCache(config=model.config, max_cache_len=64)
        out = m(input_ids=ids, use_cache=True, **_cache_kw(m, cache))
        nxt = out.logits[:, -1:].argmax(-1)
        for mask in (None, torch.ones(1, 21, dtype=torch.long)):
            with pytest.raises(ValueError, match="StaticCache was passed to an FTP prefill.*out.past_key_values"):
                m(input_ids=nxt, use_cache=True, attention_mask=mask, **_cache_kw(m, cache))
        # the returned cache continues the sequence
        out2 = m(input_ids=nxt, use_cache=True, **_cache_kw(m, _out_cache(out)))
        assert _out_cache(out2).get_seq_length() == 21
