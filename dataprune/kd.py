"""KD-aided random subsets (Ben-Baruch et al., "Distilling the Knowledge in Data Pruning").

The student trained on a (random) subset learns from ground truth and from a teacher trained
on all data: ``L = (1 - alpha) CE(y, z_s) + alpha T^2 KL(softmax(z_t/T) || softmax(z_s/T))``.
The exact form and T are not in the released material (T = 4 is a common default): both are
parameters. :class:`TeacherLogitCache` runs the teacher once and serves many subsets.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from prunecore.io import atomic_path

from .deprecation import warn_renamed


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor | None,
    *,
    alpha: float,
    temperature: float = 4.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Distillation loss for logits (B, C) and integer targets (B,).

    ``alpha=0`` is plain cross-entropy; ``alpha=1`` pure distillation (targets may be None).
    The KL term is scaled by ``T^2`` so its gradient magnitude does not shrink with T.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
        raise ValueError(
            f"student {tuple(student_logits.shape)} and teacher "
            f"{tuple(teacher_logits.shape)} logits must both be (B, C)"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    teacher_logits = teacher_logits.detach().to(student_logits.dtype)
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1) * temperature**2
    if alpha < 1.0:
        if targets is None:
            raise ValueError("targets are required when alpha < 1")
        ce = F.cross_entropy(student_logits, targets, reduction="none")
        per_sample = (1.0 - alpha) * ce + alpha * kl
    else:
        per_sample = kl
    return per_sample.mean() if reduction == "mean" else per_sample


def kd_alpha(fraction: float) -> float:
    """Default KD weight for a kept ``fraction`` in (0, 1]: 0.5 at f = 1, 1.0 at f <= 0.1.

    Linear in between (monotone non-increasing in f), following the paper's observation that
    the best alpha grows as the kept fraction shrinks. A documented default schedule, not a
    fitted law: tune it for your data.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return float(np.clip(1.0 - 0.5 * (fraction - 0.1) / 0.9, 0.5, 1.0))


class TeacherLogitCache:
    """Teacher logits on disk, addressed by sample key, so a teacher runs once.

    Layout in ``folder``: ``logits.npy`` ((n, C) float16 or float32 memmap), ``keys.json``
    (the n keys in row order), ``filled.npy`` ((n,) bool, which rows were written) and
    ``meta.json``. Writes go straight into the memmap and are flushed; ``filled`` is updated
    atomically after each write, so an interrupted fill resumes with :meth:`missing`.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        meta_path = self.folder / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(
                f"no teacher-logit cache at {self.folder} (create one with TeacherLogitCache.create)"
            )
        self.meta = json.loads(meta_path.read_text())
        self.keys = json.loads((self.folder / "keys.json").read_text())
        self.row_of = {key: i for i, key in enumerate(self.keys)}
        self.logits = np.load(self.folder / "logits.npy", mmap_mode="r+")
        self.filled = np.load(self.folder / "filled.npy")

    @classmethod
    def create(
        cls,
        folder: str | os.PathLike,
        keys: Sequence[str],
        n_classes: int,
        *,
        storage_dtype: str = "float16",
        dtype: str | None = None,
    ) -> TeacherLogitCache:
        """Create an empty cache for ``keys`` (unique) and ``n_classes`` logits stored as
        ``storage_dtype``, or reopen an existing one made for the same keys and width.
        ``dtype``: deprecated name of ``storage_dtype`` (removed in the next release)."""
        if dtype is not None:
            warn_renamed("TeacherLogitCache.create(dtype=...)", "storage_dtype=...")
            storage_dtype = dtype
        folder = Path(folder)
        keys = [str(k) for k in keys]
        if len(set(keys)) != len(keys):
            raise ValueError("duplicate keys given to the teacher-logit cache")
        if (folder / "meta.json").exists():
            cache = cls(folder)
            if cache.keys != keys or cache.meta["n_classes"] != n_classes:
                raise ValueError(f"{folder} holds a cache for other keys or class count")
            return cache
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / "logits.npy") as tmp:
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(storage_dtype), shape=(len(keys), n_classes))
            arr.flush()
            del arr
        with atomic_path(folder / "filled.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, np.zeros(len(keys), dtype=bool))
        with atomic_path(folder / "keys.json") as tmp:
            tmp.write_text(json.dumps(keys))
        with atomic_path(folder / "meta.json") as tmp:
            tmp.write_text(json.dumps({"n_classes": n_classes, "dtype": storage_dtype}))  # the key caches have
        return cls(folder)

    def rows(self, keys: Iterable[str]) -> np.ndarray:
        try:
            return np.array([self.row_of[str(k)] for k in keys], dtype=np.int64)
        except KeyError as exc:
            raise KeyError(f"key {exc.args[0]!r} is not in the teacher-logit cache") from None

    def write(self, keys: Sequence[str], logits) -> None:
        """Store logits (B, C) for ``keys`` (B,)."""
        logits = (
            logits.detach().float().cpu().numpy() if torch.is_tensor(logits) else np.asarray(logits, dtype=np.float32)
        )
        rows = self.rows(keys)
        if logits.shape != (rows.shape[0], self.logits.shape[1]):
            raise ValueError(f"logits shape {logits.shape} does not match ({rows.shape[0]}, {self.logits.shape[1]})")
        if not np.isfinite(logits).all():
            raise ValueError("teacher logits contain NaN/inf")
        self.logits[rows] = logits
        self.logits.flush()
        self.filled[rows] = True
        with atomic_path(self.folder / "filled.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, self.filled)

    def read(self, keys: Sequence[str]) -> torch.Tensor:
        """Logits (B, C) float32 for ``keys``; raises if any was never written."""
        rows = self.rows(keys)
        if not self.filled[rows].all():
            missing = [self.keys[r] for r in rows[~self.filled[rows]][:5]]
            raise KeyError(f"teacher logits never written for keys {missing}")
        return torch.from_numpy(np.asarray(self.logits[rows], dtype=np.float32))

    def missing(self) -> list[str]:
        """Keys whose logits are not written yet (to resume an interrupted fill)."""
        return [self.keys[r] for r in np.flatnonzero(~self.filled)]

    @property
    def complete(self) -> bool:
        return bool(self.filled.all())


@torch.inference_mode()
def fill_teacher_cache(
    cache: TeacherLogitCache,
    teacher: torch.nn.Module,
    batches: Iterable[tuple[Sequence[str], torch.Tensor]],
    *,
    device: str = "cpu",
    progress: bool = True,
) -> TeacherLogitCache:
    """Run ``teacher`` over ``(keys, inputs)`` batches, skipping keys already cached."""
    from tqdm.auto import tqdm

    teacher.eval().to(device)
    for keys, inputs in tqdm(batches, desc="teacher logits", disable=not progress):
        rows = cache.rows(keys)
        todo = ~cache.filled[rows]
        if not todo.any():
            continue
        idx = torch.from_numpy(np.flatnonzero(todo))
        logits = teacher(inputs[idx].to(device))
        cache.write([keys[i] for i in idx.tolist()], logits)
    return cache
