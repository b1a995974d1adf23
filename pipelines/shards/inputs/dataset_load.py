"""Opening a local Hugging Face dataset: a ``save_to_disk`` folder, a folder of data files,
``.parquet`` / ``.arrow`` / ``.tar`` files (a list or a glob), or a ``datasets`` object.
Nothing is downloaded."""

from __future__ import annotations

import contextlib
import glob
import os
import re
from pathlib import Path

DATA_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".tar": "webdataset"}
STREAM_BATCH_ROWS = 1_000


@contextlib.contextmanager
def hf_progress(enabled: bool):
    """``datasets``' own progress bars on or off inside the block (restored after)."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    if enabled:
        datasets.enable_progress_bars()
    else:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_disabled:
            datasets.disable_progress_bars()
        else:
            datasets.enable_progress_bars()


def load_local_dataset(source, split: str | None = None, *, cache_dir: str | None = None, streaming: bool = False):
    """A ``datasets.Dataset`` (or ``IterableDataset`` when streaming) from ``source``.

    source: a ``Dataset`` / ``DatasetDict`` / ``IterableDataset`` / ``IterableDatasetDict``; a
    ``save_to_disk`` folder; a folder of data files (``load_dataset(folder)``); a ``.parquet`` /
    ``.arrow`` / ``.tar`` (webdataset) file, a list of them or a glob. Nothing is downloaded:
    Hub names and remote URLs are refused. split: the split of a dataset dict (default: its
    only split). cache_dir: ``load_dataset``'s Arrow cache (default: the ``datasets`` cache).
    streaming: read the files as a stream (no Arrow cache); a map-style input is turned into
    an ``IterableDataset`` (an ``IterableDataset`` input always streams).
    """
    import datasets

    if isinstance(source, (str, os.PathLike, list, tuple)):
        ds = load_path(source, split, cache_dir, streaming)
    else:
        ds = source
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        ds = pick_split(ds, split)
    if streaming and isinstance(ds, datasets.Dataset):
        ds = ds.to_iterable_dataset()
    if not isinstance(ds, (datasets.Dataset, datasets.IterableDataset)):
        raise TypeError(f"hf_dataset must be a path or a datasets Dataset / IterableDataset, got {type(ds).__name__}")
    return ds


def load_path(source, split: str | None, cache_dir: str | None, streaming: bool = False):
    """``load_from_disk`` for a ``save_to_disk`` folder, else ``load_dataset`` of local files."""
    import datasets

    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    paths = [os.fspath(p).removeprefix("file://") for p in items]
    remote = [p for p in paths if "://" in p]
    if remote:
        raise ValueError(f"{remote[0]} is remote: --hf-dataset reads local files only; download the dataset first")
    if len(paths) == 1 and os.path.isdir(paths[0]):
        folder = paths[0]
        if any(os.path.exists(os.path.join(folder, f)) for f in ("dataset_dict.json", "state.json")):
            return datasets.load_from_disk(folder)
        return datasets.load_dataset(folder, cache_dir=cache_dir, streaming=streaming)
    files = data_files(paths)
    kinds = sorted({Path(f).suffix for f in files})
    builders = {DATA_FILE_BUILDERS.get(k) for k in kinds}
    if None in builders or len(builders) != 1:
        raise ValueError(f"cannot read {kinds} files as one dataset: give only .parquet, .arrow or .tar files")
    builder = builders.pop()
    options = stream_options(builder) if streaming else {}
    return datasets.load_dataset(
        builder, data_files={split or "train": files}, cache_dir=cache_dir, streaming=streaming, **options
    )


def stream_options(builder: str) -> dict:
    """``load_dataset`` options that keep a stream's memory bounded: parquet is read in
    batches of :data:`STREAM_BATCH_ROWS` rows without pre-buffering (pyarrow's default
    pre-buffering keeps every row group read so far in memory)."""
    if builder != "parquet":
        return {}
    import pyarrow.dataset as pds

    return {"fragment_scan_options": pds.ParquetFragmentScanOptions(pre_buffer=False), "batch_size": STREAM_BATCH_ROWS}


def data_files(paths: list[str]) -> list[str]:
    """The files named by ``paths`` (globs expanded, numbers sorted as numbers)."""
    files = []
    for p in paths:
        matched = sorted(glob.glob(p), key=natural_key) if glob.has_magic(p) else [p]
        matched = [m for m in matched if os.path.isfile(m)]
        if not matched:
            raise FileNotFoundError(
                f"no dataset at {p!r}: give a save_to_disk folder, a folder of data files, or "
                f".parquet/.arrow/.tar files (globs allowed); Hub names are not downloaded"
            )
        files.extend(matched)
    return files


def natural_key(path: str):
    """Sort key comparing the numbers in a path as numbers (``part-2`` before ``part-10``)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def pick_split(dataset_dict, split: str | None):
    names = list(dataset_dict)
    if split is None:
        if len(names) == 1:
            return dataset_dict[names[0]]
        raise ValueError(f"the dataset has splits {names}: choose one with --split")
    if split not in dataset_dict:
        raise ValueError(f"no split {split!r}: the dataset has {names}")
    return dataset_dict[split]
