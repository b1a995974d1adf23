"""fopru_generate's result (one Generation), its deprecated tuple unpacking, loading from a folder,
and forward_passes = the language model's forward calls (the encoding count in extras)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration  # noqa: E402

from tokenprune import Generation  # noqa: E402
from tokenprune.fopru import FoPru, fopru_generate  # noqa: E402
from tokenprune.generation import decode_continuations  # noqa: E402

IMG, N = 99, 64
GEN = dict(max_new_tokens=4, do_sample=False)


class JoinTokenizer:
    """decode(ids) -> "i,j,k" (what a tokenizer's decode is asked for, made visible)."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return ",".join(str(i) for i in ids)


@pytest.fixture(scope="module")
def llava():
    torch.manual_seed(0)
    vc = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=4
    )
    tc = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        pad_token_id=0,
    )
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=IMG, vision_feature_layer=-2)
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = None  # every row runs max_new_tokens steps
    return model


def inputs():
    ids = torch.tensor([[1, 2] + [IMG] * N + [3, 4, 5], [1, 5] + [IMG] * N + [7, 8, 9]])
    pv = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "pixel_values": pv, "attention_mask": torch.ones_like(ids)}


def test_generation_result_matches_the_context_manager(llava):
    inp = inputs()
    res = fopru_generate(llava, inp, keep=0.25, **GEN)
    assert isinstance(res, Generation) and res.output is None and res.texts == []
    with FoPru(llava, keep=0.25) as fp:
        ref = llava.generate(**inp, **GEN)
    assert torch.equal(res.sequences, ref) and res.prompt_length == inp["input_ids"].shape[1]
    assert torch.equal(res.generated, ref[:, inp["input_ids"].shape[1] :]) and res.generated.shape == (2, 4)
    assert res.stats.as_dict().keys() == fp.stats.as_dict().keys()
    assert (res.stats.tokens_kept, res.stats.forward_passes) == (fp.stats.tokens_kept, fp.stats.forward_passes)
    texts = fopru_generate(llava, inp, tokenizer=JoinTokenizer(), keep=0.25, **GEN).texts
    assert texts == [",".join(map(str, row)) for row in res.generated.tolist()]


def test_forward_passes_count_language_model_calls(llava):
    st = fopru_generate(llava, inputs(), keep=8, **GEN).stats
    # prefill + 3 decode steps of the LLM; the vision tower ran once
    assert (st.forward_passes, st.extras["vision_encodings"], st.tokens_kept) == (4, 1, 16)
    with FoPru(llava, keep=8) as fp:
        llava(**inputs())
    assert (fp.stats.forward_passes, fp.stats.extras["vision_encodings"]) == (1, 1)
    assert not llava.get_decoder()._forward_pre_hooks  # the counting hook is removed


def test_deprecated_unpacking_keeps_the_old_values(llava):
    res = fopru_generate(llava, inputs(), keep=0.25, **GEN)
    with pytest.warns(DeprecationWarning, match="result.sequences"):
        out, st = res
    assert out is res.sequences and st is res.stats
    step = dict(GEN, output_logits=True, return_dict_in_generate=True)
    res = fopru_generate(llava, inputs(), keep=0.25, **step)
    assert torch.equal(res.sequences, res.output.sequences) and len(res.output.logits) == 4
    with pytest.warns(DeprecationWarning):
        out, _ = res
    assert out is res.output  # old callers still get generate's output object


def test_model_folder_loads_without_remote_code(llava, tmp_path):
    llava.save_pretrained(tmp_path / "llava")
    res = fopru_generate(str(tmp_path / "llava"), inputs(), keep=0.25, **GEN)
    assert torch.equal(res.sequences, fopru_generate(llava, inputs(), keep=0.25, **GEN).sequences)
    assert res.texts == []  # the folder ships no processor


def test_decode_continuations_cuts_at_the_first_eos():
    gen = torch.tensor([[5, 6, 2, 7, 2], [8, 9, 9, 9, 9]])
    assert decode_continuations(JoinTokenizer(), gen, [2, 3]) == ["5,6", "8,9,9,9,9"]
    assert decode_continuations(JoinTokenizer(), gen, []) == ["5,6,2,7,2", "8,9,9,9,9"]
