"""Native LLaDA and Dream: loading the published layouts, padding, the generate loop against a
plain reference loop, sampling options and the Fast-dLLM caches (tiny random-weight folders)."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import tokenprune
from tests.helpers.dllm_folders import DREAM_CONFIG, LLADA_CONFIG, write_folder
from tests.helpers.localleap_refs import ref_eb, ref_fast, ref_localleap, ref_topk
from tokenprune.localleap.generate import localleap_generate
from tokenprune.localleap.models import DreamModel, LLaDAModelLM, load_dllm
from tokenprune.localleap.models.loading import read_safetensors
from tokenprune.localleap.rules import llada_schedule

torch.set_num_threads(1)
FAMILIES = ["llada", "dream"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dllm")
    return {fam: write_folder(root / fam, fam, seed=3) for fam in FAMILIES}


@pytest.fixture(scope="module")
def models(folders):
    return {fam: load_dllm(folders[fam])[0] for fam in FAMILIES}


# ------------------------------------------------------------------ reference forward (eager)
def ref_rms(x, w, eps):
    return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def ref_rope(x, pos, theta):
    """x (B, H, T, D) float64, pos (B, T): rotate pairs (i, i + D/2) by pos * theta^(-2i/D)."""
    D = x.shape[-1]
    i = torch.arange(D // 2, dtype=torch.float64)
    ang = pos.double()[:, None, :, None] * theta ** (-2 * i / D)
    a, b = x[..., : D // 2], x[..., D // 2 :]
    return torch.cat([a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin()], -1)


def ref_attention(q, k, v, key_mask):
    """Eager softmax attention, no causal mask; padding keys get -inf. (B, H, T, D)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return scores.softmax(-1) @ v


def ref_forward(family, folder, ids, mask=None):
    """Logits (B, T, V) in float64 read straight from the safetensors keys of ``folder``."""
    cfg = json.loads((folder / "config.json").read_text())
    W = {k: v.double() for k, v in read_safetensors(folder).items()}
    B, T = ids.shape
    mask = torch.ones(B, T, dtype=torch.bool) if mask is None else mask.bool()
    pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
    if family == "llada":
        L, H, Hkv, eps, theta = cfg["n_layers"], cfg["n_heads"], cfg["n_kv_heads"], cfg["rms_norm_eps"], 500000.0
        names = ("attn_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_norm", "ff_proj", "up_proj", "ff_out")
        prefix, x = "model.transformer.blocks.{}.", W["model.transformer.wte.weight"][ids]
    else:
        L, H, Hkv = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
        eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
        names = (
            "input_layernorm",
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "post_attention_layernorm",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
        prefix, x = "model.layers.{}.", W["model.embed_tokens.weight"][ids]

    def lin(name, h):
        out = h @ W[name + ".weight"].T
        return out + W[name + ".bias"] if name + ".bias" in W else out

    for n in range(L):
        an, q, k, v, o, mn, gate, up, down = (prefix.format(n) + name for name in names)
        h = ref_rms(x, W[an + ".weight"], eps)
        D = x.shape[-1] // H
        qh = lin(q, h).view(B, T, H, D).transpose(1, 2)
        kh = lin(k, h).view(B, T, Hkv, D).transpose(1, 2)
        vh = lin(v, h).view(B, T, Hkv, D).transpose(1, 2)
        att = ref_attention(ref_rope(qh, pos, theta), ref_rope(kh, pos, theta), vh, mask)
        x = x + lin(o, att.transpose(1, 2).reshape(B, T, H * D))
        h = ref_rms(x, W[mn + ".weight"], eps)
        g = lin(gate, h)
        x = x + lin(down, g * torch.sigmoid(g) * lin(up, h))
    if family == "llada":
        head = W["model.transformer.wte.weight" if cfg["weight_tying"] else "model.transformer.ff_out.weight"]
        return ref_rms(x, W["model.transformer.ln_f.weight"], eps) @ head.T
    return ref_rms(x, W["model.norm.weight"], eps) @ W["lm_head.weight"].T


# ------------------------------------------------------------------ loading
@pytest.mark.parametrize("family", FAMILIES)
def test_published_layout_loads_and_matches_reference_forward(family, folders, models):
    model = models[family]
    assert type(model) is {"llada": LLaDAModelLM, "dream": DreamModel}[family]
    cfg = (LLADA_CONFIG if family == "llada" else DREAM_CONFIG)["mask_token_id"]
    assert model.config.mask_token_id == cfg  # from the checkpoint's config
    assert model.shift_logits is (family == "dream")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 40, (3, 11), generator=g)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    mask[2, :7] = 0
    with torch.no_grad():
        for m in (None, mask):
            got = model(ids, attention_mask=m).logits
            want = ref_forward(family, folders[family], ids, m)
            assert got.dtype == torch.float32
            assert torch.allclose(got.double(), want, atol=1e-5, rtol=0), (got.double() - want).abs().max()


def test_top_level_load_dllm_ignores_auto_map(tmp_path):
    folder = write_folder(tmp_path / "m", "llada", seed=1, mask_token_id=42)
    (folder / "modeling_llada.py").write_text("raise RuntimeError('remote code executed')\n")
    (folder / "configuration_llada.py").write_text("raise RuntimeError('remote code executed')\n")
    model, tok = tokenprune.load_dllm(folder)
    assert model.config.mask_token_id == 42  # never guessed: the config says 42
    assert model.config.extra["auto_map"]["AutoModel"] == "modeling_llada.LLaDAModelLM"  # kept, not run
    assert tok.encode("w1 w2") == [1, 2]


def test_llada_variants_tied_head_and_grouped_kv(tmp_path):
    folder = write_folder(tmp_path / "t", "llada", seed=2, weight_tying=True, n_kv_heads=2, sharded=False)
    state = load_file(str(folder / "model.safetensors"))
    del state["model.transformer.ff_out.weight"]  # a tied checkpoint has no separate head
    save_file(state, str(folder / "model.safetensors"))
    model, _ = load_dllm(folder)
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits.double(), ref_forward("llada", folder, ids), atol=1e-5, rtol=0)


def test_load_errors(tmp_path):
    folder = write_folder(tmp_path / "d", "dream", seed=0)
    state = load_file(str(folder / "model.safetensors"))
    state["model.layers.0.self_attn.q_norm.weight"] = torch.ones(8)
    del state["lm_head.weight"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="missing keys.*lm_head.weight.*unexpected keys.*q_norm"):
        load_dllm(folder)
    cfg = {**LLADA_CONFIG, "model_type": "bert"}
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not a supported diffusion LLM"):
        load_dllm(tmp_path / "b")
    with pytest.raises(ValueError, match="alibi"):
        LLaDAModelLM.from_config({**LLADA_CONFIG, "alibi": True})
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_dllm(tmp_path / "nothing")


# ------------------------------------------------------------------ padding
@pytest.mark.parametrize("family", FAMILIES)
def test_ragged_batch_equals_each_prompt_alone(family, models):
    model = models[family]
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    kw = dict(gen_length=16, block_length=8, mask_id=model.config.mask_token_id, rule="localleap")
    batch = localleap_generate(model, prompts, pad_id=model.config.pad_token_id, **kw)
    assert batch.ids[1, :5].tolist() == [model.config.pad_token_id] * 5
    assert batch.tokens_per_forward > 1  # several tokens per pass somewhere
    for i, p in enumerate(prompts):
        alone = localleap_generate(model, torch.tensor([p]), **kw)
        assert torch.equal(alone.generated[0], batch.generated[i])
        assert alone.row_nfe.item() == batch.row_nfe[i].item()


# ------------------------------------------------------------------ generate vs a plain loop
def ref_filter(logits, top_p, top_k):
    """Nucleus then top-k on a (V,) row, written out plainly."""
    out = logits.clone()
    if top_p is not None:
        order = sorted(range(len(out)), key=lambda i: -float(out[i]))
        total, keep = 0.0, set()
        probs = torch.softmax(out, -1)
        for i in order:
            keep.add(i)
            total += float(probs[i])
            if total > top_p:
                break
        for i in range(len(out)):
            if i not in keep:
                out[i] = float("-inf")
    if top_k is not None:
        kth = sorted(out.tolist(), reverse=True)[top_k - 1]
        out[out < kth] = float("-inf")
    return out


def ref_generate(model, prompt, *, gen, blk, rule, steps=None, cfg_scale=0.0, remasking="low_confidence",
                 temperature=0.0, top_p=None, top_k=None, seed=0):  # fmt: skip
    """One full forward per pass; rules from the brute-force references; (ids, nfe)."""
    mask_id = model.config.mask_token_id
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([prompt, torch.full((1, gen), mask_id)], 1)
    P, nfe = prompt.shape[1], 0
    for b in range(gen // blk):
        s, e = P + b * blk, P + (b + 1) * blk
        sched = llada_schedule(blk, (steps or gen) // (gen // blk))[0].tolist() if rule == "llada" else None
        step = 0
        while (x[0, s:e] == mask_id).any():
            with torch.no_grad():
                logits = model(x).logits
                if cfg_scale:
                    un = x.clone()
                    un[:, :P] = mask_id
                    ul = model(un).logits
                    logits = ul + (cfg_scale + 1) * (logits - ul)
            nfe += 1
            if model.shift_logits:
                logits = torch.cat([logits[:, :1], logits[:, :-1]], 1)
            z = logits[0, s:e].float()
            z[:, mask_id] = float("-inf")
            if temperature and model.shift_logits:  # Dream: scale, filter, sample, confidence
                z = torch.stack([ref_filter(row / temperature, top_p, top_k) for row in z])
            probs = torch.softmax(z, -1)
            if temperature:
                u = torch.rand((1, blk, z.shape[-1]), dtype=torch.float64, generator=g)[0]
                x0 = (z.double() + -torch.log(-torch.log(u))).argmax(-1)
            else:
                x0 = probs.argmax(-1)
            conf = probs.gather(-1, x0[:, None])[:, 0]
            if remasking == "random":
                conf = torch.rand((1, blk), generator=g)[0]
            masked = (x[0, s:e] == mask_id).tolist()
            c, m = [conf.tolist()], [masked]
            if rule == "llada":
                while sched[step] == 0:
                    step += 1
                commit = ref_topk(c, m, sched[step])[0]
                step += 1
            elif rule == "fastdllm":
                commit = ref_fast(c, m, 0.9)[0]
            elif rule == "localleap":
                commit = ref_localleap(c, m, 0.9, 0.75, 4)[0]
            else:
                logp = torch.log_softmax(z, -1)
                h = (-(logp.exp() * logp).nan_to_num(0.0).sum(-1)).tolist()
                commit = ref_eb(c, m, [h], 0.5)[0]
            for j, ok in enumerate(commit):
                if ok:
                    x[0, s + j] = x0[j]
    return x, nfe


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rule", ["localleap", "fastdllm", "llada", "eb"])
def test_generate_equals_plain_reference_loop(family, rule, models):
    model = models[family]
    prompt = torch.tensor([[3, 9, 27, 1, 4]])
    kw = dict(gen=16, blk=8, rule=rule, steps=8 if rule == "llada" else None)
    want_ids, want_nfe = ref_generate(model, prompt, **kw)
    res = localleap_generate(
        model, prompt, gen_length=16, block_length=8, mask_id=model.config.mask_token_id, rule=rule,
        steps=kw["steps"], gamma=0.5,
    )  # fmt: skip
    assert torch.equal(res.ids, want_ids) and res.nfe == want_nfe
    if rule != "llada":
        assert res.nfe < 16  # the random model is confident enough to commit in parallel


def test_llada_cfg_and_random_remasking_equal_reference(models):
    model = models["llada"]
    prompt = torch.tensor([[3, 9, 27, 1, 4]])
    mid = model.config.mask_token_id
    for opts in ({"cfg_scale": 1.5}, {"remasking": "random", "seed": 7}):
        seed = opts.pop("seed", 0)
        want_ids, want_nfe = ref_generate(model, prompt, gen=16, blk=8, rule="llada", steps=8, seed=seed, **opts)
        res = localleap_generate(
            model, prompt, gen_length=16, block_length=8, mask_id=mid, rule="llada", steps=8,
            generator=torch.Generator().manual_seed(seed), **opts,
        )  # fmt: skip
        assert torch.equal(res.ids, want_ids) and res.nfe == want_nfe == 8
    plain = localleap_generate(model, prompt, gen_length=16, block_length=8, mask_id=mid, rule="llada", steps=8)
    guided = localleap_generate(
        model, prompt, gen_length=16, block_length=8, mask_id=mid, rule="llada", steps=8, cfg_scale=1.5
    )
    assert not torch.equal(plain.ids, guided.ids)  # guidance changes the answer of this model
    assert guided.stats.extras["positions_computed"] == 2 * plain.stats.extras["positions_computed"]
    with pytest.raises(ValueError, match="rule='llada'"):
        localleap_generate(model, prompt, gen_length=8, block_length=8, mask_id=mid, remasking="random")


@pytest.mark.parametrize("rule", ["localleap", "llada"])
def test_dream_top_p_top_k_temperature_equal_reference(rule, models):
    model = models["dream"]
    prompt = torch.tensor([[3, 9, 27, 1, 4]])
    opts = dict(temperature=0.7, top_p=0.9, top_k=5)
    want_ids, want_nfe = ref_generate(model, prompt, gen=16, blk=8, rule=rule, steps=16, seed=11, **opts)
    res = localleap_generate(
        model, prompt, gen_length=16, block_length=8, mask_id=model.config.mask_token_id, rule=rule, steps=16,
        generator=torch.Generator().manual_seed(11), **opts,
    )  # fmt: skip
    assert torch.equal(res.ids, want_ids) and res.nfe == want_nfe


# ------------------------------------------------------------------ caches
@pytest.mark.parametrize("family", FAMILIES)
def test_caches_exact_on_one_layer_model(family, tmp_path):
    """With one layer a position's keys/values depend on its own token only: the prefix does not
    change within a block and the suffix is all masks, so both caches must be exact."""
    layers = {"n_layers": 1} if family == "llada" else {"num_hidden_layers": 1}
    model, _ = load_dllm(write_folder(tmp_path / family, family, seed=5, **layers))
    prompts = [[5, 6, 7, 8, 9], [12, 13]]
    kw = dict(gen_length=24, block_length=8, mask_id=model.config.mask_token_id, pad_id=model.config.pad_token_id)
    for rule in ("localleap", "llada"):
        base = localleap_generate(model, prompts, rule=rule, **kw)
        for mode in ("prefix", "dual"):
            res = localleap_generate(model, prompts, rule=rule, use_cache=mode, **kw)
            assert torch.equal(res.ids, base.ids) and res.block_nfe == base.block_nfe, (rule, mode)
            assert res.stats.extras["cache"] == mode
            assert res.stats.extras["positions_computed"] < base.stats.extras["positions_computed"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_cached_pass_equals_full_pass_when_the_canvas_is_unchanged(family, mode, models):
    """Multi-layer: a cached pass reuses block-start keys/values; on the block-start canvas
    they are the true ones, so the window's logits equal the full pass (padding included)."""
    model = models[family]
    mid = model.config.mask_token_id
    x = torch.cat([torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]]), torch.full((2, 16), mid)], 1)
    am = torch.ones_like(x)
    am[0, :2] = 0
    s, e = 13, 21
    with torch.no_grad():
        full = model(x, attention_mask=am, use_cache=True)
        if mode == "prefix":
            cache = tuple((k[:, :, :s], v[:, :, :s]) for k, v in full.past_key_values)
            part = model(x[:, s:], attention_mask=am, past_key_values=cache).logits
            want = full.logits[:, s:]
        else:
            cache = tuple((k.clone(), v.clone()) for k, v in full.past_key_values)
            part = model(x[:, s:e], attention_mask=am, past_key_values=cache, replace_position=(s, e)).logits
            want = full.logits[:, s:e]
    assert torch.allclose(part, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_cached_generate_counts_nfe_and_work(family, mode, models):
    model = models[family]
    P, gen, blk = 5, 24, 8
    prompt = torch.tensor([[3, 9, 27, 1, 4], [8, 8, 2, 30, 7]])
    res = localleap_generate(
        model, prompt, gen_length=gen, block_length=blk, mask_id=model.config.mask_token_id, use_cache=mode
    )
    assert res.nfe == sum(res.block_nfe) == res.stats.forward_passes
    assert not (res.generated == model.config.mask_token_id).any()
    lead = 1 if model.shift_logits else 0
    T, fed = P + gen, 0
    for b, passes in enumerate(res.block_nfe):
        s = P + b * blk
        window = (T - s + lead) if mode == "prefix" else (blk + lead)
        fed += 2 * (T + (passes - 1) * window)  # block start: the full canvas; then the window
    assert res.stats.extras["positions_computed"] == fed


# ------------------------------------------------------------------ pipeline entry
@pytest.mark.parametrize("family", FAMILIES)
def test_dllm_generate_loads_a_folder_of_either_family(family, folders, models):
    from pipelines.generate import dllm_generate

    prompts = ["w1 w2 w3", "w7"] if family == "llada" else ["abc d", "e"]
    out = dllm_generate(str(folders[family]), prompts, gen_length=16, block_length=8, use_cache="dual")
    assert len(out.texts) == 2 and all(isinstance(t, str) for t in out.texts)
    extras = out.stats.extras
    assert extras["cache"] == "dual" and extras["nfe"] == out.stats.forward_passes
    assert extras["tokens_per_forward"] == pytest.approx(out.stats.tokens_kept / sum(extras["nfe_per_row"]))
    assert out.stats.tokens_in == 32 and out.generated.shape == (2, 16)
    # the same as the loop on the loaded model with the folder's tokenizer and ids from its config
    model, tok = load_dllm(folders[family])
    eos = model.config.eos_token_id
    res = localleap_generate(
        model, [tok.encode(p) for p in prompts], gen_length=16, block_length=8,
        mask_id=model.config.mask_token_id, eos_id=eos, pad_id=tok.pad_token_id, use_cache="dual",
    )  # fmt: skip
    assert torch.equal(out.sequences, res.ids) and out.prompt_length == res.prompt_length
    with pytest.raises(ValueError, match="no tokenizer"):
        dllm_generate(models[family], "x")
    from pipelines.generate_dllm import resolve_mask_id

    class OtherMask:  # a tokenizer that disagrees: the native checkpoint's config wins
        mask_token_id = 3

    assert resolve_mask_id(models[family], OtherMask()) == models[family].config.mask_token_id


@pytest.mark.parametrize("family", FAMILIES)
def test_save_dllm_round_trip(family, models, tmp_path):
    from tokenprune.localleap.models import save_dllm

    folder = save_dllm(models[family], tmp_path / family)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == {"llada": "llada", "dream": "Dream"}[family]
    assert cfg["auto_map"]  # the published fields, kept
    again, tok = load_dllm(folder)
    assert tok is None  # no tokenizer files written
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(again(ids).logits, models[family](ids).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_load_runs_the_gpu_precision_on_cpu(family, folders, models):
    model, _ = load_dllm(folders[family], device="cpu", dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids = torch.tensor([[3, 9, 27, 1, 4, 60 if family == "dream" else 44]])
    with torch.no_grad():
        low, ref = model(ids).logits, models[family](ids).logits
    assert low.dtype == torch.float32  # logits are returned in float32
    assert (low - ref).abs().max() < 0.25 * ref.abs().max()
    res = localleap_generate(model, ids, gen_length=8, block_length=8, mask_id=model.config.mask_token_id)
    assert not (res.generated == model.config.mask_token_id).any()
