"""dLLM parallel decoding on a really trained masked diffusion LM: LLaDA vs Fast-dLLM vs
LocalLeap vs EB-sampler, same prompts, one run.

The models are the testbeds of ``benchmarks/dllm_testbed.py`` (one per task: reversed
multi-digit addition ``add`` and running parity ``parity``), trained here on CPU when
``~/.cache/prunekit/dllm_testbed`` has no weights yet. For each
decoding rule: exact-match accuracy, mean forward passes per sample (NFE), NFE as % of the
one-token-per-step LLaDA baseline, tokens committed per forward, and the wall-clock
tokens/s ratio to the baseline (batch size 1, same machine, same run).

    python benchmarks/dllm_decoding.py            # 500 problems (trains once if needed)
    python benchmarks/dllm_decoding.py --quick    # seconds: 16 problems, tiny model if needed
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dllm_testbed as tb  # noqa: E402

from tokenprune.localleap import localleap_generate  # noqa: E402


def methods(gen_length: int):
    return [
        ("LLaDA, 1 token/step (baseline)", dict(rule="llada", steps=gen_length)),
        (f"LLaDA, {gen_length // 2} steps", dict(rule="llada", steps=gen_length // 2)),
        (f"LLaDA, {gen_length // 4} steps", dict(rule="llada", steps=gen_length // 4)),
        ("Fast-dLLM (0.9)", dict(rule="fastdllm", threshold=0.9)),
        ("LocalLeap (0.9/0.75/r4)", dict(rule="localleap", threshold=0.9, relaxed_threshold=0.75, radius=4)),
        ("EB-sampler (1e-3)", dict(rule="eb", gamma=1e-3)),
        ("LocalLeap + prefix KV cache", dict(rule="localleap", use_cache=True)),
    ]


def run(model, tok, problems, *, block_length: int, batch_size: int, n_time: int, extra_methods=()):
    ids, P = tb.make_batch(problems, tok)
    prompts = ids[:, :P]
    G = tb.GEN_LENGTH
    rows = []
    for name, kw in list(methods(G)) + list(extra_methods):
        correct, row_nfe = [], []
        for i in range(0, len(problems), batch_size):
            res = localleap_generate(
                model,
                prompts[i : i + batch_size],
                gen_length=G,
                block_length=block_length,
                mask_id=tok.mask_token_id,
                eos_id=tok.eos_token_id,
                **kw,
            )
            correct.append(tb.exact_match(res.generated, problems[i : i + batch_size], tok))
            row_nfe.append(res.row_nfe)
        acc = torch.cat(correct).float().mean().item()
        nfe = torch.cat(row_nfe).float().mean().item()
        t0 = time.perf_counter()
        for i in range(n_time):  # latency-style timing: one prompt at a time
            localleap_generate(
                model,
                prompts[i : i + 1],
                gen_length=G,
                block_length=block_length,
                mask_id=tok.mask_token_id,
                eos_id=tok.eos_token_id,
                **kw,
            )
        tps = n_time * G / (time.perf_counter() - t0)
        rows.append(dict(method=name, acc=acc, nfe=nfe, tps=tps))
    base = rows[0]
    lines = [
        "| decoding | exact match | mean NFE | NFE % of baseline | tokens / forward | tokens/s vs baseline |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {100 * r['acc']:.1f}% | {r['nfe']:.2f} | "
            f"{100 * r['nfe'] / base['nfe']:.1f}% | {G / r['nfe']:.2f} | "
            f"{r['tps'] / base['tps']:.2f}x |"
        )
    return rows, "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    ap.add_argument("--task", default="all", choices=["all"] + sorted(tb.TASKS))
    ap.add_argument("--n", type=int, default=500, help="test problems")
    ap.add_argument("--n-time", type=int, default=100, help="problems timed at batch size 1")
    ap.add_argument("--block-length", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--train-steps", type=int, default=None, help="default: the testbed's TRAIN_STEPS per task")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=2024)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tok = tb.TestbedTokenizer()
    tasks = sorted(tb.TASKS) if args.task == "all" else [args.task]
    if args.quick:
        args.n, args.n_time = 16, 2
    results = {}
    for task in tasks:
        steps = args.train_steps or tb.TRAIN_STEPS[task]
        cached = tb.weights_path(task, steps).exists()
        if args.quick and not cached:
            model = tb.train(task=task, steps=10, log_every=0, threads=args.threads)
            note = "UNTRAINED smoke model (10 steps)"
        else:
            model = tb.load_or_train(task=task, steps=steps, threads=args.threads)
            note = f"testbed trained {steps} steps"
        problems = tb.make_problems(args.n, task=task, generator=torch.Generator().manual_seed(args.seed))
        t0 = time.time()
        rows, table = run(
            model, tok, problems, block_length=args.block_length, batch_size=args.batch_size, n_time=args.n_time
        )
        print(
            f"\n### task {task!r} ({note}; {args.n} problems, gen_length {tb.GEN_LENGTH}, "
            f"block {args.block_length}, torch threads {args.threads}, "
            f"{time.time() - t0:.0f}s)\n"
        )
        print(table, flush=True)
        results[task] = rows
    return results


if __name__ == "__main__":
    main()
