"""Tar shard writers and sample sources of the shard-pipeline tests, and the tiny open_clip ViT
config (random weights, built from the config in process)."""

import io
import tarfile
from pathlib import Path

import numpy as np

from tests.helpers import shared_data_dir

TINY_VIT = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def source_samples(n: int) -> list[list[tuple[tarfile.TarInfo, bytes]]]:
    """n samples, each a list of (TarInfo, bytes) members: CIFAR-10 or generated PNGs."""
    data = shared_data_dir()
    cifar = data / "cifar10" / "cifar10-train-00000.tar" if data else None
    samples, current, key = [], [], None
    if cifar is not None and cifar.exists():
        with tarfile.open(cifar) as tar:
            for info in tar:
                k = info.name.split(".", 1)[0]
                if k != key and current:
                    samples.append(current)
                    current = []
                    if len(samples) == n:
                        break
                key = k
                current.append((info, tar.extractfile(info).read()))
        return samples
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        base = rng.integers(0, 255, size=(4, 4, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((32, 32), Image.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        members = []
        for ext, payload in (("png", buf.getvalue()), ("cls", str(i % 10).encode()), ("txt", f"image {i}".encode())):
            info = tarfile.TarInfo(f"gen_{i:06d}.{ext}")
            info.size, info.mtime = len(payload), 1_700_000_000
            members.append((info, payload))
        samples.append(members)
    return samples


def rename(members, key: str):
    out = []
    for info, data in members:
        new = tarfile.TarInfo(f"{key}.{info.name.split('.', 1)[1]}")
        new.size, new.mtime, new.mode = len(data), info.mtime, info.mode
        out.append((new, data))
    return out


def write_shard(path: Path, samples) -> None:
    with tarfile.open(path, "w") as tar:
        for members in samples:
            for info, data in members:
                tar.addfile(info, io.BytesIO(data))
