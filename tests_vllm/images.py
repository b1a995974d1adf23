"""The test images: two random RGB images of different sizes (merged grids 4x6 and 8x4)."""

from __future__ import annotations

import numpy as np
from PIL import Image

SIZES = [(112, 168), (224, 112)]  # (height, width) in pixels; patch 14, merge 2
SIZES_QWEN3 = [(128, 192), (256, 128)]  # the same merged grids with Qwen3-VL's patch 16
PROMPT = "Hello <|vision_start|><|image_pad|><|vision_end|> what"


def make_images(seed: int = 0, sizes: list[tuple[int, int]] = SIZES) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for h, w in sizes]
