"""The trained-tiny-LLaVA accuracy testbed (benchmarks/fopru_cifar_llava.py): its stage-B
visual-token dropout must equal removing the tokens from the prompt (what FoPru does at
inference), choose subsets uniformly, and the quick mode must run end to end."""

import importlib.util
from pathlib import Path

import pytest
import torch

PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "fopru_cifar_llava.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("fopru_cifar_llava_bench", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _batch(bench, b):
    prompt = torch.tensor(bench.PROMPT)
    ans = torch.tensor([bench.answer_ids(c % 8) for c in range(b)])
    return torch.cat([prompt.expand(b, -1), ans], 1), ans


def test_dropout_mask_counts_and_uniformity(bench):
    n = bench.N_PATCH
    gen = torch.Generator().manual_seed(0)
    assert bench.visual_token_dropout(16, n, 0.0, gen).all()
    kept = bench.visual_token_dropout(4000, n, 1.0, gen)
    k = kept.sum(1)
    assert kept.shape == (4000, n)
    assert int(k.min()) >= round(0.05 * n) and int(k.max()) <= n
    assert float((k < n).float().mean()) > 0.9  # p=1: (nearly) every sample loses tokens
    # log-uniform keep fraction in [0.05, 1]: P(f < 0.25) = log(0.25/0.05)/log(1/0.05) ~ 0.54
    frac_low = float((k < 0.25 * n).float().mean())
    assert 0.45 < frac_low < 0.6
    # positions chosen uniformly: given K, each position is kept with probability K/n
    rate = kept.float().sum(0) / k.float().sum()
    assert torch.allclose(rate, torch.full((n,), 1.0 / n), atol=0.25 / n)
    mixed = bench.visual_token_dropout(4000, n, 0.5, gen).sum(1)
    assert 0.45 < float((mixed == n).float().mean()) < 0.56
    with pytest.raises(ValueError, match="probability"):
        bench.visual_token_dropout(2, n, 1.5, gen)


def test_masked_layout_equals_removed_tokens(bench):
    """Brute force: per sample, delete the dropped placeholders and run the LLM on the shorter
    prompt; the masked fixed-length forward must give the same answer logits."""
    torch.manual_seed(0)
    model = bench.build_model().eval()
    b, n = 4, bench.N_PATCH
    ids, _ = _batch(bench, b)
    kept = bench.visual_token_dropout(b, n, 1.0, torch.Generator().manual_seed(3))
    kept[0] = True  # one full sample
    feats = torch.randn(b, n, model.config.vision_config.hidden_size)
    with torch.no_grad():
        emb = model.get_input_embeddings()(ids).masked_scatter(
            (ids == bench.IMG_ID)[..., None], model.model.multi_modal_projector(feats)
        )
        am, pos = bench.masked_prompt_layout(ids, kept)
        hid = model.model.language_model(inputs_embeds=emb, attention_mask=am, position_ids=pos).last_hidden_state
        logits = model.lm_head(hid[:, len(bench.PROMPT) - 1 : -1])
        for i in range(b):
            cols = torch.ones(ids.shape[1], dtype=torch.bool)
            cols[ids[i] == bench.IMG_ID] = kept[i]
            ref_hid = model.model.language_model(inputs_embeds=emb[i : i + 1, cols]).last_hidden_state
            start = 1 + int(kept[i].sum()) + 6 - 1  # <s>, K images, 6 question words
            ref = model.lm_head(ref_hid[0, start:-1])
            assert torch.allclose(logits[i], ref, atol=1e-5), i
    assert int(am.sum()) == ids.numel() - int((~kept).sum())
    with pytest.raises(ValueError, match="placeholders"):
        bench.masked_prompt_layout(ids, kept[:, :10])


def test_masked_layout_matches_fopru_generate(bench):
    """The first answer token under the training layout equals what fopru_generate produces
    with the same kept indices (the inference path the benchmark evaluates)."""
    from tokenprune.fopru import fopru_generate

    torch.manual_seed(1)
    model = bench.build_model().eval()
    b, n = 3, bench.N_PATCH
    pv = torch.randn(b, 3, 32, 32)
    ids = torch.tensor(bench.PROMPT).expand(b, -1)
    kept = torch.zeros(b, n, dtype=torch.bool)
    kept_idx = [torch.arange(0, n, 4), torch.arange(n // 2, n), torch.tensor([5, 17, 40])]
    for i, k in enumerate(kept_idx):
        kept[i, k] = True
    with torch.no_grad():
        out = model.get_image_features(pixel_values=pv, return_dict=True)
        feats = out.hidden_states[model.config.vision_feature_layer][:, 1:]
        emb = model.get_input_embeddings()(ids).masked_scatter(
            (ids == bench.IMG_ID)[..., None], model.model.multi_modal_projector(feats)
        )
        am, pos = bench.masked_prompt_layout(ids, kept)
        hid = model.model.language_model(inputs_embeds=emb, attention_mask=am, position_ids=pos).last_hidden_state
        first = model.lm_head(hid[:, -1]).argmax(-1)
    for i in range(b):
        inp = {
            "input_ids": ids[i : i + 1],
            "pixel_values": pv[i : i + 1],
            "attention_mask": torch.ones_like(ids[i : i + 1]),
        }
        seq = fopru_generate(
            model,
            inp,
            keep=len(kept_idx[i]),
            kept_indices=[kept_idx[i]],
            max_new_tokens=1,
            do_sample=False,
            restore_prompt=False,
        ).sequences
        assert int(seq[0, -1]) == int(first[i])


@pytest.mark.slow
def test_quick_mode_with_token_dropout(bench, shared_data, monkeypatch, tmp_path):
    import json

    monkeypatch.setenv("PRUNEKIT_DATA", str(shared_data))
    res = bench.main(["--quick", "--threads", "1", "--token-dropout", "0.5", "--json", str(tmp_path / "r.json")])
    assert set(res) == {"fopru-rank", "fopru-row(rows)", "fopru-row(per_row)", "random", "fastv-style"}
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["token_dropout"] == 0.5
    for meth, row in res.items():
        assert set(row) == {1.0, 0.5, 0.25, 0.1, 0.05}
        assert all(0.0 <= v <= 100.0 for v in row.values())
        for keep, acc in row.items():
            hits = saved["per_image"][meth][str(keep)]
            assert len(hits) == 64 and set(hits) <= {0, 1}
            assert abs(100.0 * sum(hits) / 64 - acc) < 1e-9
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--token-dropout", "2"])


def test_paired_differences(bench):
    import math

    full = [1, 1, 0, 1, 0, 1]
    rnd = [1, 0, 0, 1, 0, 0]
    meth = [0, 1, 1, 1, 0, 0]
    per = {"fopru-rank": {1.0: full, 0.5: meth}, "random": {1.0: full, 0.5: rnd}}
    d = bench.paired_differences(per, [0.5])
    diffs = [m - f for m, f in zip(meth, full)]
    mean = sum(diffs) / 6
    se = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 5) / math.sqrt(6)
    assert d["fopru-rank"][0.5][0] == pytest.approx(100 * mean)
    assert d["fopru-rank"][0.5][1] == pytest.approx(100 * se)
    diffs_r = [m - r for m, r in zip(meth, rnd)]
    assert d["fopru-rank"][0.5][2] == pytest.approx(100 * sum(diffs_r) / 6)
    assert d["random"][0.5][2:] == (0.0, 0.0)
