"""FoPru speed: generate latency against plain generate and the already-pruned lower bound.

Two model shapes, random weights (latency depends only on shapes), sdpa attention:

* ``llava15``: ``LlavaForConditionalGeneration`` (CLIP tower, CLS scoring, Llama LLM);
* ``qwen25vl``: ``Qwen2_5_VLForConditionalGeneration`` (windowed tower, colmean scoring on its
  last full-attention block, M-RoPE positions of the kept tokens).

``--device cuda``: LLaVA-1.5-7B (CLIP ViT-L/14-336, 576 visual tokens, Llama-7B) and
Qwen2.5-VL-7B (672 px image: 576 merged tokens) in bf16. ``--device cpu``: small shapes of the
same structure (576 LLaVA tokens, 256 Qwen merged tokens, narrow towers and LLMs) that finish
in minutes. ``--quick``: tiny shapes, for the test.

Per model and batch size (1 and 8 prompts, one different image each), timed in one run,
interleaved round-robin over the variants, median of ``--repeats``:

* ``plain``: ``model.generate`` on the full prompt;
* ``fopru k``: ``fopru_generate(model, inputs, keep=k)`` for k = 0.5 and 0.25 (vision tower
  with capture hooks, scoring, selection, prompt shrinking, generate);
* ``lower k``: the ideal for the same kept tokens: the vision encoder (``get_image_features``)
  plus ``model.generate`` on the already-pruned prompt with its pruned features precomputed,
  i.e. everything except FoPru's own work.

``--new-tokens`` (default 1: time to the first token, where pruning matters most). On CPU use
``--threads 1 --clock cpu`` on a shared machine: process CPU time with one thread equals the
latency on an idle core and is robust to other jobs.

    python benchmarks/fopru_speed.py --device cpu --threads 1 --clock cpu
    python benchmarks/fopru_speed.py --device cuda
    python benchmarks/fopru_speed.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from prunecore.device import resolve_device, resolve_dtype  # noqa: E402
from tokenprune.fopru import fopru_generate  # noqa: E402
from tokenprune.fopru.adapters import make_adapter  # noqa: E402

KEEPS = (0.5, 0.25)
IMG, VS, VE, VID = 7, 8, 9, 10  # placeholder / vision start / end / video ids (random models: any ids)

# name -> size -> shape parameters
SHAPES = {
    "llava15": {
        "quick": dict(v_hidden=64, v_layers=3, v_heads=4, image=56, patch=14, hidden=64, layers=2, heads=4, inter=128),
        "cpu": dict(
            v_hidden=256, v_layers=8, v_heads=8, image=336, patch=14, hidden=512, layers=4, heads=8, inter=1376
        ),
        "cuda": dict(
            v_hidden=1024, v_layers=24, v_heads=16, image=336, patch=14, hidden=4096, layers=32, heads=32, inter=11008
        ),
    },
    "qwen25vl": {
        "quick": dict(v_hidden=64, v_layers=4, v_heads=4, image=112, hidden=64, layers=2, heads=4, kv=2, inter=128),
        "cpu": dict(v_hidden=256, v_layers=8, v_heads=8, image=448, hidden=512, layers=4, heads=8, kv=2, inter=1376),
        "cuda": dict(
            v_hidden=1280, v_layers=32, v_heads=16, image=672, hidden=3584, layers=28, heads=28, kv=4, inter=18944
        ),
    },
}
VOCAB = {"quick": 512, "cpu": 4096, "cuda": 32064}


def build_llava(s: dict, vocab: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vc = CLIPVisionConfig(
        hidden_size=s["v_hidden"],
        intermediate_size=4 * s["v_hidden"],
        num_hidden_layers=s["v_layers"],
        num_attention_heads=s["v_heads"],
        image_size=s["image"],
        patch_size=s["patch"],
    )
    tc = LlamaConfig(
        hidden_size=s["hidden"],
        intermediate_size=s["inter"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["heads"],
        vocab_size=vocab,
        pad_token_id=0,
    )
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=IMG, vision_feature_layer=-2)
    return LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa")


def mrope_section(s: dict) -> list[int]:
    """(t, h, w) rotary sections in Qwen2.5-VL's 16:24:24 proportion for this head size."""
    half = s["hidden"] // s["heads"] // 2
    t = half // 4
    return [t, (half - t) // 2, half - t - (half - t) // 2]


def build_qwen25(s: dict, vocab: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    depth = s["v_layers"]
    cfg = Qwen2_5_VLConfig(
        vision_config=dict(
            depth=depth,
            hidden_size=s["v_hidden"],
            intermediate_size=s["v_hidden"] * 8 // 3,
            num_heads=s["v_heads"],
            patch_size=14,
            window_size=112,
            fullatt_block_indexes=list(range(depth // 4 - 1, depth, depth // 4)),
            out_hidden_size=s["hidden"],
        ),
        text_config=dict(
            vocab_size=vocab,
            hidden_size=s["hidden"],
            intermediate_size=s["inter"],
            num_hidden_layers=s["layers"],
            num_attention_heads=s["heads"],
            num_key_value_heads=s["kv"],
            rope_parameters={"rope_type": "default", "mrope_section": mrope_section(s), "rope_theta": 1e6},
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        image_token_id=IMG,
        video_token_id=VID,
        vision_start_token_id=VS,
        vision_end_token_id=VE,
    )
    return Qwen2_5_VLForConditionalGeneration._from_config(cfg, attn_implementation="sdpa")


def llava_inputs(model, batch: int, device, dtype, seed: int = 0):
    vc = model.config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(20, model.config.text_config.vocab_size, (batch, 40), generator=g)
    ids = torch.cat([text[:, :5], torch.full((batch, n), IMG), text[:, 5:]], dim=1)
    pv = torch.randn(batch, 3, vc.image_size, vc.image_size, generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pv}
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}


def qwen_inputs(model, batch: int, device, dtype, image: int, seed: int = 0):
    side = image // 14
    n = side * side // 4
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(20, model.config.text_config.vocab_size, (batch, 40), generator=g)
    ids = torch.cat(
        [text[:, :5], torch.full((batch, 1), VS), torch.full((batch, n), IMG), torch.full((batch, 1), VE)], 1
    )
    ids = torch.cat([ids, text[:, 5:]], dim=1)
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(batch * side * side, 3 * 2 * 14 * 14, generator=g),
        "image_grid_thw": torch.tensor([[1, side, side]] * batch),
        "mm_token_type_ids": (ids == IMG).int(),
    }
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}


def clock_fn(name: str, device: torch.device):
    base = time.perf_counter if name == "wall" else time.process_time

    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return base()

    return now


def lower_bound_call(model, inputs: dict, keep: float):
    """The already-pruned call for ``keep`` (the prompt, positions and features FoPru builds) and
    the vision-encoder call the ideal still has to make."""
    adapter = make_adapter(model, keep=keep)
    mm, _ = adapter.split_inputs(inputs)
    prep = adapter.prepare(mm)
    deltas = getattr(getattr(model, "model", None), "rope_deltas", None)
    vision = {k: inputs[k] for k in ("pixel_values", "image_grid_thw") if k in inputs}
    return prep.call, vision, deltas


def run_case(model, inputs: dict, args, now) -> dict[str, float]:
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    lower = {k: lower_bound_call(model, inputs, k) for k in KEEPS}

    def plain():
        model.generate(**inputs, **gen)

    def fopru(k):
        return lambda: fopru_generate(model, inputs, keep=k, **gen)

    def ideal(k):
        call, vision, deltas = lower[k]

        def run():
            model.get_image_features(**vision)
            if deltas is not None:
                model.model.rope_deltas = deltas
            model.generate(**call, **gen)

        return run

    variants = {"plain": plain}
    for k in KEEPS:
        variants[f"fopru {k}"] = fopru(k)
        variants[f"lower {k}"] = ideal(k)
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad():
        for fn in variants.values():  # warm-up
            fn()
        for _ in range(args.repeats):
            for name, fn in variants.items():
                t0 = now()
                fn()
                times[name].append(now() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 1 repeat (for the test)")
    ap.add_argument("--models", default="llava15,qwen25vl")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu = process CPU time (CPU only)")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    if args.clock == "cpu" and device.type == "cuda":
        raise SystemExit("--clock cpu measures process CPU time: use it with --device cpu")
    dtype = resolve_dtype("auto", device)
    size = "quick" if args.quick else device.type
    if args.quick:
        args.repeats, args.batches = 1, "1,2"
    if args.threads:
        torch.set_num_threads(args.threads)
    now = clock_fn(args.clock, device)
    results = {}
    rows = []
    for name in args.models.split(","):
        s = SHAPES[name][size]
        torch.manual_seed(0)
        build = build_llava if name == "llava15" else build_qwen25
        model = build(s, VOCAB[size]).to(device, dtype).eval()
        model.generation_config.eos_token_id = None
        for batch in (int(b) for b in args.batches.split(",")):
            if name == "llava15":
                inputs = llava_inputs(model, batch, device, dtype)
            else:
                inputs = qwen_inputs(model, batch, device, dtype, s["image"])
            med = run_case(model, inputs, args, now)
            results[(name, batch)] = med
            n_vis = int((inputs["input_ids"][0] == IMG).sum())
            rows.append((name, batch, n_vis, med))
        del model
    print(
        f"\nFoPru speed, device {device} ({dtype}), {args.new_tokens} new token(s), clock {args.clock}, "
        f"threads {torch.get_num_threads()}, median of {args.repeats}, sizes '{size}'\n"
    )
    print(
        "| model | batch | visual tokens/image | plain (s) | FoPru 0.5 (s) | lower 0.5 (s) | FoPru 0.25 (s) "
        "| lower 0.25 (s) | FoPru 0.25 / plain | FoPru 0.5 / lower | FoPru 0.25 / lower |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, batch, n_vis, m in rows:
        print(
            f"| {name} | {batch} | {n_vis} | {m['plain']:.4f} | {m['fopru 0.5']:.4f} | {m['lower 0.5']:.4f} "
            f"| {m['fopru 0.25']:.4f} | {m['lower 0.25']:.4f} | {m['fopru 0.25'] / m['plain']:.3f} "
            f"| {m['fopru 0.5'] / m['lower 0.5']:.3f} | {m['fopru 0.25'] / m['lower 0.25']:.3f} |"
        )
    return results


if __name__ == "__main__":
    main()
