"""The vLLM plugin's LLaVA math without vLLM: the CLS row recomputed from q and k is the
transformers runtime's, and each image's placeholder count is the one budget rule."""

from __future__ import annotations

import pytest
import torch

from pipelines.vllm_plugin.llava_scores import LLAVA_METHODS, cls_attention_rows, feature_prefix, kept_run_length
from pipelines.vllm_plugin.options import OptionError, read_options
from prunecore.budget import keep_count
from tokenprune.fopru.capture import AttentionRowCapture
from tokenprune.fopru.core import fopru_scores


def test_cls_rows_equal_the_cls_row_of_the_full_attention_map():
    torch.manual_seed(0)
    b, n, heads, d = 2, 10, 3, 8
    q, k = torch.randn(b, n, heads * d), torch.randn(b, n, heads * d)
    qh = q.view(b, n, heads, d).transpose(1, 2)
    kh = k.view(b, n, heads, d).transpose(1, 2)
    full = torch.softmax(qh @ kh.transpose(-1, -2) * d**-0.5, dim=-1)  # (B, heads, N, N)
    rows = cls_attention_rows(q, k, heads, d**-0.5)
    assert rows.shape == (b, heads, n)
    torch.testing.assert_close(rows, full[:, :, 0])
    torch.testing.assert_close(fopru_scores(rows, method="cls"), fopru_scores(full, method="cls"))
    attn = torch.nn.Module()
    attn.q_proj, attn.k_proj, attn.num_heads, attn.scale = torch.nn.Identity(), torch.nn.Identity(), heads, None
    transformers_rows = AttentionRowCapture(attn, method="cls").compute_rows(q, k)
    torch.testing.assert_close(rows, transformers_rows)


def test_kept_run_length_is_keep_count_of_the_patches_plus_the_cls_feature():
    assert kept_run_length(576, 576, 0.25) == keep_count(576, 0.25) == 144
    assert kept_run_length(577, 576, 0.25) == 145  # strategy "full": the CLS feature stays
    assert kept_run_length(576, 576, 1.0) == 576
    assert kept_run_length(576, 576, 1000) == 576  # an int count above n keeps every patch
    assert kept_run_length(576, 576, 0.0001) == 1  # an image always keeps one token


def test_feature_prefix_refuses_a_strategy_without_patches():
    class Config:
        vision_feature_select_strategy = "class"

    with pytest.raises(ValueError, match="vision_feature_select_strategy='class'.*drop the prunekit option"):
        feature_prefix(Config())
    Config.vision_feature_select_strategy = "full"
    assert feature_prefix(Config()) == 1


def test_llava_options_default_to_the_cls_rule_and_refuse_colmean():
    class Config:
        prunekit = {"keep": 0.25}

    assert read_options(Config(), methods=LLAVA_METHODS).method == "cls"
    assert read_options(Config()).method == "colmean"  # the Qwen-VL towers' default is unchanged
    Config.prunekit = {"keep": 0.25, "method": "colmean"}
    with pytest.raises(OptionError, match=r"method='colmean' is not supported.*use one of \['cls'\]"):
        read_options(Config(), methods=LLAVA_METHODS)
