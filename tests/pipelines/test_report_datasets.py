"""``prunekit report`` for Hugging Face dataset runs: the example and duplicate grids read
only the shown rows' images from the dataset (by row index); an embedding-column run or a
moved dataset gives a report with a note instead of grids."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest

from pipelines.datasets import recorded_image_cells
from pipelines.encoders import PixelProjectionEncoder
from pipelines.shards import report, run_filter

N, N_DUP, SIDE = 36, 4, 16


def png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def pixels() -> list[np.ndarray]:
    """N random images + N_DUP exact copies of earlier ones (duplicates for SemDeDup)."""
    rng = np.random.default_rng(0)
    base = [rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8) for _ in range(N)]
    return base + [base[5 * i] for i in range(N_DUP)]


@pytest.fixture(scope="module")
def dataset_dir(pixels, tmp_path_factory):
    import datasets

    rows = {"image": [png(p) for p in pixels], "uid": [f"u{i:02d}" for i in range(len(pixels))]}
    ds = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image(decode=False))
    path = tmp_path_factory.mktemp("ds") / "saved"
    ds.save_to_disk(str(path))
    return path


def quiet(**options) -> dict:
    steps = [{"method": "semdedup", "eps": 0.02}, {"method": "dbp", "keep": 0.5}]
    return {"clusters": 3, "steps": steps, "batch_size": 16, "progress": False, "log": lambda *_: None, **options}


@pytest.fixture(scope="module")
def run(dataset_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    return run_filter(
        None, out, **quiet(hf_dataset=str(dataset_dir), id_column="uid", encoder=PixelProjectionEncoder(dim=16))
    )


def embed_record(out) -> dict:
    return json.loads((out / "embed" / "_stage.json").read_text())


def test_recorded_image_cells_are_the_dataset_rows(run, pixels):
    rows = [0, 7, N + 1, 3]
    cells = recorded_image_cells(embed_record(run.out)["inputs"]["dataset"], "image", rows)
    assert sorted(cells) == sorted(rows)
    assert all(cells[r] == png(pixels[r]) for r in rows)


def test_report_grids_show_the_requested_kept_and_dropped_rows(run, pixels, monkeypatch):
    calls = []
    real = report.fetch_dataset_images

    def spy(record, keep, keys, limit_px=96):
        images, note = real(record, keep, keys, limit_px)
        calls.append((list(keys), images, note))
        return images, note

    monkeypatch.setattr(report, "fetch_dataset_images", spy)
    page = report.write_report(run.out).read_text()
    [(keys, images, note)] = calls
    assert note == ""
    assert set(images) == set(keys)  # every requested thumbnail was drawn
    keep = run.keep.set_index("key")
    assert keep.loc[keys, "kept"].any() and (~keep.loc[keys, "kept"]).any()
    assert (keep.loc[keys, "reason"] == "duplicate").any()
    for key in keys:  # the pixels of the row the key names (16x16: below the thumbnail size)
        assert np.array_equal(images[key], pixels[int(keep.loc[key, "index"])])
    for png_name in ("examples.png", "duplicates.png"):
        assert (run.out / "report" / png_name).stat().st_size > 0
        assert f"src='{png_name}'" in page


def test_moved_dataset_and_embedding_column_runs_render_with_a_note(run, dataset_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(run.out, out)
    moved = tmp_path / "moved"
    shutil.move(str(dataset_dir), moved)
    try:
        page = report.write_report(out).read_text()
    finally:
        shutil.move(str(moved), dataset_dir)
    assert "cannot be read again" in page and "is gone" in page
    assert not (out / "report" / "examples.png").exists() and "src='cluster_sizes.png'" in page

    record = embed_record(run.out)
    record["inputs"]["dataset"]["files"] = []  # a Dataset object held in memory: nothing to reopen
    images, note = report.fetch_dataset_images(record, run.keep, run.keep["key"].head(4).tolist())
    assert images == {} and "in-memory dataset" in note
    record["params"]["columns"] = {"embedding": "emb"}
    images, note = report.fetch_dataset_images(record, run.keep, run.keep["key"].head(4).tolist())
    assert images == {} and "embedding column" in note


def test_stream_runs_read_the_rows_again_from_the_files(dataset_dir, pixels, tmp_path):
    import datasets

    path = tmp_path / "data.parquet"
    datasets.load_from_disk(str(dataset_dir)).to_parquet(str(path))
    res = run_filter(
        None,
        tmp_path / "out",
        **quiet(hf_dataset=str(path), streaming=True, id_column="uid", encoder=PixelProjectionEncoder(dim=16)),
    )
    record = embed_record(res.out)["inputs"]["dataset"]
    assert "stream" in record
    cells = recorded_image_cells(record, "image", [N + 3, 2])
    assert cells == {2: png(pixels[2]), N + 3: png(pixels[N + 3])}
