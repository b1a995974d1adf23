"""The Provence model: an encoder with a ranking head and a per-token keep head.

:class:`ProvenceModel` wraps ``AutoModelForSequenceClassification`` (``num_labels=1``: the
backbone, its pooler of the first token and the ``classifier`` ranking head, exactly as each
architecture defines them) and adds ``token_classifier`` (hidden -> 2) on the last hidden state.
Any transformers encoder works: DeBERTa-v2/v3, BERT/MiniLM, RoBERTa, ModernBERT... Its weights
map to and from the released layouts (naver, OpenProvence, prunekit) here; reading and writing
folders is :mod:`tokenprune.provence.checkpoint`.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from prunecore.models import load_transformers

__all__ = ["ProvenceModel", "rebuild_provence_model"]

_IGNORED_KEY_SUFFIXES = ("position_ids", "num_batches_tracked")


class ProvenceModel(nn.Module):
    """Cross-encoder with a ranking head and a per-token keep head.

    ``forward(input_ids (B,T), attention_mask (B,T), token_type_ids=None)`` returns
    ``(rank_logits (B,), token_logits (B, T, 2))``.
    """

    def __init__(self, config):
        super().__init__()
        from transformers import AutoModelForSequenceClassification

        config.num_labels = 1
        self.config = config
        self.ranker = AutoModelForSequenceClassification.from_config(config)
        self.token_classifier = nn.Linear(config.hidden_size, 2)

    @classmethod
    def from_encoder(cls, path: str | os.PathLike, **kwargs) -> ProvenceModel:
        """Start from a plain pretrained encoder folder (heads randomly initialised, fp32)."""
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(path), num_labels=1, trust_remote_code=False)
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model.config = config
        model.ranker = load_transformers(
            path, auto_class="AutoModelForSequenceClassification", device=None, dtype="fp32", config=config, **kwargs
        ).train()
        model.token_classifier = nn.Linear(config.hidden_size, 2)
        return model

    def __reduce__(self):
        """Pickle as config + weights (transformers 5 installs unpicklable forward hooks; the
        rebuilt model gets its own)."""
        if type(self) is not ProvenceModel:  # a subclass pickles the plain way
            return super().__reduce__()
        return rebuild_provence_model, (self.config, self.state_dict(), self.training)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        kwargs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "output_hidden_states": True,
            "return_dict": True,
        }
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        out = self.ranker(**kwargs)
        hidden = out.hidden_states[-1]
        head = self.token_classifier
        token_logits = head(hidden.to(head.weight.dtype))
        return out.logits.reshape(-1), token_logits

    # --- state dict in the released (naver) layout -------------------------------------
    def released_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under the naver/Provence key names (``deberta.*``/``bert.*``, ``classifier.*``,
        ``token_classifier.*``)."""
        sd = {k: v for k, v in self.ranker.state_dict().items()}
        for k, v in self.token_classifier.state_dict().items():
            sd[f"token_classifier.{k}"] = v
        return sd

    def load_released_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load weights in the naver, OpenProvence or prunekit layout; raise a ValueError naming
        missing/unexpected keys otherwise."""
        mapped = {}
        for key, value in state.items():
            if key.startswith("ranking_model."):
                key = "ranker." + key[len("ranking_model.") :]
            elif key.startswith("pruning_head.classifier."):
                key = "token_classifier." + key[len("pruning_head.classifier.") :]
            elif key.startswith("pruning_head."):
                key = "unsupported_pruning_head." + key[len("pruning_head.") :]
            elif not key.startswith("token_classifier."):
                key = "ranker." + key
            mapped[key] = value
        own = self.state_dict()
        missing = sorted(k for k in own if k not in mapped and not k.endswith(_IGNORED_KEY_SUFFIXES))
        unexpected = sorted(k for k in mapped if k not in own and not k.endswith(_IGNORED_KEY_SUFFIXES))
        shape_bad = sorted(k for k in mapped if k in own and own[k].shape != mapped[k].shape)
        if missing or unexpected or shape_bad:

            def show(keys):
                return ", ".join(keys[:12]) + (f" ... (+{len(keys) - 12})" if len(keys) > 12 else "")

            raise ValueError(
                "checkpoint does not match a Provence model for this config: "
                f"missing keys [{show(missing)}]; unexpected keys [{show(unexpected)}]; "
                f"shape mismatches [{show(shape_bad)}]"
            )
        self.load_state_dict({k: v for k, v in mapped.items() if k in own}, strict=False)


def rebuild_provence_model(config, state: dict[str, torch.Tensor], training: bool) -> ProvenceModel:
    """Unpickle a :class:`ProvenceModel`: same config, weights, dtype, device and mode."""
    model = ProvenceModel(config)
    first = next(iter(state.values()))
    model.to(device=first.device, dtype=first.dtype)
    model.load_state_dict(state)
    return model.train(training)
