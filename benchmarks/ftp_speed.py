"""FTP speed and KV memory: dense vs static router vs token router, ratios measured side by side.

    python benchmarks/ftp_speed.py --device cpu [--models tiny,smollm2] [--threads 1] [--repeats 3]
    python benchmarks/ftp_speed.py --device cuda            # ~1.1B Llama config, bf16, random weights

Every repeat runs the three variants back to back (interleaved) and the table reports medians.
On CPU the clock is the process CPU time with ``--threads`` torch threads (robust when other
work shares the cores); on CUDA it is wall time between ``torch.cuda.synchronize()`` calls.

* prefill: ``model(ids, use_cache=True, logits_to_keep=1)`` (what ``generate`` runs), speedup
  ``dense / variant``;
* decode: ``generate`` of N new tokens after a P-token prompt; decode time is
  ``t(N new tokens) - t(1 new token)`` (the prefill removed), reported as ``variant / dense``;
* KV: bytes allocated for K/V in the cache after the call, ``variant / dense``.

The token router is initialised to imitate the static router (:func:`init_from_static`, no LLM
needed); timing depends on shapes and decisions, not on what the weights mean.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from prunecore.budget import keep_from_sparsity  # noqa: E402
from prunecore.device import resolve_device, resolve_dtype  # noqa: E402
from tokenprune.ftp import StaticRouter, TokenRouter, attach_ftp, cache_nbytes  # noqa: E402
from tokenprune.ftp.train import init_from_static  # noqa: E402

VARIANTS = ("dense", "static", "token")
DEFAULTS = {
    "cpu": {"models": "tiny,smollm2", "prefill": "1x1024,4x512,1x2048", "batches": "1,8", "prompt": 256, "new": 64},
    "cuda": {"models": "llama1b", "prefill": "1x2048,8x2048,1x8192", "batches": "1,8", "prompt": 256, "new": 64},
}


CONFIGS = {  # random-weight Llama configs: timing depends only on the shapes
    "tiny": {
        "vocab_size": 8192,
        "hidden_size": 256,
        "intermediate_size": 768,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
    },
    "llama1b": {
        "vocab_size": 32000,
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
    },
}


def load_model(name: str, device: torch.device, dtype: torch.dtype):
    """A causal LM by benchmark name: random-weight configs, or SmolLM2-135M from its offline wheel."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if name == "smollm2":
        spec = importlib.util.spec_from_file_location("ftp_bench", REPO / "benchmarks" / "ftp.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        from prunecore.models import load_transformers

        return load_transformers(
            mod.smollm2_folder(),
            auto_class="AutoModelForCausalLM",
            device=device,
            dtype=dtype,
            attn_implementation="sdpa",
        )
    cfg = LlamaConfig(**CONFIGS[name], max_position_embeddings=16384)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


class Clock:
    """Process CPU time on CPU, synchronised wall time on CUDA."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn):
        """``(seconds, fn())``."""
        if self.cuda:
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = fn()
            torch.cuda.synchronize()
            return time.perf_counter() - t, out
        t = time.process_time()
        out = fn()
        return time.process_time() - t, out


@contextlib.contextmanager
def routed(model, variant: str, token_router, sparsity: float):
    """Context yielding the model: plain, or with FTP attached (the variant's router at ``sparsity``)."""
    if variant == "dense":
        yield model
        return
    router = StaticRouter() if variant == "static" else token_router
    with attach_ftp(model, router, keep_from_sparsity(sparsity)) as handle:
        yield handle.model


def cache_of(out):
    return getattr(out, "cache", None) or getattr(out, "past_key_values", None)


def bench_prefill(model, shape, clock, token_router, sparsity, repeats, vocab):
    B, T = shape
    ids = torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(T + B)).to(model.device)
    times = {v: [] for v in VARIANTS}
    kv = {}
    for rep in range(repeats + 1):  # the first round warms up
        for v in VARIANTS:
            with routed(model, v, token_router, sparsity) as m:
                t, out = clock(lambda: m(ids, use_cache=True, logits_to_keep=1))  # noqa: B023
            if rep:
                times[v].append(t)
            kv[v] = cache_nbytes(cache_of(out))
            del out
    return {v: statistics.median(x) for v, x in times.items()}, kv


def bench_decode(model, batch, prompt, new, clock, token_router, sparsity, repeats, vocab):
    ids = torch.randint(0, vocab, (batch, prompt), generator=torch.Generator().manual_seed(batch)).to(model.device)
    kw = {"do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    times = {v: [] for v in VARIANTS}
    kv = {}
    for rep in range(repeats + 1):
        for v in VARIANTS:
            with routed(model, v, token_router, sparsity) as m:
                t_new, out = clock(
                    lambda: m.generate(ids, max_new_tokens=new, min_new_tokens=new, return_dict_in_generate=True, **kw)  # noqa: B023
                )
                t_one, _ = clock(lambda: m.generate(ids, max_new_tokens=1, **kw))  # noqa: B023
            if rep:
                times[v].append(t_new - t_one)
            kv[v] = cache_nbytes(cache_of(out))
            del out
    return {v: statistics.median(x) for v, x in times.items()}, kv


def fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--models", default=None, help="comma list of tiny, smollm2, llama1b")
    ap.add_argument("--sparsity", type=float, default=0.3, help="per-block sparsity (keep = 1 - sparsity)")
    ap.add_argument("--prefill", default=None, help="comma list of BxT prefill shapes")
    ap.add_argument("--batches", default=None, help="comma list of decode batch sizes")
    ap.add_argument("--prompt", type=int, default=None, help="decode: prompt length")
    ap.add_argument("--new", type=int, default=None, help="decode: new tokens")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="CPU: torch threads (the clock is process CPU time)")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16")
    ap.add_argument("--quick", action="store_true", help="tiny model and shapes (the test)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    d = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    if args.quick:
        d = {"models": "tiny", "prefill": "1x96,2x64", "batches": "1,2", "prompt": 24, "new": 4}
        args.repeats = 1
    models = (args.models or d["models"]).split(",")
    shapes = [tuple(int(x) for x in s.split("x")) for s in (args.prefill or d["prefill"]).split(",")]
    batches = [int(b) for b in (args.batches or d["batches"]).split(",")]
    prompt, new = args.prompt or d["prompt"], args.new or d["new"]
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    token_router = TokenRouter()
    init_from_static(token_router, steps=200, seed=0)
    token_router.to(device)
    clock = Clock(device)
    lines = [
        f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), dtype "
        f"{str(dtype).replace('torch.', '')}, sparsity {args.sparsity}, medians of {args.repeats} interleaved repeats"
        + (f", {args.threads} thread(s), process CPU time" if device.type == "cpu" else ", synchronised wall time"),
        "",
        "| model | call | dense | static | token | KV static / dense | KV token / dense |",
        "|---|---|---|---|---|---|---|",
    ]
    results = []
    with torch.no_grad():
        for name in models:
            model = load_model(name, device, dtype)
            vocab = model.config.vocab_size
            for shape in shapes:
                t, kv = bench_prefill(model, shape, clock, token_router, args.sparsity, args.repeats, vocab)
                row = {"model": name, "call": f"prefill B={shape[0]} T={shape[1]}", "time": t, "kv": kv}
                results.append(row)
                lines.append(
                    f"| {name} | {row['call']} | {t['dense'] * 1e3:.0f} ms | {t['static'] * 1e3:.0f} ms "
                    f"({t['dense'] / t['static']:.2f}x faster) | {t['token'] * 1e3:.0f} ms "
                    f"({t['dense'] / t['token']:.2f}x faster) | {kv['static'] / kv['dense']:.2f} "
                    f"| {kv['token'] / kv['dense']:.2f} |"
                )
                print(lines[-1], flush=True)
            for b in batches:
                t, kv = bench_decode(model, b, prompt, new, clock, token_router, args.sparsity, args.repeats, vocab)
                row = {"model": name, "call": f"decode {new - 1} steps B={b} after {prompt}", "time": t, "kv": kv}
                results.append(row)
                lines.append(
                    f"| {name} | {row['call']} | {t['dense'] * 1e3:.0f} ms | {t['static'] * 1e3:.0f} ms "
                    f"({t['static'] / t['dense']:.2f}x the time) | {t['token'] * 1e3:.0f} ms "
                    f"({t['token'] / t['dense']:.2f}x the time) | {kv['static'] / kv['dense']:.2f} "
                    f"| {kv['token'] / kv['dense']:.2f} ({fmt_bytes(kv['dense'])} dense) |"
                )
                print(lines[-1], flush=True)
            del model
    table = "\n".join(lines)
    print(table)
    out = {"table": table, "results": results, "device": str(device), "dtype": str(dtype), "args": vars(args)}
    if args.out:
        from prunecore.io import atomic_write_json

        atomic_write_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
