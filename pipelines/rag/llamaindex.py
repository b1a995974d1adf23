"""LlamaIndex adapter: :class:`ProvencePostprocessor`, a ``BaseNodePostprocessor``.

Importing this module imports ``llama_index.core``::

    query_engine = index.as_query_engine(node_postprocessors=[ProvencePostprocessor(pruner="path/to/provence")])
"""

from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import NodeWithScore, QueryBundle

from .core import METADATA_KEYS, RETRIEVAL_SCORE_KEY, provence_metadata, retrieval_metadata
from .fields import ProvenceFields

__all__ = ["ProvencePostprocessor"]


class ProvencePostprocessor(ProvenceFields, BaseNodePostprocessor):
    """Provence context pruning + reranking as a LlamaIndex node postprocessor.

    Every returned node is a copy whose content is the pruned text and whose score is the
    reranking score (it wins); its metadata gains ``reranking_score``,
    ``provence_compression``, ``provence_kept_sentences`` and ``retrieval_score`` (the
    retriever's score, when the node had one and its metadata holds no earlier one), all
    excluded from the LLM and embedding text. ``to_dict`` /
    ``from_dict`` and pickle work (the pruner is serialised as the folder it was loaded from).
    """

    @classmethod
    def class_name(cls) -> str:
        return "ProvencePostprocessor"

    def translate(self, nodes: list[NodeWithScore], rows: list[dict]) -> list[NodeWithScore]:
        """Rows of :meth:`prune` -> pruned copies of the input nodes, scored by reranking score."""
        out = []
        for r in rows:
            node = nodes[r["index"]].node.model_copy(deep=True)
            node.set_content(r["pruned_context"])
            node.metadata.update(retrieval_metadata(node.metadata, nodes[r["index"]].score))
            node.metadata.update(provence_metadata(r))
            for excluded in (node.excluded_llm_metadata_keys, node.excluded_embed_metadata_keys):
                excluded.extend(k for k in (*METADATA_KEYS, RETRIEVAL_SCORE_KEY) if k not in excluded)
            out.append(NodeWithScore(node=node, score=r["reranking_score"]))
        return out

    @staticmethod
    def query_of(query_bundle: QueryBundle | None) -> str:
        if query_bundle is None:
            raise ValueError("ProvencePostprocessor needs a query: pass query_bundle or query_str")
        return query_bundle.query_str

    def _postprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        rows = self.prune(self.query_of(query_bundle), [n.node.get_content() for n in nodes])
        return self.translate(nodes, rows)

    async def _apostprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        rows = await self.aprune(self.query_of(query_bundle), [n.node.get_content() for n in nodes])
        return self.translate(nodes, rows)
