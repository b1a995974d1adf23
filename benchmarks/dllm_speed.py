"""dLLM decoding speed: LocalLeap vs Fast-dLLM vs one-token-per-step, with no cache / prefix /
dual cache, at batch 1 and 8, measured side by side in one run.

Two measurements are combined:

* **cost per forward pass** of a native LLaDA-shaped model with random weights (what a pass
  costs does not depend on the weights): for every block of a ``gen_length`` canvas, the full
  pass (no cache, and the block-start pass of the caches), the prefix-cache window pass
  (``canvas[block_start:]`` over the cached prefix) and the dual-cache pass (only the block);
  the LM head is applied to the block only, as in the decoding loop. On CPU a small
  LLaDA-shaped config in fp32 (``--config small``: 8 layers of width 512, head dim 128, MLP
  3x, vocabulary 4096 so the head's share of the parameters is LLaDA-8B's ~7%), on CUDA the
  LLaDA-8B shape in bf16 (``--config 8b``).
  Variants are interleaved and each cost is the median of ``--repeats`` timings (CPU:
  process CPU time with one torch thread; CUDA: wall clock with synchronisation).
* **passes per block** of each rule, measured on the trained testbed of
  ``benchmarks/dllm_testbed.py`` (``add``; the fraction of the one-token-per-step NFE at one
  block of 16), scaled to ``block_length``: ``passes = max(1, fraction * block_length)``; one
  token per step is exactly ``block_length`` passes.

Time per batch = sum over blocks of ``passes * full`` (no cache) or ``full + (passes - 1) *
window`` (prefix / dual); tokens/s = ``batch * gen_length / time``.

    python benchmarks/dllm_speed.py --device cpu            # small LLaDA-shaped config
    python benchmarks/dllm_speed.py --device cuda           # LLaDA-8B shape, bf16
    python benchmarks/dllm_speed.py --quick                 # seconds (tiny config, smoke testbed)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dllm_testbed as tb  # noqa: E402

from prunecore.device import resolve_device, resolve_dtype  # noqa: E402
from tokenprune.localleap import localleap_generate  # noqa: E402
from tokenprune.localleap.models import LLaDAModelLM  # noqa: E402

LLADA_8B = dict(
    model_type="llada", d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288,
    vocab_size=126464, embedding_size=126464, mask_token_id=126336, eos_token_id=126081, rope_theta=500000.0,
)  # fmt: skip
CONFIGS = {
    "8b": LLADA_8B,
    # LLaDA's per-layer shape (head dim 128, MLP 3 x d_model) with the vocabulary scaled down with the
    # body, so that the LM head's share of a pass (~7% of the parameters) stays that of LLaDA-8B
    "small": {**LLADA_8B, "d_model": 512, "n_layers": 8, "n_heads": 4, "n_kv_heads": 4, "mlp_hidden_size": 1536,
              "vocab_size": 4096, "embedding_size": 4096, "mask_token_id": 4000, "eos_token_id": 4001},
    "tiny": {**LLADA_8B, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "mlp_hidden_size": 192,
             "vocab_size": 512, "embedding_size": 512, "mask_token_id": 500, "eos_token_id": 501},
}  # fmt: skip
RULES = [
    ("one token/step (LLaDA)", dict(rule="llada")),
    ("Fast-dLLM (0.9)", dict(rule="fastdllm", threshold=0.9)),
    ("LocalLeap (0.9/0.75/r4)", dict(rule="localleap", threshold=0.9, relaxed_threshold=0.75, radius=4)),
]
CACHES = ("none", "prefix", "dual")


def build_model(config: dict, device: torch.device, dtype: torch.dtype) -> LLaDAModelLM:
    """Random-weight native LLaDA of ``config`` (a forward pass costs the same for any weights)."""
    with torch.device(device):
        model = LLaDAModelLM.from_config(config)
    return model.to(dtype).eval().requires_grad_(False)


def pass_costs(model, *, batch, prompt_length, gen_length, block_length, repeats, device):
    """Median seconds of the full / prefix-window / dual-block pass for every block.

    Returns ``{kind: [seconds per block]}`` for ``kind`` in ``full``, ``prefix``, ``dual``."""
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.mask_token_id, (batch, prompt_length), generator=g)
    x = torch.cat([prompt, torch.full((batch, gen_length), cfg.mask_token_id)], 1).to(device)
    n_blocks = gen_length // block_length
    cuda = device.type == "cuda"
    clock = time.perf_counter if cuda else time.process_time
    samples = {kind: [[] for _ in range(n_blocks)] for kind in ("full", "prefix", "dual")}
    with torch.no_grad():
        for _ in range(repeats):
            for b in range(n_blocks):
                s, e = prompt_length + b * block_length, prompt_length + (b + 1) * block_length
                full = model(x, use_cache=True, logits_range=(s, e)).past_key_values
                prefix = tuple((k[:, :, :s], v[:, :, :s]) for k, v in full)
                calls = {
                    "full": (x, dict(use_cache=True, logits_range=(s, e))),
                    "prefix": (x[:, s:], dict(past_key_values=prefix, logits_range=(0, e - s))),
                    "dual": (x[:, s:e], dict(past_key_values=full, replace_position=(s, e))),
                }
                for kind, (inp, kwargs) in calls.items():  # interleaved: the three kinds see the same load
                    if cuda:
                        torch.cuda.synchronize()
                    t0 = clock()
                    model(inp, **kwargs)
                    if cuda:
                        torch.cuda.synchronize()
                    samples[kind][b].append(clock() - t0)
    return {kind: [statistics.median(v) for v in per_block] for kind, per_block in samples.items()}


def testbed_fractions(*, quick: bool, threads: int, n: int):
    """Mean NFE of each rule as a fraction of one token per step on the testbed (``add``, one block)."""
    steps = tb.TRAIN_STEPS["add"]
    if quick and not tb.weights_path("add", steps).exists():
        model, note = tb.train(task="add", steps=10, log_every=0, threads=threads), "UNTRAINED smoke testbed"
    else:
        model, note = tb.load_or_train(task="add", steps=steps, threads=threads), f"testbed add, {steps} steps"
    tok = tb.TestbedTokenizer()
    problems = tb.make_problems(n, task="add", generator=torch.Generator().manual_seed(2024))
    ids, P = tb.make_batch(problems, tok)
    G = tb.GEN_LENGTH
    fractions = {}
    for name, kw in RULES:
        res = localleap_generate(
            model, ids[:, :P], gen_length=G, block_length=G, mask_id=tok.mask_token_id, eos_id=tok.eos_token_id, **kw
        )
        fractions[name] = res.row_nfe.float().mean().item() / G
    return fractions, note


def combine(costs, fraction, *, cache, batch, gen_length, block_length):
    """Passes per block, seconds per batch and tokens/s for one rule and cache mode."""
    passes = max(1.0, fraction * block_length)
    seconds = 0.0
    for b in range(gen_length // block_length):
        full = costs["full"][b]
        seconds += passes * full if cache == "none" else full + (passes - 1) * costs[cache][b]
    nfe = passes * (gen_length // block_length)
    return dict(passes_per_block=passes, nfe=nfe, seconds=seconds, ms_per_forward=1e3 * seconds / nfe,
                tokens_per_s=batch * gen_length / seconds)  # fmt: skip


def end_to_end(model, costs, *, batch, prompt_length, gen_length, block_length, device):
    """Measured vs predicted seconds of one-token-per-step decoding (NFE = gen_length for any weights)."""
    cfg = model.config
    prompt = torch.randint(0, cfg.mask_token_id, (batch, prompt_length), generator=torch.Generator().manual_seed(1))
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    out = {}
    for cache in CACHES:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = clock()
        res = localleap_generate(model, prompt.to(device), gen_length=gen_length, block_length=block_length,
                                 mask_id=cfg.mask_token_id, rule="llada", use_cache=cache)  # fmt: skip
        if device.type == "cuda":
            torch.cuda.synchronize()
        predicted = combine(costs, 1.0, cache=cache, batch=batch, gen_length=gen_length, block_length=block_length)
        out[cache] = dict(measured=clock() - t0, predicted=predicted["seconds"], nfe=res.nfe)
    return out


def run(args):
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    config = CONFIGS[args.config or ("8b" if device.type == "cuda" else "small")]
    model = build_model(config, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    costs = {}
    for batch in args.batches:
        costs[batch] = pass_costs(
            model, batch=batch, prompt_length=args.prompt_length, gen_length=args.gen_length,
            block_length=args.block_length, repeats=args.repeats, device=device,
        )  # fmt: skip
    checks = end_to_end(
        model, costs[min(args.batches)], batch=min(args.batches), prompt_length=args.prompt_length,
        gen_length=args.gen_length, block_length=args.block_length, device=device,
    )  # fmt: skip
    fractions, note = testbed_fractions(quick=args.quick, threads=args.threads, n=16 if args.quick else 200)
    rows = []
    for name, _ in RULES:
        for cache in CACHES:
            for batch in args.batches:
                r = combine(costs[batch], fractions[name], cache=cache, batch=batch, gen_length=args.gen_length,
                            block_length=args.block_length)  # fmt: skip
                rows.append(dict(rule=name, cache=cache, batch=batch, fraction=fractions[name], **r))
    header = (
        f"LLaDA-shaped config {args.config or ('8b' if device.type == 'cuda' else 'small')} "
        f"({params / 1e6:.0f}M parameters, d_model {config['d_model']}, {config['n_layers']} layers, vocab "
        f"{config['vocab_size']}), {device.type} {dtype}, prompt {args.prompt_length}, gen_length "
        f"{args.gen_length}, block {args.block_length}, {args.repeats} repeats, torch threads "
        f"{torch.get_num_threads()}; NFE from the {note}"
    )
    return rows, costs, checks, header


def tables(rows, costs, checks, batches) -> str:
    base = {b: next(r for r in rows if r["rule"] == RULES[0][0] and r["cache"] == "none" and r["batch"] == b)
            for b in batches}  # fmt: skip
    lines = [
        "| decoding | cache | batch | NFE (testbed fraction) | ms / forward | tokens/s | vs one-token/step, "
        "no cache, same batch |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['rule']} | {r['cache']} | {r['batch']} | {r['nfe']:.0f} ({100 * r['fraction']:.1f}%) | "
            f"{r['ms_per_forward']:.1f} | {r['tokens_per_s']:.1f} | "
            f"{r['tokens_per_s'] / base[r['batch']]['tokens_per_s']:.2f}x |"
        )
    lines += ["", "| pass | " + " | ".join(f"batch {b}: ms (mean over blocks)" for b in batches) + " |",
              "|---|" + "---:|" * len(batches)]  # fmt: skip
    for kind in ("full", "prefix", "dual"):
        cells = [f"{1e3 * statistics.mean(costs[b][kind]):.1f}" for b in batches]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    lines += ["", f"| end-to-end check (one token/step, batch {min(batches)}) | NFE | measured s | predicted s |",
              "|---|---:|---:|---:|"]  # fmt: skip
    for cache, c in checks.items():
        lines.append(f"| {cache} | {c['nfe']} | {c['measured']:.2f} | {c['predicted']:.2f} |")
    lo, hi = min(batches), max(batches)
    pick = {(r["rule"], r["cache"], r["batch"]): r["tokens_per_s"] for r in rows}
    lines += ["", f"| decoding | tokens/s batch {hi} / batch {lo}: none | prefix | dual | dual / none: batch {lo} "
              f"| batch {hi} | prefix / none: batch {lo} | batch {hi} |", "|---|" + "---:|" * 7]  # fmt: skip
    for name, _ in RULES:
        cells = [pick[name, c, hi] / pick[name, c, lo] for c in CACHES]
        cells += [pick[name, c, b] / pick[name, "none", b] for c in ("dual", "prefix") for b in (lo, hi)]
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}x" for v in cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--dtype", default="auto", help="auto: fp32 on CPU, bf16 on CUDA")
    ap.add_argument("--config", choices=sorted(CONFIGS), default=None, help="default: small on CPU, 8b on CUDA")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-length", type=int, default=64)
    ap.add_argument("--gen-length", type=int, default=256)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="seconds: tiny config, gen 64, smoke testbed if untrained")
    args = ap.parse_args(argv)
    if args.gen_length % args.block_length:
        ap.error("--gen-length must be a multiple of --block-length")
    if args.quick:
        args.config, args.gen_length, args.block_length, args.prompt_length, args.repeats = "tiny", 64, 16, 16, 1
    torch.set_num_threads(args.threads)
    t0 = time.time()
    rows, costs, checks, header = run(args)
    print(f"\n### dLLM decoding speed ({header}; {time.time() - t0:.0f}s)\n")
    print(tables(rows, costs, checks, args.batches), flush=True)
    return rows, costs, checks


if __name__ == "__main__":
    main()
