"""The one model loader: open_clip and transformers models by name or local path, and the
checkpoint-folder reading of prunekit's own loaders.

Device and precision are set here and nowhere else. Nothing is downloaded at import; the
libraries themselves load inside the functions. ``trust_remote_code`` is passed to
transformers explicitly as ``False`` unless the caller turns it on, so a folder's
``auto_map`` code is never executed and transformers never prompts for it.

:func:`read_json` and :func:`read_safetensors` read the checkpoint folders that prunekit loads
itself (native LLaDA / Dream, Provence): every failure is a :class:`CheckpointError` (or a
``FileNotFoundError``) naming the file and the fix, and a NaN or infinite weight is found at
load (one reduction per tensor), not at the first forward. :func:`save_safetensors_folder` writes
such a folder (``config.json`` + ``model.safetensors``), each file published atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .device import resolve_device, resolve_dtype
from .io import atomic_path, atomic_write_bytes


def load_open_clip(
    model_name: str, pretrained: str | None = None, *, device: str = "auto", precision: str = "fp32", **model_kwargs
):
    """Create an open_clip model by name + pretrained tag or local checkpoint path.

    Returns ``(model, preprocess, tokenizer)`` with the model in eval mode on ``device``.
    ``pretrained=None`` gives random weights (tests); a path loads a local checkpoint.
    Unknown model names raise ValueError listing how to see the available ones.
    """
    import open_clip

    if model_name not in open_clip.list_models() and not os.path.exists(str(model_name)):
        raise ValueError(f"unknown open_clip model {model_name!r}; see open_clip.list_models()")
    resolve_dtype(precision)  # a clear error for an unknown precision name
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=pretrained, device=resolve_device(device), precision=precision, **model_kwargs
    )
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(model_name)


def _auto_class(auto_class):
    if isinstance(auto_class, str):
        import transformers

        if not hasattr(transformers, auto_class):
            raise ValueError(f"transformers has no class {auto_class!r}")
        return getattr(transformers, auto_class)
    return auto_class


def load_transformers(
    name_or_path,
    *,
    auto_class="AutoModel",
    device: str | None = "auto",
    dtype="auto",
    trust_remote_code: bool = False,
    **kwargs,
) -> torch.nn.Module:
    """A transformers model by hub name or local folder, in eval mode on ``device``.

    ``auto_class``: a transformers class or its name (``"AutoModelForCausalLM"``...).
    ``dtype``: a precision name or torch dtype (``"auto"``: bf16 on CUDA, fp32 on CPU).
    ``device=None`` leaves placement to ``kwargs`` (e.g. ``device_map``).
    """
    cls = _auto_class(auto_class)
    model = cls.from_pretrained(
        str(name_or_path), dtype=resolve_dtype(dtype, device or "auto"), trust_remote_code=trust_remote_code, **kwargs
    )
    if device is not None:
        model = model.to(resolve_device(device))
    return model.eval()


def load_tokenizer(name_or_path, *, trust_remote_code: bool = False, **kwargs):
    """The tokenizer of a hub name or local folder (``AutoTokenizer``), no remote code."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code, **kwargs)


# ----------------------------------------------------------------------------------------
# checkpoint folders read by prunekit's own loaders
# ----------------------------------------------------------------------------------------
REDOWNLOAD = "download the checkpoint again (an interrupted download or copy leaves a truncated file)"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable, truncated, inconsistent or non-finite.
    The message names the file and the fix."""


def read_json(path) -> dict:
    """The JSON object stored in ``path`` (``config.json``, an index, a marker).

    Raises ``FileNotFoundError`` when it is missing and :class:`CheckpointError` naming the file
    (and the line and column of a syntax error) when it is not a readable JSON object.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass a checkpoint folder that holds it")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            f"{path} is not valid JSON ({exc.msg}: line {exc.lineno} column {exc.colno}): "
            f"restore the file, or {REDOWNLOAD}"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read {path} ({exc}): restore the file, or {REDOWNLOAD}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} must hold a JSON object, found a {type(value).__name__}: {REDOWNLOAD}")
    return value


def read_safetensors_file(path: Path, listed_in: Path | None = None) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file (CPU); a clear error naming it when it is missing
    (``listed_in``: the index that lists it) or truncated / corrupt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        where = f" (listed in {listed_in})" if listed_in is not None else ""
        raise FileNotFoundError(f"weight file {path} is missing{where}: {REDOWNLOAD}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(
            f"cannot read weight file {path} ({path.stat().st_size} bytes): {exc}. The file is truncated "
            f"or corrupt: {REDOWNLOAD}"
        ) from None


def read_torch_bin(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a ``pytorch_model.bin`` (tensors only, CPU); a clear error naming it
    when it is truncated or corrupt."""
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as exc:
        raise CheckpointError(
            f"cannot read weight file {path} ({path.stat().st_size} bytes): {exc}. The file is truncated "
            f"or corrupt: {REDOWNLOAD}"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict (found a {type(state).__name__}): {REDOWNLOAD}")
    return state


def nonfinite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating tensors of ``state`` holding a NaN or an infinity, in key order.

    One ``aminmax`` per tensor in its own dtype (a NaN propagates to both ends, an infinity is
    an end; no temporary of the tensor's size, no overflow), all read back at once.
    """
    names = [k for k, t in state.items() if t.is_floating_point() and t.numel()]
    if not names:
        return []
    ends = torch.stack([tensor_ends(state[k]) for k in names])
    return [k for k, ok in zip(names, ends.isfinite().all(-1).tolist()) if not ok]


def tensor_ends(t: torch.Tensor) -> torch.Tensor:
    """``(2,)`` float64 ``[min, max]`` of a floating tensor (NaN if it holds one)."""
    if t.element_size() == 1:  # float8 kinds have no native min / max
        t = t.float()
    return torch.stack(torch.aminmax(t)).double()


def check_finite_weights(state: dict[str, torch.Tensor], origin: dict[str, Path]) -> None:
    """Raise a :class:`CheckpointError` naming each NaN / infinite tensor and its file
    (``origin``: tensor name -> the file it was read from)."""
    bad = nonfinite_tensors(state)
    if not bad:
        return

    def describe(name: str) -> str:
        t = state[name]
        return f"{name} in {origin[name]} ({int(t.isnan().sum())} NaN, {int(t.isinf().sum())} infinite)"

    more = f" and {len(bad) - 5} more tensors" if len(bad) > 5 else ""
    raise CheckpointError(
        f"non-finite weights: {'; '.join(describe(k) for k in bad[:5])}{more}. The checkpoint is corrupt or "
        f"was saved from a diverged model: {REDOWNLOAD}, or re-save it from finite weights"
    )


def read_safetensors(folder, *, torch_bin: bool = False) -> dict[str, torch.Tensor]:
    """All weights of a checkpoint folder (CPU), checked: every file readable, the index
    consistent with its shards, every floating tensor finite.

    Args:
        folder: holds ``model.safetensors``, or the shards named by ``model.safetensors.index.json``
            (each key must be in the shard the index maps it to), or (``torch_bin=True``) a
            ``pytorch_model.bin``.
    Returns:
        ``{key: tensor}`` as stored.
    Raises:
        FileNotFoundError: no weights, or a shard of the index is missing.
        CheckpointError: a truncated / corrupt file, an index that does not match its shards,
            a NaN or infinite weight; the message names the file (and tensor) and the fix.
    """
    folder = Path(folder)
    single, index, binary = (
        folder / "model.safetensors",
        folder / "model.safetensors.index.json",
        folder / "pytorch_model.bin",
    )
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    if single.is_file():
        state = read_safetensors_file(single)
        origin = dict.fromkeys(state, single)
    elif index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no weight_map (key -> shard file): {REDOWNLOAD}")
        for shard in sorted(set(weight_map.values())):
            path = folder / shard
            for key, tensor in read_safetensors_file(path, index).items():
                if key in state:
                    raise CheckpointError(f"tensor {key} is stored twice, in {origin[key]} and in {path}: {REDOWNLOAD}")
                state[key], origin[key] = tensor, path
        misplaced = sorted(k for k, shard in weight_map.items() if origin.get(k) != folder / shard)
        if misplaced:
            key = misplaced[0]
            raise CheckpointError(
                f"{index} maps {len(misplaced)} tensor(s) to shards that do not hold them (first: {key} -> "
                f"{weight_map[key]}): the index and the shards come from different saves; {REDOWNLOAD}"
            )
    elif torch_bin and binary.is_file():
        state = read_torch_bin(binary)
        origin = dict.fromkeys(state, binary)
    else:
        names = "model.safetensors, model.safetensors.index.json" + (", pytorch_model.bin" if torch_bin else "")
        raise FileNotFoundError(
            f"{folder} holds no weights (none of {names}); save the weights with safetensors "
            "(save_pretrained(..., safe_serialization=True))"
        )
    check_finite_weights(state, origin)
    return state


def save_safetensors_folder(folder, state_dict: dict[str, torch.Tensor], config: dict) -> Path:
    """Write a checkpoint folder that :func:`read_safetensors` / :func:`read_json` read back.

    Args:
        folder: created if missing; only ``model.safetensors`` and ``config.json`` are written.
        state_dict: ``{key: tensor}`` saved as-is under its keys (detached, made contiguous, on CPU).
        config: JSON-serialisable dict written as ``config.json`` the way transformers writes
            one (indent 2, sorted keys, trailing newline).
    Returns:
        ``folder`` as a :class:`~pathlib.Path`.

    Each file is published atomically (:func:`prunecore.io.atomic_path`): the weights first, then
    the config, so a killed save never leaves a half-written file under its final name.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    atomic_write_bytes(folder / "config.json", (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return folder
