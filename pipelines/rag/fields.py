"""The adapters' settings as documented pydantic fields, for the pydantic-based frameworks
(LangChain, LlamaIndex); importing it imports pydantic only."""

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_serializer

from .core import DEFAULTS, ProvenceAdapter, budget_tokenizer_source, load_pruner, pruner_source

__all__ = ["ProvenceFields"]


class ProvenceFields(ProvenceAdapter, BaseModel):
    """Pydantic fields of :class:`~pipelines.rag.core.ProvenceSettings` plus ``pruner``.

    The pruner is loaded at construction (a folder or cached hub id becomes a ProvencePruner)
    and serialised (``model_dump``, ``to_dict``) as the folder it was loaded from; so is a
    ``budget_tokenizer`` (a callable one cannot be serialised, only pickled).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    pruner: Any = Field(description="ProvencePruner, or a model folder / cached hub id (loaded at construction)")
    threshold: float = Field(DEFAULTS.threshold, description="sentence rule threshold (Provence default 0.1)")
    title: str | None = Field(DEFAULTS.title, description="'first_sentence' (first sentence is the title) or None")
    always_select_title: bool = Field(DEFAULTS.always_select_title, description="keep the title iff another is kept")
    reorder: bool = Field(DEFAULTS.reorder, description="sort documents by reranking score, descending")
    top_k: int | None = Field(DEFAULTS.top_k, description="keep at most this many documents (None: all)")
    drop_empty: bool = Field(DEFAULTS.drop_empty, description="drop documents pruned to nothing")
    batch_size: int = Field(DEFAULTS.batch_size, description="(query, block) pairs per forward pass")
    target_tokens: int | None = Field(DEFAULTS.target_tokens, description="token budget per document (budget rule)")
    target_total_tokens: int | None = Field(
        DEFAULTS.target_total_tokens, description="token budget over all documents of the query (budget rule)"
    )
    target_ratio: float | None = Field(DEFAULTS.target_ratio, description="keep at most this share of each document")
    budget_tokenizer: Any = Field(
        DEFAULTS.budget_tokenizer,
        description="count budgets in the generator's tokens: a HF tokenizer, a tokenizer folder or text -> int",
    )

    def model_post_init(self, context: Any, /) -> None:
        super().model_post_init(context)
        object.__setattr__(self, "pruner", load_pruner(self.pruner))

    @field_serializer("pruner")
    def serialize_pruner(self, pruner: Any) -> str:
        return pruner_source(pruner)

    @field_serializer("budget_tokenizer")
    def serialize_budget_tokenizer(self, budget_tokenizer: Any) -> str | None:
        return budget_tokenizer_source(budget_tokenizer)
