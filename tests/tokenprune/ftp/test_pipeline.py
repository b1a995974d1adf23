"""FTP trainer (tiny model), the ftp_generate pipeline (tiny model saved to a folder), the keep-first
budget (fractions or int counts, one converter, one validation) and the attach handle protocol."""

import json
import warnings

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from prunecore.budget import check_keep, keep_count
from tokenprune.ftp import FTPHandle, RandomRouter, StaticRouter, TokenRouter, attach_ftp, get_handle, keep_topk
from tokenprune.ftp.schedule import search_schedule, uniform_schedule
from tokenprune.ftp.train import calibration_fitness, calibration_windows, continuation_eval, lm_eval, train_router
from tokenprune.generation import Generation
from tokenprune.stats import TokenStats


def _tiny(layers=4):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


def test_train_router_learns_and_roundtrips(tmp_path):
    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(3, 64, (3000,), generator=torch.Generator().manual_seed(0))
    batches = calibration_windows(ids, 24, 8, seed=0)
    router = TokenRouter()
    w0 = [p.detach().clone() for p in router.parameters()]
    hist = train_router(
        model,
        router,
        [[0.9, 0.7, 0.6, 0.8], [0.8, 0.6, 0.5, 0.7]],  # keep fractions, positional
        batches,
        steps=30,
        lr=5e-3,
        progress=False,
        log_every=1,
        guide_start=2.0,
    )
    assert len(hist) == 30
    assert all(np.isfinite(h["loss"]) for h in hist)
    assert hist[-1]["guide_weight"] == pytest.approx(0.0)
    # the router moved toward the static decisions, the LLM did not move
    assert np.mean([h["guide"] for h in hist[-5:]]) < np.mean([h["guide"] for h in hist[:5]])
    assert any(not torch.equal(a, b) for a, b in zip(w0, router.parameters()))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert get_handle(model) is None and all(p.requires_grad for p in model.parameters())
    path = router.save(tmp_path / "r.safetensors", extra={"schedules": {"0.30": [0.3] * 4}})
    r2 = TokenRouter.load(path)
    x = batches[:2]
    with torch.no_grad():
        with attach_ftp(model, router, schedule=0.3):
            a = model(x).logits
        with attach_ftp(model, r2, schedule=0.3):
            b = model(x).logits
    assert torch.equal(a, b)
    with pytest.raises(TypeError):
        train_router(model, StaticRouter(), schedules=[0.1] * 4, batches=batches, steps=1, progress=False)


def test_ga_with_static_calibration_fitness():
    model = _tiny()
    ids = torch.randint(3, 64, (2000,), generator=torch.Generator().manual_seed(1))
    batches = calibration_windows(ids, 20, 4, seed=0)
    with attach_ftp(model, StaticRouter(), schedule=0.0):
        fit = calibration_fitness(model, batches)
        s1, h1 = search_schedule(fit, 4, target=0.3, population=6, generations=2, seed=0, progress=False)
        s2, h2 = search_schedule(fit, 4, target=0.3, population=6, generations=2, seed=0, progress=False)
        assert fit(s1) == h1[-1]["best"]
    assert np.array_equal(s1, s2) and s1.mean() == pytest.approx(0.3)
    assert h1[-1]["best"] <= h1[0]["best"]
    dense = lm_eval(model, batches)
    assert dense["ppl"] == pytest.approx(np.exp(dense["nll"]))


def test_continuation_fitness_equals_serving_eval():
    model = _tiny()
    ids = torch.randint(3, 64, (2000,), generator=torch.Generator().manual_seed(2))
    batches = calibration_windows(ids, 20, 5, seed=0)
    sched = [0.0, 0.4, 0.5, 0.3]
    with attach_ftp(model, StaticRouter(), schedule=0.0) as handle:
        m = handle.model
        fit = calibration_fitness(model, batches, n_ctx=14, batch_size=2)  # chunks of 2, 2, 1
        got = fit(np.array(sched))
        get_handle(m).set_schedule(schedule=sched)
        ref = continuation_eval(m, batches, 14)["nll"]
        all_pos = calibration_fitness(model, batches)(np.array(sched))
        with pytest.raises(ValueError, match="n_ctx"):
            calibration_fitness(model, batches, n_ctx=20)
    assert got == pytest.approx(ref, rel=1e-5)
    assert got != pytest.approx(all_pos, rel=1e-3)  # a different objective


def test_distill_tail_restricts_the_loss():
    model = _tiny()
    ids = torch.randint(3, 64, (2000,), generator=torch.Generator().manual_seed(3))
    batches = calibration_windows(ids, 24, 4, seed=0)
    runs = {}
    for tail in (None, 24, 4):
        router = TokenRouter()
        torch.manual_seed(0)
        hist = train_router(
            model,
            router,
            [0.7] * 4,
            batches,
            steps=2,
            progress=False,
            log_every=1,
            distill_tail=tail,
            guide_start=0.0,
            w_sparsity=0.0,
        )
        runs[tail] = hist[0]["distill"]
    # the whole window is the default; a shorter tail averages over fewer positions
    assert runs[24] == pytest.approx(runs[None], rel=1e-6)
    assert runs[4] != pytest.approx(runs[None], rel=1e-4)
    with pytest.raises(ValueError, match="distill_tail"):
        train_router(
            model, TokenRouter(), schedules=[0.3] * 4, batches=batches, steps=1, progress=False, distill_tail=25
        )


def _word_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, "<unk>": 3}
    for i, w in enumerate("the a cat dog sat on mat ran far away and then".split()):
        vocab[w] = 4 + i
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<unk>"
    )


def test_ftp_generate_pipeline(tmp_path):
    from pipelines.generate_llm import ftp_generate

    model = _tiny()
    tok = _word_tokenizer(tmp_path)
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    router = TokenRouter()
    rpath = router.save(tmp_path / "router.safetensors", extra={"schedules": {"0.30": [0.1, 0.4, 0.4, 0.3]}})
    prompts = ["the cat sat on the mat and then ran far away", "a dog ran"]
    res = ftp_generate(str(folder), prompts, router=str(rpath), schedule=0.3, max_new_tokens=5)
    assert len(res.texts) == 2 and res.sequences.shape[0] == 2
    pre = res.stats.extras["prefill"]
    assert res.stats.extras["target_per_block"] == [0.1, 0.4, 0.4, 0.3]
    assert pre["tokens"] == 11 + 3
    want = (11 - keep_count(11, 0.9) + 3 - keep_count(3, 0.9)) / 14
    assert pre["sparsity_per_block"][0] == pytest.approx(want)
    assert 0 < pre["flops_saved_frac"] < 1
    json.dumps(res.stats.as_dict())
    assert res.stats.method == "ftp" and res.stats.tokens_in == 4 * (14 + 2 * 4)  # 4 blocks, 2 rows x 4 fed steps
    assert res.stats.forward_passes == 5
    dense = ftp_generate(str(folder), prompts, router="static", schedule=0.0, max_new_tokens=5)
    assert dense.stats.extras["prefill"]["flops_saved_frac"] == 0.0
    with torch.no_grad():
        enc = tok(prompts[:1], return_tensors="pt")
        ref = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(dense.sequences[0, -5:], ref[0, -5:])
    # nested=True reaches attach_ftp: equal to a hand-attached nested random router
    sched = [0.1, 0.5, 0.3, 0.6]
    nres = ftp_generate(
        model, prompts[:1], tokenizer=tok, router="random", schedule=sched, max_new_tokens=4, nested=True
    )
    from tokenprune.ftp import RandomRouter

    with torch.no_grad(), attach_ftp(model, RandomRouter(0), schedule=sched, nested=True) as handle:
        m = handle.model
        enc = tok(prompts[:1], return_tensors="pt")
        ref = m.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(nres.sequences, ref)
    with pytest.raises(ValueError, match="schedule"):
        ftp_generate(model, "the cat", tokenizer=tok, router="static")
    with pytest.raises(ValueError, match="outside"):
        ftp_generate(model, "the cat", tokenizer=tok, router="static", schedule=1.5)


def test_training_forward_equals_inference_forward():
    model = _tiny()
    x = torch.randint(3, 64, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), attach_ftp(model, TokenRouter(), schedule=[0.2, 0.5, 0.3, 0.4]) as handle:
        m = handle.model
        h = get_handle(m)
        inf = m.model(input_ids=x).last_hidden_state
        h.state.training = True
        h.state.clear_train()
        tr = m.model(input_ids=x).last_hidden_state
        h.state.training = False
        assert all(p is not None for p in h.state.probs[1:])
    assert torch.allclose(inf, tr, atol=1e-5)


def test_continuation_eval_matches_full_forward_when_dense():
    from tokenprune.ftp.train import continuation_eval

    model = _tiny()
    x = torch.randint(3, 64, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(x).logits[:, 9:-1]
        want = torch.nn.functional.cross_entropy(full.reshape(-1, 64), x[:, 10:].reshape(-1)).item()
        dense = continuation_eval(model, x, 10)
        with attach_ftp(model, StaticRouter(), schedule=0.0):
            routed0 = continuation_eval(model, x, 10, dense_argmax=dense["argmax"])
        with attach_ftp(model, TokenRouter(), schedule=0.4):
            routed = continuation_eval(model, x, 10, dense_argmax=dense["argmax"])
    assert dense["nll"] == pytest.approx(want, rel=1e-4)
    assert routed0["agree"] == 1.0 and routed0["nll"] == pytest.approx(dense["nll"], rel=1e-6)
    assert routed["nll"] != pytest.approx(dense["nll"], rel=1e-6)
    assert dense["argmax"].shape == (2, 6)


def test_keep_alias_in_train_router_and_generate(tmp_path):
    model = _tiny()
    ids = torch.randint(3, 64, (2000,), generator=torch.Generator().manual_seed(5))
    batches = calibration_windows(ids, 16, 4, seed=0)
    runs = []
    for kw in ({"keep": [0.9, 0.7, 0.6, 0.8]}, {"schedules": [0.1, 0.3, 0.4, 0.2]}):
        torch.manual_seed(0)
        router = TokenRouter()
        runs.append(train_router(model, router, batches=batches, steps=2, progress=False, log_every=1, **kw))
    assert [h["loss"] for h in runs[0]] == pytest.approx([h["loss"] for h in runs[1]], rel=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        train_router(
            model, TokenRouter(), schedules=[0.1] * 4, batches=batches, keep=[0.9] * 4, steps=1, progress=False
        )
    from pipelines.generate_llm import ftp_generate

    tok = _word_tokenizer(tmp_path)
    a = ftp_generate(model, "the cat sat on the mat", tokenizer=tok, keep=0.6, max_new_tokens=4)
    b = ftp_generate(model, "the cat sat on the mat", tokenizer=tok, schedule=0.4, max_new_tokens=4)
    assert torch.equal(a.sequences, b.sequences) and a.stats.extras["keep_per_block"] == pytest.approx([0.6] * 4)
    with pytest.raises(ValueError, match="not both"):
        ftp_generate(model, "the cat", tokenizer=tok, keep=0.6, schedule=0.4)


def test_ftp_generate_beams_and_return_sequences(tmp_path):
    from pipelines.generate_llm import ftp_generate

    model, tok = _tiny(), _word_tokenizer(tmp_path)
    prompts = ["the cat sat on the mat and then ran far away", "a dog ran"]
    for kw in (
        {"num_beams": 2},
        {"num_beams": 2, "num_return_sequences": 2},
        {"num_return_sequences": 2, "do_sample": True},
    ):
        res = ftp_generate(model, prompts, tokenizer=tok, router=TokenRouter(), keep=0.7, max_new_tokens=4, **kw)
        n = 2 * kw.get("num_return_sequences", 1)
        assert res.sequences.shape[0] == n and len(res.texts) == n
        rows = 2 * max(kw.get("num_beams", 1), kw.get("num_return_sequences", 1))  # rows generate ran
        assert res.stats.extras["prefill"]["tokens"] == rows // 2 * (11 + 3)
        assert 0 < res.stats.extras["prefill"]["flops_saved_frac"] < 1


def test_decode_stats_stop_at_eos(tmp_path):
    from pipelines.generate_llm import ftp_generate

    model, tok = _tiny(), _word_tokenizer(tmp_path)
    prompts = ["the cat sat on the mat and then ran far away", "a dog ran"]
    n_new = 6
    free = ftp_generate(model, prompts, tokenizer=tok, router="static", keep=0.7, max_new_tokens=n_new)
    assert free.stats.extras["decode"]["tokens"] == 2 * (n_new - 1)  # the last token is never fed
    gen = free.sequences[:, -n_new:]
    # an end-of-sequence id that row 0 generates at step 2 and row 1 never does
    eos = int(gen[0, 1])
    assert eos not in gen[1].tolist() and eos not in gen[0, :1].tolist()
    res = ftp_generate(model, prompts, tokenizer=tok, router="static", keep=0.7, max_new_tokens=n_new, eos_token_id=eos)
    assert torch.equal(res.sequences[1], free.sequences[1]) and int(res.sequences[0, -n_new + 1]) == eos
    # row 0 fed one generated token before its EOS, row 1 fed n_new - 1; padding after EOS is not counted
    assert res.stats.extras["decode"]["tokens"] == 1 + (n_new - 1)
    assert res.stats.extras["prefill"] == free.stats.extras["prefill"]
    assert res.stats.forward_passes == free.stats.forward_passes == n_new


def _ids(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 64, (B, T), generator=torch.Generator().manual_seed(seed))


def _routed_counts(model, budget, x, mask=None) -> list[torch.Tensor]:
    """Per layer, the tokens each row computed in one prefill under ``budget`` (keep)."""
    with torch.no_grad(), attach_ftp(model, StaticRouter(), budget) as h, h.recording():
        h.model(x, attention_mask=mask)
        return [d.sum(1) for d in h.decisions()]


def test_uniform_schedule_passes_to_attach_ftp_without_inverting_the_budget():
    model, x = _tiny(), _ids(2, 15)
    with pytest.deprecated_call(match="keep=1 - target"):
        sched = uniform_schedule(4, target=0.3)  # a sparsity in, keep fractions out
    assert np.allclose(sched, 0.7)
    got = _routed_counts(model, sched, x)
    assert all((c == keep_count(15, 0.7)).all() for c in got)  # 10 of 15, not 4 (the inverted 0.3)
    with torch.no_grad():
        with attach_ftp(model, StaticRouter(), sched) as h:
            a = h.model(x).logits
        with attach_ftp(model, StaticRouter(), schedule=0.3) as h:
            b = h.model(x).logits
    assert torch.equal(a, b)
    assert np.array_equal(uniform_schedule(4, 0.7), sched)


def test_int_count_keeps_at_most_k_tokens_of_each_row():
    model, x = _tiny(), _ids(2, 12, seed=1)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :9] = 0  # row 1: 3 valid tokens (left padding)
    got = _routed_counts(model, [5, 0.5, 12, 2], x, mask)
    assert [c.tolist() for c in got] == [[5, 3], [6, 2], [12, 3], [2, 2]]
    # a count covering every row computes every token: the model's own layer calls, same logits
    with torch.no_grad():
        dense = model(x).logits
        with attach_ftp(model, StaticRouter(), 12) as h:
            assert torch.equal(h.model(x).logits, dense)
    k = keep_topk(torch.rand(2, 12), mask.bool(), 4)
    assert k.sum(1).tolist() == [4, 3] and not k[1, :9].any()


def test_int_count_generates_with_a_learned_router(tmp_path):
    model, tok = _tiny(), _word_tokenizer(tmp_path)
    from pipelines.generate_llm import ftp_generate

    res = ftp_generate(model, ["the cat sat on the mat and then", "a dog"], tokenizer=tok, router=TokenRouter(), keep=3)
    assert res.stats.extras["keep_per_block"] == [3] * 4 and res.stats.extras["target_per_block"] == [None] * 4
    pre = res.stats.extras["prefill"]["tokens_kept_per_block"]
    assert pre == [3 + 2] * 4  # min(3, 8) + min(3, 2) per block
    with torch.no_grad(), attach_ftp(model, RandomRouter(1), [2, 4, 1, 3]) as h:
        out = h.model.generate(_ids(1, 6), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 10)


@pytest.mark.parametrize("bad", [1.5, 0.0, -1, True, "half", float("nan")])
def test_bad_keep_gives_the_check_keep_error(bad):
    model = _tiny()
    with pytest.raises((TypeError, ValueError)) as want:
        check_keep(bad)
    for call in (
        lambda: attach_ftp(model, StaticRouter(), bad),
        lambda: attach_ftp(model, StaticRouter(), [1.0, bad, 1.0, 1.0]),
        lambda: keep_topk(torch.rand(1, 4), torch.ones(1, 4, dtype=torch.bool), bad),
        lambda: uniform_schedule(4, bad),
    ):
        with pytest.raises(want.type) as got:
            call()
        assert str(got.value) == str(want.value)
    assert get_handle(model) is None


def test_handle_is_the_context_value_with_a_stats_property():
    model, x = _tiny(), _ids(1, 9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new spelling warns about nothing
        with torch.no_grad(), attach_ftp(model, StaticRouter(), 0.5) as h:
            assert isinstance(h, FTPHandle) and h.model is model and get_handle(model) is h
            h.model(x)
            st = h.stats
    assert type(st).__mro__[1] is TokenStats and st.forward_passes == 1 and st.tokens_in == 4 * 9
    assert st.tokens_kept == 4 * keep_count(9, 0.5)
    with pytest.deprecated_call(match=r"handle\.stats instead of handle\.stats\(\)"):
        assert st() is st
    assert get_handle(model) is None and all(type(m).__name__ == "LlamaDecoderLayer" for m in model.model.layers)


def test_handle_used_as_the_model_forwards_with_a_warning():
    model, x = _tiny(), _ids(1, 7)
    with torch.no_grad():
        ref = model(x).logits
        with attach_ftp(model, StaticRouter(), 1.0) as m:
            with pytest.deprecated_call(match=r"handle\.model\.__call__"):
                out = m(x).logits
            with pytest.deprecated_call(match=r"handle\.model\.config"):
                assert m.config is model.config
            with pytest.deprecated_call(match=r"handle\.model\.generate"):
                m.generate(x, max_new_tokens=2, do_sample=False, pad_token_id=0)
            assert get_handle(m) is m
    assert torch.equal(out, ref)
    with pytest.raises(AttributeError):
        FTPHandle.__new__(FTPHandle).anything  # no model yet: no forwarding, no recursion


def test_ftp_generate_returns_a_generation_and_the_old_type_warns(tmp_path):
    model, tok = _tiny(), _word_tokenizer(tmp_path)
    from pipelines import generate_llm

    prompts = ["the cat sat on the mat", "a dog ran"]
    res = generate_llm.ftp_generate(model, prompts, tokenizer=tok, keep=0.6, max_new_tokens=3)
    assert isinstance(res, Generation) and type(res.stats) is TokenStats
    assert res.prompt_length == 6 and res.sequences.shape == (2, 9)
    assert res.texts == tok.batch_decode(res.generated, skip_special_tokens=True)
    assert res.stats.forward_passes == 3  # one forward pass of the routed model per generation step
    P = res.prompt_length
    assert res.sequences[1, P - 3 : P].tolist() == tok("a dog ran")["input_ids"]  # left-padded prompt first
    with pytest.deprecated_call(match="tokenprune.Generation"):
        old = generate_llm.FTPGenerateResult
    with pytest.deprecated_call(match="tokenprune.Generation"):
        legacy = old(res.texts, res.sequences, res.stats)
    assert isinstance(legacy, Generation) and legacy.texts == res.texts and legacy.stats is res.stats


def test_router_file_schedules_keyed_by_sparsity_match_a_keep_budget(tmp_path):
    from pipelines.generate_llm import ftp_generate

    model, tok = _tiny(), _word_tokenizer(tmp_path)
    stored = [0.1, 0.4, 0.4, 0.3]
    path = TokenRouter().save(tmp_path / "r.safetensors", extra={"schedules": {"0.30": stored}})
    res = ftp_generate(model, "the cat sat on the mat", tokenizer=tok, router=str(path), keep=0.7, max_new_tokens=2)
    assert res.stats.extras["target_per_block"] == stored
    assert res.stats.extras["keep_per_block"] == pytest.approx([0.9, 0.6, 0.6, 0.7])


def test_train_router_takes_keep_first_and_refuses_counts():
    from tokenprune.ftp.train import train_router

    model = _tiny()
    batches = _ids(4, 12, seed=2)
    hist = train_router(model, TokenRouter(), [0.7] * 4, batches, steps=1, progress=False)
    assert len(hist) == 1 and np.isfinite(hist[0]["loss"])
    with pytest.raises(TypeError, match="count 3"):
        train_router(model, TokenRouter(), [3] * 4, batches, steps=1, progress=False)
    assert get_handle(model) is None
