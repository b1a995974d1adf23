"""Trained tiny LLaVA on CIFAR-10: does FoPru keep accuracy when visual tokens are pruned?

A ``LlavaForConditionalGeneration`` (tiny CLIP vision tower, 32x32 images at patch 4 =
64 patch tokens + CLS; tiny Llama LLM; word-level vocabulary) is trained from scratch on
CPU, LLaVA-style in two stages:

A. "CLIP pretraining" stand-in: the vision tower is trained as a classifier on its CLS
   output (so its CLS attention means something, as in a real CLIP);
B. the tower is frozen; projector + LLM learn to answer ``what is in the image ?`` with
   ``a photo of a {class} .`` from the layer -2 patch features (LLaVA's feature layer).

Then class accuracy is read from *generated text* on held-out images (shard 4) at
keep = 100/50/25/10/5 % of the visual tokens for: FoPru rank, FoPru row (both row modes),
random selection, and a FastV-style baseline (LLM layer-2 attention of the last prompt token
over the visual tokens, from a full prefill; here the pruned tokens are removed from every
LLM layer, while real FastV keeps them in layers 0-1).

``--token-dropout P`` (a testbed choice, off by default): in stage B each training sample is,
with probability P, shown only a uniformly random subset of its visual tokens (keep fraction
log-uniform in [0.05, 1]; dropped placeholders are masked out as keys and the rest renumbered,
which equals removing them from the prompt as FoPru does at inference). The subset is random,
not chosen by any method under test. Real LLaVA LLMs see 576 redundant tokens and tolerate
removal; this tiny LLM only ever saw all 64 tokens otherwise.

Weights are cached in ``~/.cache/prunekit/fopru_cifar_llava`` (``--retrain`` to redo).
``--quick`` trains a few steps on a few hundred images (smoke test, meaningless numbers).

    OMP_NUM_THREADS=2 python benchmarks/fopru_cifar_llava.py
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tokenprune.fopru import fopru_generate  # noqa: E402

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
VOCAB = ["<pad>", "<s>", "</s>", "<image>", "what", "is", "in", "the", "image", "?", "a", "photo", "of", "."] + CLASSES
W2I = {w: i for i, w in enumerate(VOCAB)}
IMG_ID = W2I["<image>"]
N_PATCH = 64
PROMPT = [W2I["<s>"]] + [IMG_ID] * N_PATCH + [W2I[w] for w in "what is in the image ?".split()]
MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
CACHE = Path(os.environ.get("PRUNEKIT_CACHE", Path.home() / ".cache" / "prunekit")) / "fopru_cifar_llava"


def answer_ids(c: int) -> list[int]:
    return [W2I[w] for w in ["a", "photo", "of", "a", CLASSES[c], "."]] + [W2I["</s>"]]


def data_dir() -> Path:
    env = os.environ.get("PRUNEKIT_DATA")
    if env:
        return Path(env)
    for cand in (ROOT.parent / "shared" / "data", ROOT.parent.parent / "shared" / "data"):
        if cand.is_dir():
            return cand
    return ROOT.parent / "shared" / "data"


def load_shards(paths, limit=None):
    """Decode webdataset CIFAR shards -> uint8 (n, 32, 32, 3), int64 labels."""
    from PIL import Image

    imgs, labels = [], []
    for p in paths:
        cur = {}
        with tarfile.open(p) as tf:
            for m in tf:
                key, ext = m.name.rsplit(".", 1)
                if ext not in ("jpg", "cls"):
                    continue
                data = tf.extractfile(m).read()
                cur.setdefault(key, {})[ext] = data
                if len(cur[key]) == 2:
                    d = cur.pop(key)
                    imgs.append(np.asarray(Image.open(io.BytesIO(d["jpg"])).convert("RGB")))
                    labels.append(int(d["cls"].decode().strip()))
                    if limit and len(imgs) >= limit:
                        break
        if limit and len(imgs) >= limit:
            break
    return np.stack(imgs), np.asarray(labels, dtype=np.int64)


def to_pixels(x_u8: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(x_u8).permute(0, 3, 1, 2).float() / 255.0
    return (x - MEAN) / STD


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop (pad 4) + horizontal flip, vectorised."""
    b = x.shape[0]
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    pad = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dx, dy = torch.randint(0, 9, (2,), generator=gen).tolist()  # one shift per batch: cheap
    return pad[:, :, dy : dy + 32, dx : dx + 32]


def stage_a_draws(n: int, vis_steps: int, batch: int) -> np.ndarray:
    """Indices stage A draws (replays its generator calls exactly, see :func:`train`)."""
    gen = torch.Generator().manual_seed(0)
    seen = np.zeros(n, dtype=bool)
    for _ in range(vis_steps):
        seen[torch.randint(0, n, (batch,), generator=gen).numpy()] = True
        torch.rand(batch, generator=gen)  # augment(): flips
        torch.randint(0, 9, (2,), generator=gen)  # augment(): crop offset
    return seen


def build_model(attn="sdpa"):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vc = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=32,
        patch_size=4,
        projection_dim=64,
    )
    tc = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(VOCAB),
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    cfg = LlavaConfig(
        vision_config=vc,
        text_config=tc,
        image_token_id=IMG_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=0,
    )
    m = LlavaForConditionalGeneration._from_config(cfg, attn_implementation=attn)
    m.generation_config.pad_token_id = 0
    m.generation_config.eos_token_id = 2
    m.generation_config.bos_token_id = 1
    return m


def train(
    model,
    x_tr,
    y_tr,
    *,
    vis_steps,
    llm_steps,
    llm_pool,
    batch,
    llm_batch,
    log,
    vision_cache=None,
    reuse_vision=True,
    vis_pool=None,
    token_dropout=0.0,
):
    gen = torch.Generator().manual_seed(0)
    tower = model.model.vision_tower
    if reuse_vision and vision_cache is not None and vision_cache.exists():
        from safetensors.torch import load_file

        tower.load_state_dict(load_file(str(vision_cache)))
        log(f"  stage A skipped: vision tower loaded from {vision_cache}")
        vis_steps = 0
    d = tower.config.hidden_size
    head = torch.nn.Linear(d, 10)
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=max(vis_steps, 1), pct_start=0.15)
    n = len(x_tr) if vis_pool is None else len(vis_pool)
    t0 = time.time()
    tower.train()
    for step in range(vis_steps):
        idx = torch.randint(0, n, (batch,), generator=gen)
        if vis_pool is not None:  # draw only from this pool (held-out images excluded)
            idx = torch.from_numpy(vis_pool[idx.numpy()])
        x = augment(to_pixels(x_tr[idx.numpy()]), gen)
        logits = head(tower(pixel_values=x).pooler_output)
        loss = F.cross_entropy(logits, torch.from_numpy(y_tr[idx.numpy()]), label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 20 == 0 or step == vis_steps - 1:
            acc = (logits.argmax(-1).numpy() == y_tr[idx.numpy()]).mean()
            log(
                f"  vision step {step}/{vis_steps} loss {loss.item():.3f} batch acc {acc:.2f} ({time.time() - t0:.0f}s)"
            )
    tower.eval()
    for p in tower.parameters():
        p.requires_grad_(False)
    if vision_cache is not None and vis_steps:
        from safetensors.torch import save_file

        vision_cache.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tower.state_dict().items()}, str(vision_cache))

    # stage B: projector + LLM on the frozen tower's layer -2 features. The tower is frozen,
    # so its features are computed once (no augmentation) and reused: the loss is exactly the
    # model's forward (projector -> placeholder scatter -> LLM -> lm_head).
    x_b, y_b = x_tr[llm_pool], y_tr[llm_pool]
    n_b = len(llm_pool)
    feats = []
    t0 = time.time()
    with torch.no_grad():
        for s in range(0, n_b, 256):
            out = model.get_image_features(pixel_values=to_pixels(x_b[s : s + 256]), return_dict=True)
            feats.append(out.hidden_states[model.config.vision_feature_layer][:, 1:].clone())
    feats = torch.cat(feats)
    log(f"  cached layer-2 features of {n_b} images ({time.time() - t0:.0f}s)")
    lm = [model.model.multi_modal_projector, model.model.language_model, model.lm_head]
    params = [p for mod in lm for p in mod.parameters()]
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=max(llm_steps, 1), pct_start=0.1)
    prompt = torch.tensor(PROMPT)
    embed = model.get_input_embeddings()
    for m_ in lm:
        m_.train()
    t0 = time.time()
    for step in range(llm_steps):
        idx = torch.randint(0, n_b, (llm_batch,), generator=gen)
        ans = torch.tensor([answer_ids(int(c)) for c in y_b[idx.numpy()]])
        ids = torch.cat([prompt.expand(llm_batch, -1), ans], 1)
        img = model.model.multi_modal_projector(feats[idx])
        emb = embed(ids).masked_scatter((ids == IMG_ID)[..., None], img)
        if token_dropout > 0:  # random visual tokens removed (masked out, positions compacted)
            kept = visual_token_dropout(llm_batch, N_PATCH, token_dropout, gen)
            am, pos = masked_prompt_layout(ids, kept)
            hid = model.model.language_model(inputs_embeds=emb, attention_mask=am, position_ids=pos).last_hidden_state
        else:
            hid = model.model.language_model(inputs_embeds=emb).last_hidden_state
        logits = model.lm_head(hid[:, len(PROMPT) - 1 : -1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ans.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == llm_steps - 1:
            log(f"  llm step {step}/{llm_steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    model.eval()
    return model


def visual_token_dropout(b: int, n: int, p: float, gen: torch.Generator, min_keep: float = 0.05) -> torch.Tensor:
    """Training-time visual-token dropout mask, ``(b, n)`` bool (True = token kept).

    Each sample is dropped out with probability ``p``; a dropped-out sample keeps
    ``K = round(f * n)`` (at least 1) of its ``n`` visual tokens, ``f`` log-uniform in
    ``[min_keep, 1]``, the K chosen uniformly at random (no FoPru/FastV scores involved, so the
    training favours no selection method). Other samples keep all ``n``.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"token-dropout probability must be in [0, 1], got {p}")
    drop = torch.rand(b, generator=gen) < p
    frac = torch.exp(torch.rand(b, generator=gen) * math.log(min_keep))
    k = torch.where(drop, (frac * n).round().clamp(1, n), torch.full((b,), float(n)))
    rank = torch.rand(b, n, generator=gen).argsort(1).argsort(1)  # a uniform random permutation per row
    return rank < k[:, None]


def masked_prompt_layout(ids: torch.Tensor, kept: torch.Tensor):
    """Attention mask and position ids that make a fixed-length sequence equal to the shrunk one.

    ``ids``: ``(B, L)`` token ids with one run of ``n`` image placeholders per row; ``kept``:
    ``(B, n)`` bool. Returns ``(attention_mask (B, L), position_ids (B, L))``: dropped placeholders
    are masked out as keys and the others are numbered consecutively, so every kept or text token
    sees exactly what it would see if the dropped placeholders were removed from the prompt (what
    :func:`tokenprune.fopru.fopru_generate` does at inference). Vectorised, fixed shapes.
    """
    img = ids == IMG_ID
    if int(img.sum()) != kept.numel():
        raise ValueError(f"{int(img.sum())} image placeholders but a keep mask of shape {tuple(kept.shape)}")
    mask = torch.ones_like(ids).masked_scatter(img, kept.to(ids.dtype))
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    return mask, pos


def fastv_indices(model_eager, ids, pv, k, layer=2):
    """FastV criterion: head-mean attention of the last prompt token at LLM layer ``layer``."""
    with torch.no_grad():
        out = model_eager(input_ids=ids, pixel_values=pv, output_attentions=True)
    att = out.attentions[layer][:, :, -1, :].mean(1)  # (B, L)
    img = ids == IMG_ID
    s = att[img].view(ids.shape[0], -1)
    return [torch.sort(torch.topk(r, k).indices).values for r in s]


def evaluate(model, model_eager, x_te, y_te, keeps, *, batch, log, per_image=None):
    """Class accuracy (%) per selection and keep level; ``per_image`` (a dict), if given, receives
    each cell's 0/1 correctness per held-out image (for paired standard errors)."""
    ids_all = torch.tensor(PROMPT).expand(len(x_te), -1)
    cls_ids = torch.tensor([W2I[c] for c in CLASSES])
    methods = ["fopru-rank", "fopru-row(rows)", "fopru-row(per_row)", "random", "fastv-style"]
    res = {m: {} for m in methods}
    gen = torch.Generator().manual_seed(123)
    for keep in keeps:
        k = max(1, int(round(keep * N_PATCH)))
        for meth in methods:
            if k == N_PATCH and meth != methods[0]:  # keep=100%: every selection is the same
                res[meth][keep] = res[methods[0]][keep]
                if per_image is not None:
                    per_image.setdefault(meth, {})[keep] = per_image[methods[0]][keep]
                continue
            correct = 0
            hits = []
            for s in range(0, len(x_te), batch):
                pv = to_pixels(x_te[s : s + batch])
                ids = ids_all[s : s + batch]
                inp = {"input_ids": ids, "pixel_values": pv, "attention_mask": torch.ones_like(ids)}
                kw = dict(keep=k, max_new_tokens=6, do_sample=False, restore_prompt=False)
                if meth == "fopru-rank":
                    out = fopru_generate(model, inp, strategy="rank", **kw).sequences
                elif meth.startswith("fopru-row"):
                    mode = "rows" if "(rows)" in meth else "per_row"
                    out = fopru_generate(model, inp, strategy="row", row_mode=mode, **kw).sequences
                elif meth == "random":
                    kept = [torch.sort(torch.randperm(N_PATCH, generator=gen)[:k]).values for _ in range(len(ids))]
                    out = fopru_generate(model, inp, kept_indices=kept, **kw).sequences
                else:
                    kept = fastv_indices(model_eager, ids, pv, k)
                    out = fopru_generate(model, inp, kept_indices=kept, **kw).sequences
                new = out[:, -6:]
                pred_tok = new[:, 4]
                match = pred_tok[:, None] == cls_ids[None]
                pred = torch.where(match.any(1), match.float().argmax(1), torch.full_like(pred_tok, -1))
                hit = pred.numpy() == y_te[s : s + batch]
                hits.append(hit)
                correct += int(hit.sum())
            res[meth][keep] = 100.0 * correct / len(x_te)
            if per_image is not None:
                per_image.setdefault(meth, {})[keep] = np.concatenate(hits).astype(int).tolist()
        log(f"  keep {keep:.2f} (K={k}): " + ", ".join(f"{m} {res[m][keep]:.1f}" for m in methods))
    return res


def paired_differences(per_image: dict, keeps) -> dict:
    """``{method: {keep: (d_full, se_full, d_random, se_random)}}`` in points: each cell minus the
    unpruned accuracy and minus random selection at the same keep, with the paired standard error
    (std of the per-image 0/1 differences / sqrt(n)) — the same images are scored by every cell."""
    full = np.asarray(per_image["fopru-rank"][1.0], dtype=float)
    out = {}
    for meth, row in per_image.items():
        out[meth] = {}
        for keep in keeps:
            a = np.asarray(row[keep], dtype=float)
            cells = []
            for ref in (full, np.asarray(per_image["random"][keep], dtype=float)):
                d = a - ref
                se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
                cells += [100.0 * d.mean(), 100.0 * se]
            out[meth][keep] = tuple(cells)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="few steps, few images (smoke test)")
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-train", type=int, default=40000)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--vis-steps", type=int, default=170)
    ap.add_argument("--llm-steps", type=int, default=250)
    ap.add_argument("--llm-images", type=int, default=10000)
    ap.add_argument("--batch", type=int, default=128, help="vision-stage batch")
    ap.add_argument("--llm-batch", type=int, default=64)
    ap.add_argument("--retrain-vision", action="store_true")
    ap.add_argument(
        "--holdout-first",
        action="store_true",
        help="pick the held-out images first and exclude them from stage A's draws "
        "(needed when stage A draws every image, i.e. many vision steps)",
    )
    ap.add_argument(
        "--token-dropout",
        type=float,
        default=0.0,
        metavar="P",
        help="testbed choice: in stage B, with probability P a training sample keeps only a "
        "uniformly random subset of its visual tokens (keep fraction log-uniform in "
        "[0.05, 1]), so the LLM has seen prompts with tokens removed (default 0: off)",
    )
    ap.add_argument("--json", type=str, default=None, help="write results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    log = lambda s: print(s, flush=True)  # noqa: E731
    shards = sorted((data_dir() / "cifar10").glob("cifar10-train-*.tar"))
    if len(shards) < 2:
        raise SystemExit(f"CIFAR-10 shards not found under {data_dir() / 'cifar10'} (set PRUNEKIT_DATA)")
    if args.quick:
        args.n_train, args.n_test, args.vis_steps, args.llm_steps, args.batch = 512, 64, 3, 3, 32
        args.llm_images, args.llm_batch = 256, 32
    if not 0.0 <= args.token_dropout <= 1.0:
        raise SystemExit(f"--token-dropout must be in [0, 1], got {args.token_dropout}")
    t0 = time.time()
    # CIFAR shards are grouped by class (2 classes per shard): shards 0-3 = classes 0-7 are used.
    # Held-out: random images that stage A never draws (replayed; or, with --holdout-first, excluded
    # from its draws) and stage B excludes.
    x_all, y_all = load_shards(shards[:-1] if not args.quick else shards[:1], limit=args.n_train)
    rng = np.random.default_rng(0)
    if args.holdout_first:
        test_idx = rng.permutation(len(x_all))[: args.n_test]
        pool = np.setdiff1d(np.arange(len(x_all)), test_idx)
    else:
        seen = stage_a_draws(len(x_all), args.vis_steps, args.batch)
        test_idx = rng.permutation(np.flatnonzero(~seen))[: args.n_test]
        pool = np.setdiff1d(np.arange(len(x_all)), test_idx)
    llm_pool = rng.permutation(pool)[: args.llm_images]
    x_te, y_te = x_all[test_idx], y_all[test_idx]
    log(
        f"data: {len(x_all)} images of classes {sorted(set(y_all.tolist()))}, {len(test_idx)} held out "
        f"({time.time() - t0:.0f}s)"
    )
    model = build_model()
    cache = CACHE / "model.safetensors"
    if cache.exists() and not args.retrain and not args.quick:
        from safetensors.torch import load_file

        meta = json.loads((CACHE / "meta.json").read_text())
        cached_drop = meta.get("args", {}).get("token_dropout", 0.0)
        if cached_drop != args.token_dropout:
            raise SystemExit(
                f"cached model in {CACHE} was trained with --token-dropout {cached_drop}, "
                f"not {args.token_dropout}: pass --retrain or another PRUNEKIT_CACHE"
            )
        model.load_state_dict(load_file(str(cache)))
        model.eval()
        log(f"loaded cached weights from {cache}")
        train_s = meta.get("train_s", float("nan"))
    else:
        t1 = time.time()
        train(
            model,
            x_all,
            y_all,
            vis_steps=args.vis_steps,
            llm_steps=args.llm_steps,
            llm_pool=llm_pool,
            batch=args.batch,
            llm_batch=args.llm_batch,
            log=log,
            vision_cache=None if args.quick else CACHE / "vision_tower.safetensors",
            reuse_vision=not args.retrain_vision,
            vis_pool=pool if args.holdout_first else None,
            token_dropout=args.token_dropout,
        )
        train_s = time.time() - t1
        if not args.quick:
            from safetensors.torch import save_file

            CACHE.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(cache))
            (CACHE / "meta.json").write_text(json.dumps({"train_s": train_s, "args": vars(args)}))
        log(f"trained in {train_s:.0f}s")
    eager = build_model(attn={"text_config": "eager", "vision_config": "sdpa", "": "sdpa"})
    eager.load_state_dict(model.state_dict())
    eager.eval()
    keeps = [1.0, 0.5, 0.25, 0.1, 0.05]
    per_image: dict = {}
    res = evaluate(model, eager, x_te, y_te, keeps, batch=250 if not args.quick else 32, log=log, per_image=per_image)
    print()
    print(
        f"Tiny LLaVA on CIFAR-10 classes 0-7 (trained {train_s:.0f}s on CPU, stage-B token dropout "
        f"{args.token_dropout}), class accuracy (%) from generated text, {len(x_te)} held-out images, "
        f"64 visual tokens"
    )
    print()
    print("| selection | " + " | ".join(f"keep {int(k * 100)}% (K={max(1, round(k * N_PATCH))})" for k in keeps) + " |")
    print("|---|" + "---|" * len(keeps))
    for m, r in res.items():
        print(f"| {m} | " + " | ".join(f"{r[k]:.1f}" for k in keeps) + " |")
    diffs = paired_differences(per_image, keeps[1:])
    print()
    print("Difference in points to unpruned / to random selection at the same keep (paired standard error):")
    print()
    print("| selection | " + " | ".join(f"keep {int(k * 100)}%" for k in keeps[1:]) + " |")
    print("|---|" + "---|" * (len(keeps) - 1))
    for m, r in diffs.items():
        print(
            f"| {m} | "
            + " | ".join(f"{r[k][0]:+.1f} ({r[k][1]:.1f}) / {r[k][2]:+.1f} ({r[k][3]:.1f})" for k in keeps[1:])
            + " |"
        )
    if args.json:
        out = {m: {str(k): v for k, v in r.items()} for m, r in res.items()}
        out["per_image"] = {m: {str(k): v for k, v in r.items()} for m, r in per_image.items()}
        out["token_dropout"] = args.token_dropout
        Path(args.json).write_text(json.dumps(out))
    return res


if __name__ == "__main__":
    main()
