"""Provence checkpoints: the published layouts, loading, saving and the window.

Checkpoints are read without remote code and without a prompt (``trust_remote_code`` stays
off, a config's ``auto_map`` is never read) from a local folder or the user's HF cache (never
downloaded):

* naver/provence-reranker-debertav3-v1 layout: the published ``config.json`` with
  ``"model_type": "Provence"`` and DeBERTa-v3 fields (built as ``deberta-v2``); weights
  ``deberta.*``, ``pooler.*``, ``classifier.*``, ``token_classifier.*`` (this is also
  prunekit's own saved format, plus a marker file);
* OpenProvence layout (hotchpotch/open-provence-reranker-*): ``config.json`` with
  ``model_type="open_provence"`` and a nested ``base_model_config``; weights
  ``ranking_model.*`` and ``pruning_head.classifier.*``.

The files are read by :func:`prunecore.models.read_json` / :func:`~prunecore.models.read_safetensors`:
a truncated or corrupt file, a ``config.json`` that is not JSON, weights of another model or a
NaN / infinite weight is a :class:`~prunecore.models.CheckpointError` at load naming the file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from prunecore.device import resolve_device, resolve_dtype
from prunecore.io import atomic_path, atomic_write_json
from prunecore.models import CheckpointError, load_tokenizer, read_json, read_safetensors, save_safetensors_folder

from .network import ProvenceModel

__all__ = [
    "FLAT_LAYOUTS",
    "MARKER",
    "NESTED_LAYOUTS",
    "POSITION_OFFSETS",
    "backbone_config",
    "check_fast_tokenizer",
    "check_window",
    "load_provence_model",
    "position_limit",
    "resolve_checkpoint_dir",
    "save_provence_model",
]

MARKER = "prunekit_provence.json"


def resolve_checkpoint_dir(name_or_path: str | os.PathLike) -> Path:
    """A local folder, or a hub id resolved in the local HF cache only (no download)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if name.count("/") == 1 and not name.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(name, local_files_only=True))
        except Exception as exc:  # not in the cache
            raise FileNotFoundError(
                f"Provence checkpoint {name!r} is not a local folder and is not in the local "
                "Hugging Face cache; prunekit never downloads weights: fetch it yourself "
                "(e.g. `huggingface-cli download`) or pass a folder"
            ) from exc
    raise FileNotFoundError(f"Provence checkpoint folder not found: {name_or_path}")


#: Wrapper ``model_type`` values of published Provence configs whose backbone fields sit at the
#: top level of ``config.json`` -> the transformers backbone type they are built as (naver's
#: release: ``"Provence"`` with DeBERTa-v3 fields). A new flat layout is one entry here.
FLAT_LAYOUTS = {"Provence": "deberta-v2", "provence": "deberta-v2"}
#: Wrapper ``model_type`` values whose backbone config is nested under ``base_model_config``.
NESTED_LAYOUTS = {"open_provence": "base_model_config"}
#: Config fields that describe the wrapper (remote code, heads), never the backbone.
WRAPPER_FIELDS = ("model_type", "auto_map", "architectures", "num_labels", "id2label", "label2id", "base_model_config")


def backbone_config(raw: dict, where: str = "config.json"):
    """The transformers backbone config of a Provence ``config.json`` dict, without remote code.

    The wrapper's ``auto_map`` is never read; the backbone is built with
    ``AutoConfig.for_model`` from the known layouts (:data:`FLAT_LAYOUTS`,
    :data:`NESTED_LAYOUTS`) or, for prunekit's own saves, from the backbone ``model_type``.
    """
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    wrapper = raw.get("model_type")
    if wrapper in NESTED_LAYOUTS:
        fields = raw.get(NESTED_LAYOUTS[wrapper])
        if not isinstance(fields, dict) or "model_type" not in fields:
            raise ValueError(f"{where}: {wrapper} config without a nested {NESTED_LAYOUTS[wrapper]!r} (model_type)")
        backbone = fields["model_type"]
    elif wrapper in FLAT_LAYOUTS:
        fields, backbone = raw, FLAT_LAYOUTS[wrapper]
    elif wrapper in CONFIG_MAPPING:
        fields, backbone = raw, wrapper
    else:
        known = sorted(FLAT_LAYOUTS) + sorted(NESTED_LAYOUTS) + ["any transformers encoder model_type"]
        raise ValueError(f"{where}: unknown Provence layout model_type={wrapper!r}; known: {known}")
    kwargs = {k: v for k, v in fields.items() if k not in WRAPPER_FIELDS}
    return AutoConfig.for_model(backbone, **kwargs, num_labels=1)


def read_config(folder: Path):
    """``(backbone config, raw dict)`` of ``folder/config.json``."""
    raw = read_json(folder / "config.json")
    return backbone_config(raw, f"{folder}/config.json"), raw


#: Backbones whose position ids start after the padding index (RoBERTa family: pad id 1 -> 2).
POSITION_OFFSETS = {"roberta": 2, "xlm-roberta": 2, "camembert": 2}


def position_limit(config) -> int:
    """Longest input (tokens, special tokens included) the backbone's position table allows."""
    offset = POSITION_OFFSETS.get(config.model_type, 0)
    return int(getattr(config, "max_position_embeddings", 512)) - offset


def load_provence_model(name_or_path, *, dtype=None, device=None):
    """Load ``(ProvenceModel, fast tokenizer, meta)`` from a folder or the HF cache.

    No remote code runs and transformers never prompts: the backbone is built from the known
    layout (:func:`backbone_config`), the tokenizer is loaded with ``trust_remote_code=False``
    and the backbone config. ``meta`` is the raw config dict plus prunekit's marker when
    present, and ``window``: the saved window in tokens, or None.
    """
    folder = resolve_checkpoint_dir(name_or_path)
    config, raw = read_config(folder)
    try:
        model = ProvenceModel(config)
    except (TypeError, ValueError) as exc:  # fields the backbone refuses: name the file
        raise CheckpointError(f"{folder}/config.json: the backbone cannot be built from it ({exc})") from None
    state = read_safetensors(folder, torch_bin=True)
    try:
        model.load_released_state_dict(state)
    except ValueError as exc:  # keys / shapes of another model: name the folder
        raise CheckpointError(f"{folder}: {exc}") from None
    tok_src = folder
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        src = raw.get("tokenizer_name_or_path") or raw.get("base_model_name_or_path")
        if not src:
            raise FileNotFoundError(f"no tokenizer files in {folder}")
        tok_src = resolve_checkpoint_dir(src)
    # config= names the tokenizer class when tokenizer_config.json does not, so transformers
    # never opens the wrapper's config.json (whose auto_map would ask for remote code)
    tokenizer = load_tokenizer(tok_src, config=config)
    meta = dict(raw)
    # the window: OpenProvence's documented max_length, or prunekit's marker. A flat config's
    # max_length is PretrainedConfig's generation length (default 20), not a window: ignored.
    meta["window"] = raw.get("max_length") if raw.get("model_type") in NESTED_LAYOUTS else None
    if (folder / MARKER).is_file():
        marker = read_json(folder / MARKER)
        meta.update(marker)
        meta["window"] = marker.get("max_length")
    model.eval()
    if device is not None or dtype is not None:
        model.to(device=resolve_device(device), dtype=resolve_dtype(dtype, device))
    return model, tokenizer, meta


def save_provence_model(
    model: ProvenceModel, tokenizer, folder, *, max_length: int = 512, extra: dict | None = None
) -> Path:
    """Save in the released layout (config.json + model.safetensors + tokenizer + marker).

    Every file is published atomically (a killed save never leaves a half-written file); the
    marker is written last.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model.ranker).__name__]
    config = json.loads(model.config.to_json_string())  # the diff against the defaults, as transformers saves it
    save_safetensors_folder(folder, model.released_state_dict(), config)
    if tokenizer is not None:
        with tempfile.TemporaryDirectory(dir=folder) as staging:
            tokenizer.save_pretrained(staging)
            for name in sorted(os.listdir(staging)):
                with atomic_path(folder / name) as tmp:
                    shutil.copyfile(os.path.join(staging, name), tmp)
    marker = {"format": "prunekit-provence", "version": 1, "max_length": int(max_length)}
    marker.update(extra or {})
    atomic_write_json(folder / MARKER, marker)
    return folder


def check_window(max_length, saved_window, config, n_special: int) -> int:
    """The window in tokens: ``max_length``, else the saved one, else ``min(512, limit)``.

    Raises a ValueError when it exceeds the backbone's position limit or cannot hold the
    special tokens plus a few query/context tokens.
    """
    limit = position_limit(config)
    window = max_length if max_length is not None else (saved_window or min(512, limit))
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)):
        raise TypeError(f"max_length must be an int, got {type(window).__name__}")
    window = int(window)
    if window > limit:
        raise ValueError(
            f"max_length={window} exceeds the model's position limit of {limit} tokens "
            f"(max_position_embeddings={config.max_position_embeddings}); pass max_length <= {limit} "
            "(longer contexts are split into blocks automatically)"
        )
    if window < n_special + 8:
        raise ValueError(f"max_length={window} is too small for this tokenizer; pass at least {n_special + 8}")
    return window


def check_fast_tokenizer(tokenizer) -> None:
    """Offsets are needed to map tokens to sentences: only fast tokenizers give them."""
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"Provence needs a fast (Rust) tokenizer with offset mapping; got "
            f"{type(tokenizer).__name__} (is_fast=False). Load it with "
            "AutoTokenizer.from_pretrained(..., use_fast=True) or convert it."
        )
