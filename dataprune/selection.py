"""``Selection``: the currency of data pruning — which rows stay, and why the others went."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from prunecore.io import atomic_path

KEPT = ""


def reasons_array(keep: np.ndarray, reason: str) -> np.ndarray:
    """(n,) object array: ``""`` where ``keep`` else ``reason`` (one shared str object each,
    8 bytes per row; no fixed-width string temporary)."""
    out = np.full(keep.shape[0], KEPT, dtype=object)
    out[~keep] = reason
    return out


@dataclass
class Selection:
    """Keep decision for ``n`` rows.

    keep: (n,) bool. scores: (n,) float32, the method's score per row (NaN where the method
    gives none). reasons: (n,) object array of str, ``""`` for kept rows and the dropping
    method's reason otherwise (``"duplicate"``, ``"prototypical"``, ``"quota"``, ``"random"``,
    ...). stats: per-method tables (e.g. per-cluster sizes and quotas).

    Selections over the same rows compose: ``a & b`` keeps rows both keep and explains each
    drop by the first selection that dropped it; ``a | b`` keeps rows either keeps.
    """

    keep: np.ndarray
    scores: np.ndarray | None = None
    reasons: np.ndarray | None = None
    stats: dict[str, pd.DataFrame] = field(default_factory=dict)

    def __post_init__(self):
        self.keep = np.array(self.keep, dtype=bool)  # copies: a Selection owns its arrays
        if self.keep.ndim != 1:
            raise ValueError(f"keep mask must be 1-D, got shape {self.keep.shape}")
        n = self.keep.shape[0]
        if self.scores is None:
            self.scores = np.full(n, np.nan, dtype=np.float32)
        self.scores = np.array(self.scores, dtype=np.float32)
        if self.reasons is None:
            self.reasons = reasons_array(self.keep, "dropped")  # fresh: no copy needed
        else:
            self.reasons = np.array(self.reasons, dtype=object)
        if self.scores.shape != (n,) or self.reasons.shape != (n,):
            raise ValueError(f"scores {self.scores.shape} and reasons {self.reasons.shape} must match keep ({n},)")
        self.reasons[self.keep] = KEPT

    @classmethod
    def from_mask(cls, keep: np.ndarray, reason: str, scores=None, stats=None) -> Selection:
        """Selection whose dropped rows all carry ``reason``."""
        sel = cls(keep=keep, scores=scores, stats=dict(stats or {}))
        sel.reasons[~sel.keep] = reason  # one reasons array, built in place (8 bytes/row)
        return sel

    @classmethod
    def keep_all(cls, n: int) -> Selection:
        return cls(keep=np.ones(n, dtype=bool))

    @property
    def n(self) -> int:
        return int(self.keep.shape[0])

    @property
    def indices(self) -> np.ndarray:
        """Kept row indices, sorted ascending, (n_kept,) int64."""
        return np.flatnonzero(self.keep)

    @property
    def n_kept(self) -> int:
        return int(self.keep.sum())

    def _check_same_rows(self, other: Selection) -> None:
        if not isinstance(other, Selection):
            raise TypeError(f"cannot combine Selection with {type(other).__name__}")
        if other.n != self.n:
            raise ValueError(f"selections cover different row counts: {self.n} vs {other.n}")

    def __and__(self, other: Selection) -> Selection:
        self._check_same_rows(other)
        reasons = np.where(~self.keep, self.reasons, other.reasons)
        return Selection(
            keep=self.keep & other.keep,
            scores=_later_scores(self, other),
            reasons=reasons,
            stats={**self.stats, **other.stats},
        )

    def __or__(self, other: Selection) -> Selection:
        self._check_same_rows(other)
        return Selection(
            keep=self.keep | other.keep,
            scores=_later_scores(self, other),
            reasons=self.reasons.copy(),
            stats={**self.stats, **other.stats},
        )

    def lift(self, rows: np.ndarray, n: int) -> Selection:
        """Map a selection made over the subset ``rows`` (m,) of ``n`` rows back to all ``n``.

        Rows outside the subset are left undecided (kept, no score), so
        ``a & b.lift(a.indices, a.n)`` composes a stage ``b`` that ran on ``a``'s survivors.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if rows.shape != (self.n,):
            raise ValueError(f"lift needs {self.n} row ids, got shape {rows.shape}")
        keep = np.ones(n, dtype=bool)
        scores = np.full(n, np.nan, dtype=np.float32)
        reasons = np.full(n, KEPT, dtype=object)
        keep[rows], scores[rows], reasons[rows] = self.keep, self.scores, self.reasons
        return Selection(keep=keep, scores=scores, reasons=reasons, stats=dict(self.stats))

    def apply(self, dataset, *, reason_column: str | None = None, keep_dropped: bool = False):
        """The kept rows of ``dataset`` (same ``n`` rows, in order), in its own type.

        A Hugging Face ``datasets.Dataset`` gives ``dataset.select(indices)`` (rows unchanged,
        no copy until saved); a pandas DataFrame ``.iloc[indices]``; a numpy array or a
        sequence ``dataset[indices]`` / a list. ``reason_column``: add the reason of every
        row (``""`` when kept) as a column (Dataset / DataFrame only); with
        ``keep_dropped=True`` every row is returned, so the column explains the drops.
        """
        if hasattr(dataset, "filter") and not hasattr(dataset, "__len__"):  # a streaming IterableDataset
            return self.apply_stream(dataset, reason_column=reason_column, keep_dropped=keep_dropped)
        if hasattr(dataset, "__len__") and len(dataset) != self.n:
            raise ValueError(f"the selection covers {self.n} rows but the dataset has {len(dataset)}")
        rows = np.arange(self.n) if keep_dropped else self.indices
        reasons = self.reasons[rows].astype(str).tolist()
        if hasattr(dataset, "select") and hasattr(dataset, "add_column"):  # datasets.Dataset
            out = dataset.select(rows)
            return out.add_column(reason_column, reasons) if reason_column else out
        if isinstance(dataset, pd.DataFrame):
            out = dataset.iloc[rows]
            return out.assign(**{reason_column: reasons}) if reason_column else out
        if reason_column:
            raise TypeError(f"reason_column needs a datasets.Dataset or a DataFrame, got {type(dataset).__name__}")
        if isinstance(dataset, np.ndarray):
            return dataset[rows]
        if hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
            return [dataset[int(i)] for i in rows]
        raise TypeError(
            f"cannot apply a Selection to {type(dataset).__name__}: give a datasets.Dataset or IterableDataset, "
            "a DataFrame, an array or a sequence"
        )

    def apply_stream(self, dataset, *, reason_column: str | None = None, keep_dropped: bool = False):
        """:meth:`apply` for a ``datasets.IterableDataset`` (lazy: rows are filtered as they
        stream; row i is the i-th row the stream yields, which must be the selection's row i)."""
        keep, reasons = self.keep, self.reasons

        def wanted(_, i: int) -> bool:
            if i >= self.n:
                raise ValueError(f"the stream has more rows than the {self.n} the selection covers")
            return keep_dropped or bool(keep[i])

        out = dataset.filter(wanted, with_indices=True)
        if reason_column:
            out = out.map(lambda _, i: {reason_column: str(reasons[i])}, with_indices=True)
        return out

    def reason_counts(self) -> dict[str, int]:
        """Dropped rows per reason."""
        dropped = self.reasons[~self.keep]
        names, counts = np.unique(dropped.astype(str), return_counts=True)
        return dict(zip(names.tolist(), counts.tolist()))

    def summary(self) -> str:
        """A short human-readable table: rows, kept, and drops per reason."""
        n = max(self.n, 1)
        lines = [f"rows {self.n:>12,d}", f"kept {self.n_kept:>12,d}  ({100 * self.n_kept / n:.1f}%)"]
        for reason, count in sorted(self.reason_counts().items()):
            lines.append(f"  dropped as {reason:<14s} {count:>10,d}  ({100 * count / n:.1f}%)")
        return "\n".join(lines)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "row": np.arange(self.n, dtype=np.int64),
                "kept": self.keep,
                "score": self.scores,
                "reason": self.reasons.astype(str),
            }
        )

    def to_parquet(self, path: str | Path) -> None:
        """Write rows (row, kept, score, reason) atomically; stats go to the file metadata."""
        table = pa.Table.from_pandas(self.to_frame(), preserve_index=False)
        stats = {name: df.to_dict(orient="list") for name, df in self.stats.items()}
        meta = dict(table.schema.metadata or {})
        meta[b"prunekit.stats"] = json.dumps(stats, default=_jsonable).encode()
        with atomic_path(path) as tmp:
            pq.write_table(table.replace_schema_metadata(meta), tmp)

    @classmethod
    def from_parquet(cls, path: str | Path) -> Selection:
        table = pq.read_table(path)
        df = table.to_pandas()
        if not (df["row"].to_numpy() == np.arange(len(df))).all():
            raise ValueError(f"{path}: rows are not 0..n-1 in order; not a Selection file")
        raw = (table.schema.metadata or {}).get(b"prunekit.stats", b"{}")
        stats = {name: pd.DataFrame(cols) for name, cols in json.loads(raw).items()}
        return cls(
            keep=df["kept"].to_numpy(),
            scores=df["score"].to_numpy(),
            reasons=df["reason"].to_numpy(dtype=object),
            stats=stats,
        )


def _later_scores(a: Selection, b: Selection) -> np.ndarray:
    """Scores of ``b`` where it has one, else those of ``a`` (later stages win)."""
    return np.where(np.isnan(b.scores), a.scores, b.scores)


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
