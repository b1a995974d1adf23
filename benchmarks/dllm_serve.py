"""Serving throughput of ``prunekit serve-dllm``'s continuous-batching engine vs sequential
``dllm_generate``, measured side by side in one run.

The same requests (random prompts of ``--prompt-min``..``--prompt-max`` tokens, ``--gen-length``
tokens each) go through

* **sequential** ``dllm_generate`` (one request after the other, batch 1, ``early_stop`` so that
  it too stops after the block holding EOS), and
* the server's :class:`pipelines.serve_dllm.Engine` in its thread, with ``--concurrency`` closed-
  loop clients (each submits its next request when the previous one is answered; the engine
  batches up to ``--max-batch`` rows).

Reported: output tokens/s (tokens up to EOS, over the wall time of the whole workload), p50 and
p99 request latency (submission to answer), and the speed-up over sequential. The HTTP layer is
not in the loop (it adds a JSON round trip per request, not per pass).

The model is a native LLaDA with random weights (a pass costs the same whatever the weights):
on CPU the small LLaDA-shaped config of ``benchmarks/dllm_speed.py`` in fp32, on CUDA the
LLaDA-8B shape in bf16. Random weights are unsure, so the default rule is LLaDA's top-k with a
fixed number of steps (``--steps``: passes per request are ``steps``, whatever the weights).

    python benchmarks/dllm_serve.py --device cpu             # small config, concurrency 1, 8, 32
    python benchmarks/dllm_serve.py --device cuda            # LLaDA-8B shape, bf16
    python benchmarks/dllm_serve.py --quick                  # seconds (tiny config)
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dllm_speed import CONFIGS  # noqa: E402

from pipelines.generate import dllm_generate  # noqa: E402
from pipelines.serve_dllm import DecodeOptions, Engine  # noqa: E402
from prunecore.device import resolve_device, resolve_dtype  # noqa: E402
from tokenprune.localleap.models import LLaDAModelLM  # noqa: E402


class IdTokenizer:
    """Prompts are space-separated token ids (``"5 17 3"``); ``dllm_generate`` needs a tokenizer."""

    eos_token_id = None
    pad_token_id = None
    mask_token_id = None

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids, skip_special_tokens=True) -> str:
        return " ".join(map(str, ids))


def build_model(config: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A native LLaDA of ``config`` with random weights, built on ``device`` in ``dtype``."""
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = LLaDAModelLM.from_config(CONFIGS[config])
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def workload(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    """``n`` random prompts of ``lo``..``hi`` tokens (ids below the special tokens)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (k,), generator=g).tolist() for k in lengths]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in [0, 100])."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_sequential(model, prompts, opts: DecodeOptions, gen_length: int, device) -> dict:
    tok = IdTokenizer()
    kwargs = opts.generate_kwargs()
    block_length = kwargs.pop("block_length")
    latencies, tokens = [], 0
    start = time.perf_counter()
    for p in prompts:
        t0 = time.perf_counter()
        out = dllm_generate(
            model,
            " ".join(map(str, p)),
            tokenizer=tok,
            gen_length=gen_length,
            block_length=block_length,
            early_stop=True,
            **kwargs,
        )
        sync(device)
        latencies.append(time.perf_counter() - t0)
        eos = model.config.eos_token_id
        ids = out.generated[0].tolist()
        tokens += ids.index(eos) if eos in ids else len(ids)
    return summary("sequential dllm_generate", 1, tokens, time.perf_counter() - start, latencies)


def run_engine(model, prompts, opts: DecodeOptions, gen_length: int, concurrency: int, max_batch: int, device):
    c = model.config
    engine = Engine(model, mask_id=c.mask_token_id, eos_id=c.eos_token_id, pad_id=c.eos_token_id, max_batch=max_batch)
    engine.start()
    todo = list(range(len(prompts)))
    lock = threading.Lock()
    latencies, tokens = [], [0]

    def client():
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop(0)
            res = engine.submit(prompts[i], gen_length, opts).wait()
            with lock:
                latencies.append(res.latency_s)
                tokens[0] += len(res.tokens)

    start = time.perf_counter()
    clients = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in clients:
        t.start()
    for t in clients:
        t.join()
    wall = time.perf_counter() - start
    engine.stop()
    return summary(f"serve, concurrency {concurrency}", concurrency, tokens[0], wall, latencies, engine.passes)


def summary(name, concurrency, tokens, wall, latencies, passes=None) -> dict:
    return {
        "name": name,
        "concurrency": concurrency,
        "tokens": tokens,
        "wall_s": wall,
        "tok_s": tokens / wall,
        "p50_s": percentile(latencies, 50),
        "p99_s": percentile(latencies, 99),
        "passes": passes,
    }


def table(rows: list[dict]) -> str:
    base = rows[0]["tok_s"]
    lines = [
        "| run | output tokens | wall s | tokens/s | x sequential | p50 latency s | p99 latency s | batched passes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        passes = "" if r["passes"] is None else str(r["passes"])
        lines.append(
            f"| {r['name']} | {r['tokens']} | {r['wall_s']:.2f} | {r['tok_s']:.1f} | {r['tok_s'] / base:.2f}x "
            f"| {r['p50_s']:.3f} | {r['p99_s']:.3f} | {passes} |"
        )
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--config", choices=sorted(CONFIGS), help="default: small on CPU, 8b on CUDA")
    p.add_argument("--dtype", default="auto", help="auto: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-min", type=int, default=16)
    p.add_argument("--prompt-max", type=int, default=64)
    p.add_argument("--gen-length", type=int, default=64)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--rule", default="llada", choices=["llada", "localleap", "fastdllm", "eb"])
    p.add_argument("--steps", type=int, help="LLaDA rule: steps per request (default gen_length / 2)")
    p.add_argument("--cache", default="none", choices=["none", "prefix", "dual"])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help="tiny config, 8 short requests: seconds")
    args = p.parse_args(argv)
    if args.quick:
        args.config, args.requests, args.gen_length, args.block_length = "tiny", 8, 16, 8
        args.prompt_min, args.prompt_max, args.concurrency = 4, 12, [1, 8]
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    config = args.config or ("8b" if device.type == "cuda" else "small")
    dtype = resolve_dtype(args.dtype, device)
    model = build_model(config, device, dtype)
    steps = args.steps if args.steps is not None else max(args.gen_length // 2, args.gen_length // args.block_length)
    opts = DecodeOptions(rule=args.rule, steps=steps if args.rule == "llada" else None, block_length=args.block_length,
                         cache=args.cache)  # fmt: skip
    special = min(CONFIGS[config]["mask_token_id"], CONFIGS[config]["eos_token_id"])
    prompts = workload(args.requests, args.prompt_min, args.prompt_max, special, seed=0)
    print(
        f"# {config} LLaDA shape, random weights, {dtype} on {device}; {args.requests} requests, prompts "
        f"{args.prompt_min}-{args.prompt_max} tokens, gen_length {args.gen_length}, block {args.block_length}, "
        f"rule {args.rule}" + (f" ({steps} steps)" if args.rule == "llada" else "") + f", cache {args.cache}, "
        f"max batch {args.max_batch}, {args.threads} torch thread(s)",
        flush=True,
    )
    run_engine(model, prompts[:2], opts, args.gen_length, 2, args.max_batch, device)  # warm-up
    rows = [run_sequential(model, prompts, opts, args.gen_length, device)]
    for c in args.concurrency:
        rows.append(run_engine(model, prompts, opts, args.gen_length, c, args.max_batch, device))
        print(f"  {rows[-1]['name']}: {rows[-1]['tok_s']:.1f} tokens/s", flush=True)
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
