"""What ``tokenprune.FoPru`` (the transformers runtime) keeps for the test images.

Run with the project's main environment (transformers >= 5.24): python tests_vllm/fopru_reference.py
FOLDER KEEP [FAMILY] (``qwen3_vl``: Qwen3-VL's image sizes; default Qwen2.5-VL's). Prints a
JSON list: per image, its kept merged-token indices (raster order).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from images import PROMPT, SIZES, SIZES_QWEN3, make_images  # noqa: E402


def main() -> None:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from tokenprune import FoPru

    folder, keep = sys.argv[1], float(sys.argv[2])
    sizes = SIZES_QWEN3 if sys.argv[3:] == ["qwen3_vl"] else SIZES
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder)
    kept = []
    for image in make_images(sizes=sizes):
        enc = processor(text=[PROMPT], images=[image], return_tensors="pt")
        with FoPru(model, keep=keep) as fopru, torch.no_grad():
            model(**enc)
        kept += [k.tolist() for k in fopru.stats.extras["kept_indices"]]
    print(json.dumps(kept))


if __name__ == "__main__":
    main()
