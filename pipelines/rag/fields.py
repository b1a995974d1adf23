"""The adapters' settings as documented pydantic fields, for the pydantic-based frameworks
(LangChain, LlamaIndex); importing it imports pydantic only.

The fields are generated from :class:`~pipelines.rag.core.ProvenceSettings` (names, types,
defaults and descriptions are declared there once) and every construction goes through
:func:`~pipelines.rag.core.build_settings`.
"""

import dataclasses
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model, field_serializer, model_validator

from .core import (
    DEPRECATED_SETTINGS,
    SETTING_NAMES,
    ProvenceAdapter,
    ProvenceSettings,
    budget_tokenizer_source,
    build_settings,
    load_pruner,
    pruner_source,
    settings_values,
)

__all__ = ["ProvenceFields", "pydantic_fields"]


def pydantic_fields() -> dict[str, tuple[Any, Any]]:
    """``{name: (type, Field(default, description))}`` of every :class:`ProvenceSettings` field."""
    hints = typing.get_type_hints(ProvenceSettings)
    return {
        f.name: (hints[f.name], Field(f.default, description=f.metadata["doc"]))
        for f in dataclasses.fields(ProvenceSettings)
    }


class ProvenceFieldsBase(ProvenceAdapter, BaseModel):
    """``pruner`` plus the plumbing of the generated settings fields (see :data:`ProvenceFields`).

    The pruner is loaded at construction (a folder or cached hub id becomes a ProvencePruner)
    and serialised (``model_dump``, ``to_dict``) as the folder it was loaded from; so is a
    ``budget_tokenizer`` (a callable one cannot be serialised, only pickled).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    pruner: Any = Field(description="ProvencePruner, or a model folder / cached hub id (loaded at construction)")

    @model_validator(mode="before")
    @classmethod
    def settings_through_build_settings(cls, data: Any) -> Any:
        """Build the settings part of the keyword values with :func:`build_settings` (checks
        ``keep``, maps the deprecated names to it); a name that is neither a setting nor a field
        of the framework's class raises build_settings' TypeError instead of being dropped."""
        if not isinstance(data, dict):
            return data
        names = set(SETTING_NAMES) | set(DEPRECATED_SETTINGS)
        settings = build_settings(**{k: v for k, v in data.items() if k in names or k not in cls.model_fields})
        return {**{k: v for k, v in data.items() if k not in names}, **settings_values(settings)}

    def model_post_init(self, context: Any, /) -> None:
        super().model_post_init(context)
        object.__setattr__(self, "pruner", load_pruner(self.pruner))

    @field_serializer("pruner")
    def serialize_pruner(self, pruner: Any) -> str:
        return pruner_source(pruner)

    @field_serializer("budget_tokenizer", check_fields=False)
    def serialize_budget_tokenizer(self, budget_tokenizer: Any) -> str | None:
        return budget_tokenizer_source(budget_tokenizer)


#: Pydantic fields of :class:`~pipelines.rag.core.ProvenceSettings` plus ``pruner``: the base
#: of the LangChain and LlamaIndex adapters.
ProvenceFields = create_model("ProvenceFields", __base__=ProvenceFieldsBase, __module__=__name__, **pydantic_fields())
