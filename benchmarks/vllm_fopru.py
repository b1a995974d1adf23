"""FoPru inside vLLM: requests/s and time to first token, plugin off vs keep 0.5 / 0.25.

Same prompts and images for every setting, measured side by side in one run (each setting in
a fresh process: the prunekit options are fixed when vLLM builds its engine). Every request
carries its own random image (no multimodal cache hits) of 256 merged tokens before pruning
(448 x 448 px for Qwen2.5-VL, 512 x 512 px for Qwen3-VL's patch 16).

``--family qwen3_vl`` measures Qwen3-VL instead of Qwen2.5-VL (the tiny random model of
``tests_vllm/tiny_qwen.py`` on CPU, Qwen3-VL-2B-Instruct's shapes with ``--device cuda``).

* ``--device cpu`` (default): the tiny random Qwen2.5-VL of ``tests_vllm/tiny_qwen.py`` on
  vLLM's CPU build (``make test-vllm`` makes ``.venv-vllm``): a ratio, not a serving figure.
* ``--device cuda``: Qwen2.5-VL-3B-Instruct's shapes with ``load_format="dummy"`` weights in
  bf16 (the GPU round; anchor: PixelPrune's +60% req/s at 51.7% of the input tokens).

Run it with the vLLM environment's Python::

    .venv-vllm/bin/python benchmarks/vllm_fopru.py --requests 16
    .venv-vllm/bin/python benchmarks/vllm_fopru.py --requests 16 --family qwen3_vl
    python benchmarks/vllm_fopru.py --device cuda --requests 128

Per setting: prompt tokens per request, median time to first token of a single request
(``--ttft-repeats``), and requests/s for ``--requests`` requests submitted at once with
``--max-tokens`` new tokens each; the last column is req/s over plugin off.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests_vllm"))

SETTINGS = {"off": None, "keep 0.5": 0.5, "keep 0.25": 0.25}
SIDE = {"qwen2_5_vl": 448, "qwen3_vl": 512}  # px: 16 x 16 merged tokens (patch 14 / 16, merge 2)
PROMPT = "Describe <|vision_start|><|image_pad|><|vision_end|> in a few words."


def images(n: int, side: int, seed: int = 0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((side, side, 3)) * 255).astype("uint8")) for _ in range(n)]


def measure(args) -> dict:
    """One setting in this process: build the engine, warm up, time TTFT and a batch."""
    from vllm import LLM, SamplingParams

    keep = json.loads(args.keep)
    kwargs = {"hf_overrides": {"prunekit": {"keep": keep}}} if keep is not None else {}
    if args.device == "cuda":
        kwargs.update(dtype="bfloat16", load_format="dummy", gpu_memory_utilization=0.85)
    else:
        kwargs.update(dtype="float32", gpu_memory_utilization=0.1)
    limits = {"image": 1, **({"video": 0} if args.family == "qwen3_vl" else {})}  # pruned Qwen3-VL: images only
    llm = LLM(
        model=args.folder,
        enforce_eager=args.device == "cpu",
        max_model_len=4096,
        seed=0,
        limit_mm_per_prompt=limits,
        **kwargs,
    )
    reqs = [
        {"prompt": PROMPT, "multi_modal_data": {"image": im}}
        for im in images(args.requests + args.ttft_repeats + 1, SIDE[args.family])
    ]
    one = SamplingParams(max_tokens=1, temperature=0)
    llm.generate(reqs[:1], one, use_tqdm=False)  # warm-up
    ttft = []
    for r in reqs[1 : 1 + args.ttft_repeats]:
        t0 = time.perf_counter()
        out = llm.generate([r], one, use_tqdm=False)
        ttft.append(time.perf_counter() - t0)
    batch = reqs[1 + args.ttft_repeats :]
    t0 = time.perf_counter()
    llm.generate(batch, SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True), use_tqdm=False)
    seconds = time.perf_counter() - t0
    return {
        "prompt_tokens": len(out[0].prompt_token_ids),
        "ttft_s": statistics.median(ttft),
        "req_per_s": len(batch) / seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--family", choices=sorted(SIDE), default="qwen2_5_vl")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--ttft-repeats", type=int, default=5)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--keep", default="null", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(measure(args)), flush=True)
        return
    from tiny_qwen import SHAPE_3B, SHAPE_QWEN3_2B, write_tiny_qwen2_5_vl, write_tiny_qwen3_vl

    write, shape = {
        "qwen2_5_vl": (write_tiny_qwen2_5_vl, SHAPE_3B),
        "qwen3_vl": (write_tiny_qwen3_vl, SHAPE_QWEN3_2B),
    }[args.family]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / args.family
        write(folder, shape=shape if args.device == "cuda" else None)
        for name, keep in SETTINGS.items():
            cmd = [sys.executable, __file__, "--worker", "--folder", str(folder), "--keep", json.dumps(keep)]
            cmd += ["--device", args.device, "--family", args.family, "--requests", str(args.requests)]
            cmd += ["--max-tokens", str(args.max_tokens)]
            cmd += ["--ttft-repeats", str(args.ttft_repeats)]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                sys.exit(f"{name}: failed\n{proc.stderr[-3000:]}")
            rows[name] = json.loads(lines[-1][7:])
            print(f"[vllm_fopru] {name}: {rows[name]}", file=sys.stderr, flush=True)
    base = rows["off"]
    side = SIDE[args.family]
    print(f"\nvLLM {args.device}, {args.family}, {args.requests} requests x {args.max_tokens} new tokens, {side} px")
    print("| setting | prompt tokens | TTFT (ms) | TTFT / off | req/s | req/s / off |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['prompt_tokens']} | {1000 * r['ttft_s']:.1f} | {r['ttft_s'] / base['ttft_s']:.2f} "
            f"| {r['req_per_s']:.2f} | {r['req_per_s'] / base['req_per_s']:.2f} |"
        )


if __name__ == "__main__":
    main()
