"""The generate loop: deterministic toy model, tiny transformers model, testbed model, pipeline."""

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.helpers.localleap_refs import ref_eb, ref_fast, ref_localleap, ref_topk
from tokenprune import Generation, localleap_generate
from tokenprune.localleap.generate import DecodeResult
from tokenprune.localleap.rules import llada_schedule

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
import dllm_testbed as tb  # noqa: E402

torch.set_num_threads(1)

V = 6  # tokens 0..3 content, 4 = eos, 5 = mask
EOS, MASK = 4, 5
LEVELS = [0.3, 0.6, 0.8, 0.97]  # away from 0.75 / 0.9 so float rounding cannot flip a rule


@dataclass
class Out:
    logits: torch.Tensor
    past_key_values: tuple | None = None


class PositionalToy(torch.nn.Module):
    """Logits are a fixed function of the absolute position: token ``p % 4`` with confidence
    ``conf[p]``; the mask token is never proposed. Records every canvas it is called on."""

    def __init__(self, conf, eos_from=None):
        super().__init__()
        self.conf = torch.as_tensor(conf, dtype=torch.float64)
        self.eos_from = eos_from
        self.calls = []
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def table(self, T0, T):
        pos = torch.arange(T0, T0 + T)
        c = self.conf[pos]
        target = pos % 4
        if self.eos_from is not None:
            target = torch.where(pos >= self.eos_from, torch.full_like(target, EOS), target)
        other = ((1 - c) / (V - 2)).log()
        logits = other.unsqueeze(-1).repeat(1, V)
        logits[torch.arange(T), target] = c.log()
        logits[:, MASK] = -1e9
        return logits.float()

    def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=False):
        B, T = input_ids.shape
        past = past_key_values[0][0].shape[2] if past_key_values else 0
        self.calls.append((past, input_ids.clone()))
        logits = self.table(past, T).unsqueeze(0).expand(B, T, V).clone()
        cache = None
        if use_cache:
            k = torch.zeros(B, 1, past + T, 1)
            cache = ((k, k.clone()),)
        return Out(logits, cache)


def simulate(conf_block, rule, steps_per_block=None):
    """Brute-force passes for one block with fixed confidences (list of floats)."""
    L = len(conf_block)
    masked = [True] * L
    passes = 0
    step = 0
    sched = llada_schedule(L, steps_per_block)[0].tolist() if rule == "llada" else None
    while any(masked):
        if rule == "llada":
            while sched[step] == 0:
                step += 1
            commit = ref_topk([conf_block], [masked], sched[step])[0]
            step += 1
        elif rule == "fastdllm":
            commit = ref_fast([conf_block], [masked], 0.9)[0]
        elif rule == "localleap":
            commit = ref_localleap([conf_block], [masked], 0.9, 0.75, 4)[0]
        else:
            raise AssertionError(rule)
        passes += 1
        masked = [m and not c for m, c in zip(masked, commit)]
    return passes


def _toy(P, gen, seed):
    g = torch.Generator().manual_seed(seed)
    lv = torch.tensor(LEVELS, dtype=torch.float64)
    return PositionalToy(lv[torch.randint(len(lv), (P + gen,), generator=g)])


@pytest.mark.parametrize("rule", ["localleap", "fastdllm", "llada"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nfe_is_what_the_rule_implies(rule, seed):
    P, gen, blk = 5, 32, 8
    model = _toy(P, gen, seed)
    prompt = torch.zeros(2, P, dtype=torch.long)
    steps = 16 if (rule == "llada" and seed == 1) else None
    res = localleap_generate(model, prompt, gen_length=gen, block_length=blk, mask_id=MASK, rule=rule, steps=steps)
    spb = (steps or gen) // (gen // blk)
    expect = [simulate(model.conf[P + b * blk : P + (b + 1) * blk].tolist(), rule, spb) for b in range(gen // blk)]
    assert res.block_nfe == expect
    assert res.nfe == sum(expect) == len(model.calls)
    assert res.row_nfe.tolist() == [res.nfe, res.nfe]
    assert res.tokens_per_forward == pytest.approx(gen / res.nfe)
    # the canvas holds the model's argmax everywhere in the generated part
    assert torch.equal(res.generated, (torch.arange(P, P + gen) % 4).expand(2, gen))
    ids, nfe = res  # DESIGN contract: (ids, nfe)
    assert ids is res.ids and nfe == res.nfe
    st = res.stats  # the one TokenStats of the token methods
    assert (st.method, st.tokens_in, st.tokens_kept, st.forward_passes) == ("localleap", 2 * gen, 2 * gen, res.nfe)
    assert st.extras["row_nfe"] == 2 * res.nfe and st.extras["rule"] == rule
    if rule == "llada" and steps is None:
        assert res.nfe == gen  # one token per step


def test_eb_nfe_matches_bruteforce():
    P, gen, blk = 3, 16, 8
    model = _toy(P, gen, 5)
    res = localleap_generate(
        model, torch.zeros(1, P, dtype=torch.long), gen_length=gen, block_length=blk, mask_id=MASK, rule="eb", gamma=0.5
    )
    logp = torch.log_softmax(model.table(0, P + gen).double(), -1)
    ent = -(logp.exp() * logp).sum(-1)
    expect = []
    for b in range(gen // blk):
        sl = slice(P + b * blk, P + (b + 1) * blk)
        c, h = model.conf[sl].tolist(), ent[sl].tolist()
        masked, passes = [True] * blk, 0
        while any(masked):
            commit = ref_eb([c], [masked], [h], 0.5)[0]
            masked = [m and not x for m, x in zip(masked, commit)]
            passes += 1
        expect.append(passes)
    assert res.block_nfe == expect


def test_blocks_left_to_right_and_nothing_after_current_block():
    P, gen, blk = 4, 24, 8
    model = _toy(P, gen, 3)
    localleap_generate(
        model, torch.zeros(1, P, dtype=torch.long), gen_length=gen, block_length=blk, mask_id=MASK, rule="localleap"
    )
    prev_block = 0
    for _, canvas in model.calls:
        m = (canvas[0, P:] == MASK).view(-1, blk)
        cur = int(m.any(-1).long().argmax())  # first block with a mask
        assert not m[:cur].any()  # earlier blocks complete
        assert m[cur + 1 :].all()  # later blocks untouched
        assert cur >= prev_block  # never goes back
        prev_block = cur


def test_temperature_zero_deterministic_and_gumbel_seeded():
    model = tb.TestbedDLLM(tb.TestbedConfig(d_model=32, n_layers=1, n_heads=2))
    prompt = torch.randint(0, 12, (3, 6), generator=torch.Generator().manual_seed(0))
    kw = dict(gen_length=16, block_length=8, mask_id=model.config.mask_token_id)
    a = localleap_generate(model, prompt, **kw)
    b = localleap_generate(model, prompt, **kw)
    assert torch.equal(a.ids, b.ids) and a.nfe == b.nfe
    s1 = localleap_generate(model, prompt, temperature=1.0, generator=torch.Generator().manual_seed(1), **kw)
    s2 = localleap_generate(model, prompt, temperature=1.0, generator=torch.Generator().manual_seed(1), **kw)
    s3 = localleap_generate(model, prompt, temperature=1.0, generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(s1.ids, s2.ids)
    assert not torch.equal(s1.ids, s3.ids)  # random model: sampling differs by seed
    for r in (a, s1, s3):
        assert not (r.generated == model.config.mask_token_id).any()


@pytest.mark.parametrize("rule", ["localleap", "llada", "eb"])
def test_rule_options_object_equals_the_keywords(rule):
    from tokenprune.localleap import RuleOptions

    model = tb.TestbedDLLM(tb.TestbedConfig(d_model=32, n_layers=1, n_heads=2))
    prompt = torch.randint(0, 12, (2, 6), generator=torch.Generator().manual_seed(3))
    kw = dict(gen_length=16, block_length=8, mask_id=model.config.mask_token_id, rule=rule)
    values = dict(threshold=0.6, relaxed_threshold=0.3, radius=2, gamma=0.5, steps=8)
    by_keywords = localleap_generate(model, prompt, **values, **kw)
    by_object = localleap_generate(model, prompt, rule_options=RuleOptions(**values), **kw)
    mixed = localleap_generate(model, prompt, rule_options=RuleOptions(**dict(values, radius=9)), radius=2, **kw)
    for res in (by_object, mixed):
        assert torch.equal(res.ids, by_keywords.ids) and res.block_nfe == by_keywords.block_nfe
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['treshold'\].*threshold"):
        localleap_generate(model, prompt, treshold=0.5, **kw)
    with pytest.raises(ValueError, match="relaxed_threshold must be <= threshold"):
        localleap_generate(model, prompt, rule_options=RuleOptions(threshold=0.5), **dict(kw, rule="localleap"))


def test_prefix_cache_matches_full_passes_on_position_model():
    P, gen, blk = 5, 24, 8
    m1, m2 = _toy(P, gen, 4), _toy(P, gen, 4)
    kw = dict(gen_length=gen, block_length=blk, mask_id=MASK, rule="localleap")
    a = localleap_generate(m1, torch.zeros(1, P, dtype=torch.long), **kw)
    b = localleap_generate(m2, torch.zeros(1, P, dtype=torch.long), use_cache=True, **kw)
    assert torch.equal(a.ids, b.ids) and a.block_nfe == b.block_nfe
    # with the cache, only block starts see the whole canvas; other passes feed from the block
    starts = [P + i * blk for i in range(gen // blk)]
    for past, canvas in m2.calls:
        assert past == 0 and canvas.shape[1] == P + gen or past in starts and canvas.shape[1] == P + gen - past


def test_prefix_cache_on_testbed_model_runs():
    model = tb.TestbedDLLM(tb.TestbedConfig(d_model=32, n_layers=2, n_heads=2))
    prompt = torch.randint(0, 12, (2, 7), generator=torch.Generator().manual_seed(0))
    res = localleap_generate(
        model,
        prompt,
        gen_length=16,
        block_length=8,
        mask_id=model.config.mask_token_id,
        use_cache=True,
        rule="fastdllm",
    )
    assert not (res.generated == model.config.mask_token_id).any()
    assert torch.equal(res.ids[:, :7], prompt)


def test_early_stop_fills_eos_without_more_passes():
    P, gen, blk = 4, 32, 8
    conf = torch.full((P + gen,), 0.97, dtype=torch.float64)
    model = PositionalToy(conf, eos_from=P + 10)
    res = localleap_generate(
        model,
        torch.zeros(1, P, dtype=torch.long),
        gen_length=gen,
        block_length=blk,
        mask_id=MASK,
        eos_id=EOS,
        early_stop=True,
    )
    assert res.block_nfe == [1, 1, 0, 0]
    assert (res.generated[0, 10:] == EOS).all()
    full = localleap_generate(
        model, torch.zeros(1, P, dtype=torch.long), gen_length=gen, block_length=blk, mask_id=MASK, eos_id=EOS
    )
    assert full.block_nfe == [1, 1, 1, 1] and torch.equal(full.ids, res.ids)


def test_shift_logits_dream_convention():
    P, gen = 3, 8
    model = _toy(P, gen, 2)
    res = localleap_generate(
        model, torch.zeros(1, P, dtype=torch.long), gen_length=gen, block_length=8, mask_id=MASK, shift_logits=True
    )
    # position p takes the proposal made at p - 1: token (p - 1) % 4
    assert res.generated[0].tolist() == [(p - 1) % 4 for p in range(P, P + gen)]
    # shifted logits with the prefix cache: the fed window starts one position before the block
    blocks = localleap_generate(
        model, torch.zeros(1, P, dtype=torch.long), gen_length=gen, block_length=4, mask_id=MASK, shift_logits=True
    )
    model.calls.clear()
    cached = localleap_generate(
        model,
        torch.zeros(1, P, dtype=torch.long),
        gen_length=gen,
        block_length=4,
        mask_id=MASK,
        shift_logits=True,
        use_cache=True,
    )
    assert torch.equal(cached.ids, blocks.ids) and cached.nfe == blocks.nfe
    assert all(past in (0, P - 1, P + 3) for past, _ in model.calls)


def test_left_padding_equals_single_runs():
    torch.manual_seed(0)
    model = tb.TestbedDLLM(tb.TestbedConfig(d_model=32, n_layers=2, n_heads=2)).eval()
    prompts = [[13, 1, 2, 3, 4, 5, 10], [13, 7, 11], [13, 9, 9, 9, 10]]
    kw = dict(gen_length=16, block_length=8, mask_id=model.config.mask_token_id, rule="llada")
    batch = localleap_generate(model, prompts, pad_id=15, **kw)
    assert batch.ids.shape == (3, 7 + 16)
    assert batch.ids[1, :4].tolist() == [15] * 4  # left padded
    for i, p in enumerate(prompts):
        single = localleap_generate(model, torch.tensor([p]), **kw)
        assert torch.equal(single.generated[0], batch.generated[i])


def test_tiny_transformers_bert_bidirectional():
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    model = BertForMaskedLM(cfg).eval()
    prompt = torch.randint(5, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    mask_id = 4
    outs = {}
    for rule in ("llada", "fastdllm", "localleap", "eb"):
        res = localleap_generate(
            model,
            prompt,
            gen_length=16,
            block_length=8,
            mask_id=mask_id,
            rule=rule,
            attention_mask=torch.ones_like(prompt),
        )
        assert res.ids.shape == (2, 22)
        assert not (res.generated == mask_id).any()
        assert torch.equal(res.ids[:, :6], prompt)
        assert 2 <= res.nfe <= 16
        outs[rule] = res
    assert outs["llada"].nfe == 16
    # rows are independent: each row alone decodes the same
    for i in range(2):
        single = localleap_generate(
            model, prompt[i : i + 1], gen_length=16, block_length=8, mask_id=mask_id, rule="localleap"
        )
        assert torch.equal(single.generated[0], outs["localleap"].generated[i])
    # ragged prompts: left padding + position_ids = cumsum(mask) - 1 give each row its lone result
    prompts = [[7, 8, 9, 10, 11, 12, 13], [20, 21]]
    batch = localleap_generate(model, prompts, gen_length=16, block_length=8, mask_id=mask_id, pad_id=0)
    for i, p in enumerate(prompts):
        alone = localleap_generate(model, torch.tensor([p]), gen_length=16, block_length=8, mask_id=mask_id)
        assert torch.equal(alone.generated[0], batch.generated[i])


def test_custom_rule_and_errors():
    P = 3
    model = _toy(P, 8, 0)
    prompt = torch.zeros(1, P, dtype=torch.long)
    one = lambda conf, masked: torch.zeros_like(masked).scatter_(  # noqa: E731
        -1, conf.masked_fill(~masked, -1).argmax(-1, keepdim=True), True
    )
    res = localleap_generate(model, prompt, gen_length=8, block_length=4, mask_id=MASK, rule=one)
    assert res.nfe == 8
    with pytest.raises(ValueError, match="multiple"):
        localleap_generate(model, prompt, gen_length=10, block_length=4, mask_id=MASK)
    with pytest.raises(ValueError, match="mask_id"):
        localleap_generate(model, prompt, gen_length=8, block_length=4, mask_id=None)
    with pytest.raises(ValueError, match="unknown rule"):
        localleap_generate(model, prompt, gen_length=8, block_length=4, mask_id=MASK, rule="nope")
    with pytest.raises(RuntimeError, match="committed nothing"):
        localleap_generate(
            model, prompt, gen_length=8, block_length=4, mask_id=MASK, rule=lambda c, m: torch.zeros_like(m)
        )
    with pytest.raises(ValueError, match="early_stop"):
        localleap_generate(model, prompt, gen_length=8, block_length=4, mask_id=MASK, early_stop=True)
    bad = lambda input_ids, **kw: Out(torch.zeros(1, 2, V))  # noqa: E731
    with pytest.raises(ValueError, match="every canvas position"):
        localleap_generate(bad, prompt, gen_length=8, block_length=4, mask_id=MASK)
    assert isinstance(res, DecodeResult)


# ------------------------------------------------------------------ pipeline entry
def test_pipeline_dllm_generate_text_and_stats():
    from pipelines.generate_dllm import dllm_generate

    tok = tb.TestbedTokenizer()
    model = tb.TestbedDLLM(tb.TestbedConfig(d_model=32, n_layers=1, n_heads=2)).eval()
    out = dllm_generate(model, "12+34=", tokenizer=tok, gen_length=16, block_length=8)
    assert isinstance(out, Generation) and len(out.texts) == 1
    assert set(out.texts[0]) <= set(tb.CHARS)
    assert out.stats.extras["rule"] == "localleap" and out.stats.forward_passes == out.stats.extras["nfe"] >= 2
    P = len(tok.encode("12+34="))
    assert out.sequences.shape == (1, P + 16) and out.prompt_length == P and out.generated.shape == (1, 16)
    batch = dllm_generate(model, ["1+2=", "123+4="], tokenizer=tok, rule="llada", gen_length=16, block_length=8)
    assert len(batch.texts) == 2 and batch.stats.forward_passes == 16
    assert batch.stats.extras["nfe_per_row"] == [16, 16] and batch.stats.extras["block_nfe"] == [8, 8]


def test_pipeline_dllm_generate_deprecated_spellings():
    import pipelines.generate_dllm as gd

    tok = tb.TestbedTokenizer()
    model = tb.TestbedDLLM(tb.TestbedConfig(d_model=32, n_layers=1, n_heads=2)).eval()
    new = gd.dllm_generate(model, ["1+2=", "123+4="], tokenizer=tok, gen_length=16, block_length=8)
    with pytest.warns(DeprecationWarning, match="tokenizer=tokenizer"):
        old = gd.dllm_generate(model, tok, ["1+2=", "123+4="], gen_length=16, block_length=8)
    assert torch.equal(old.sequences, new.sequences) and old.texts == new.texts
    with pytest.warns(DeprecationWarning, match="result.texts"):
        assert old.text == new.texts  # a batch: the list
    single = gd.dllm_generate(model, "1+2=", tokenizer=tok, gen_length=16, block_length=8)
    with pytest.warns(DeprecationWarning, match="result.texts"):
        assert single.text == single.texts[0]  # one prompt: the str
    with pytest.warns(DeprecationWarning, match="result.generated"):
        assert torch.equal(old.ids, new.generated)
    with pytest.warns(DeprecationWarning, match="result.stats"):
        assert old.token_stats is old.stats
    with pytest.warns(DeprecationWarning, match=r"stats.extras\['nfe'\]"):
        assert old.stats["nfe"] == new.stats.forward_passes
    with pytest.warns(DeprecationWarning, match="nfe_per_row"):
        assert old.stats["row_nfe"] == new.stats.extras["nfe_per_row"]
    with pytest.warns(DeprecationWarning, match="tokenprune.Generation"):
        assert gd.DLLMGeneration is gd.DiffusionGeneration
    with pytest.raises(TypeError, match="two positional"):
        gd.dllm_generate(model, tok, "1+2=", "x")


def test_pipeline_mask_and_eos_resolution():
    from pipelines.generate_dllm import resolve_eos_id, resolve_mask_id

    class Cfg:
        mask_token_id = 7
        eos_token_id = [3, 4]

    class M:
        config = Cfg()

    class Tok:
        mask_token_id = None
        eos_token_id = None

    assert resolve_mask_id(M(), Tok()) == 7
    assert resolve_eos_id(M(), Tok()) == 3
    assert resolve_mask_id(M(), tb.TestbedTokenizer()) == tb.TestbedTokenizer().mask_token_id
    Cfg.mask_token_id = None
    with pytest.raises(ValueError, match="no mask token"):
        resolve_mask_id(M(), Tok())
    assert resolve_mask_id(M(), Tok(), mask_id=9) == 9
