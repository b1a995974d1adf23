"""Routers of FTP (Fine-grained Token-wise Pruner, Li et al., arXiv 2412.11494).

A router looks at four per-token factors for one block and returns a keep probability.

Factors (all tensors are ``(B, T)``; the stacked features are ``(B, T, 4)``):

1. normalised position ``(slot - first_valid_slot) / (n_valid - 1)`` in ``[0, 1]`` (paper);
2. the token's latest attention score ``s`` (attention the latest routed query of its row pays
   to it at the latest computed layer, no look-ahead), fed as ``log1p(s * n_keys)`` so a uniform
   score maps to ``log 2`` whatever the length (reconstruction: the paper only says "absolute
   attention score");
3. the rank of that score among the valid tokens of the row, normalised to ``[0, 1]``
   (0 = highest score) (paper);
4. the block's target sparsity (paper).

Routers:

- :class:`TokenRouter`: the learned global 2-layer MLP (hidden 64) shared by all blocks (paper).
- :class:`StaticRouter`: keep the first (sink) token, then the most recent tokens backwards
  (``x_0, x_{L-1}, x_{L-2}, ...``) (paper). Initialiser (guide loss) and baseline.
- :class:`RandomRouter`: seeded random priorities; baseline.

Every router maps :class:`RouteInputs` to a ``(B, T)`` keep probability. In prefill the routed
layer keeps the ``floor(keep * n_valid + 0.5)`` tokens of highest probability per row, with
``keep = 1 - s`` (the one budget rule of :mod:`prunecore.budget`); at decode (one new token
per row with a cache) it keeps the token when ``router.decode_keep`` says so (threshold 0.5 for
the learned router, as in the paper).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from prunecore.budget import check_keep, keep_counts, keep_from_sparsity, torch_rank

N_FEATURES = 4


@dataclass
class RouteInputs:
    """What a router sees for one block and one forward call.

    Attributes:
        position: (B, T) float, normalised position in [0, 1].
        score: (B, T) float, latest attention score feature (``log1p(s * n_keys)``; 0 before any
            layer produced a score).
        rank: (B, T) float, normalised rank of the raw score in [0, 1] (0 = highest).
        sparsity: float, target sparsity of the block in [0, 1]; a (B, 1) float tensor (one per
            row, ``1 - min(k, n) / n``) when the budget is a count ``k`` of each row's ``n`` tokens.
        valid: (B, T) bool, False for padding tokens.
        decode: True when the call routes single new tokens against a cache.
    """

    position: torch.Tensor
    score: torch.Tensor
    rank: torch.Tensor
    sparsity: float | torch.Tensor
    valid: torch.Tensor
    decode: bool = False

    def features(self) -> torch.Tensor:
        """(B, T, 4) float tensor ``[position, score, rank, sparsity]``."""
        if isinstance(self.sparsity, torch.Tensor):
            sp = self.sparsity.to(self.position.dtype).expand_as(self.position)
        else:
            sp = torch.full_like(self.position, float(self.sparsity))
        return torch.stack([self.position, self.score, self.rank, sp], dim=-1)


def normalised_positions(valid: torch.Tensor) -> torch.Tensor:
    """Position of every slot among the valid (non-padding) slots of its row, in [0, 1].

    Args:
        valid: (B, S) bool.
    Returns:
        (B, S) float32: ``(cumsum(valid) - 1) / max(n_valid - 1, 1)``; 0 on padding slots.
    """
    if valid.ndim != 2 or valid.dtype != torch.bool:
        raise ValueError(f"valid must be a (B, S) bool tensor, got {tuple(valid.shape)} {valid.dtype}")
    idx = valid.long().cumsum(1) - 1
    n = valid.sum(1, keepdim=True).clamp_min(2) - 1
    return torch.where(valid, idx.float() / n.float(), torch.zeros((), dtype=torch.float32))


def score_ranks(score: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Normalised descending rank of ``score`` among the valid slots of each row.

    Args:
        score: (B, S) float raw attention scores.
        valid: (B, S) bool.
    Returns:
        (B, S) float32 in [0, 1]; 0 = highest score of the row; ties broken by position
        (later first); padding slots get 1.
    """
    if score.shape != valid.shape:
        raise ValueError(f"score {tuple(score.shape)} and valid {tuple(valid.shape)} differ")
    s = torch.where(valid, score.float(), torch.full((), -float("inf"), device=score.device))
    rank = torch_rank(s.flip(1)).flip(1)  # stable rank ties to the lower index: flipped = later first
    n = valid.sum(1, keepdim=True).clamp_min(2) - 1
    return torch.where(valid, rank.float() / n.float(), torch.ones((), dtype=torch.float32, device=score.device))


def keep_topk(prob: torch.Tensor, valid: torch.Tensor, keep=None, *, sparsity: float | None = None) -> torch.Tensor:
    """Keep the ``keep`` highest-probability valid tokens of each row.

    The count per row is :func:`prunecore.budget.keep_counts` (the one budget rule, clamped):
    ``floor(keep * n_valid + 0.5)`` for a fraction, ``min(keep, n_valid)`` for an int count.

    Args:
        prob: (B, T) float priorities.
        valid: (B, T) bool.
        keep: fraction in (0, 1] or int count per row (0 keeps nothing).
        sparsity: keyword alias of ``keep``, converted by :func:`prunecore.budget.keep_from_sparsity`
            (a sparsity of 1.0 keeps nothing).
    Returns:
        (B, T) bool keep mask (False on padding). Ties are broken towards earlier positions.
    """
    if (keep is None) == (sparsity is None):
        raise ValueError("pass exactly one of keep or its alias sparsity= (keep = 1 - sparsity)")
    if keep is not None:
        check_keep(keep)
    budget = keep if keep is not None else keep_from_sparsity(sparsity)
    if budget == 0:
        return torch.zeros_like(valid)
    k = keep_counts(valid.sum(1), budget, clamp=True)
    p = torch.where(valid, prob.float(), torch.full((), -float("inf"), device=prob.device))
    return (torch_rank(p) < k[:, None]) & valid


class Router:
    """Interface: ``keep_prob(inputs) -> (B, T)`` in [0, 1]; ``decode_keep`` for new tokens.

    ``keep_sink``: in prefill the first valid token of each row is always kept (it counts
    toward the kept budget).
    """

    needs_scores = False
    keep_sink = False
    decode_keeps_all = False  # decode_keep is always the validity (no router call needed)

    def keep_prob(self, inputs: RouteInputs) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def decode_keep(self, prob: torch.Tensor, inputs: RouteInputs) -> torch.Tensor:
        """(B, T) bool decision for tokens routed one at a time against a cache."""
        return (prob >= 0.5) & inputs.valid


class StaticRouter(Router):
    """Sink token first, then the most recent tokens backwards (paper).

    The keep probability is 1 for the first valid token and ``0.5 + 0.49 * position`` for the
    others, so top-k keeps ``x_0, x_{L-1}, x_{L-2}, ...`` and a new decode token (position 1)
    is always kept.
    """

    decode_keeps_all = True

    def keep_prob(self, inputs: RouteInputs) -> torch.Tensor:
        first = inputs.valid & (inputs.valid.long().cumsum(1) == 1)
        p = 0.5 + 0.49 * inputs.position
        if inputs.decode:
            return torch.where(inputs.valid, p, torch.zeros_like(p))
        return torch.where(first, torch.ones_like(p), p)

    def decode_keep(self, prob, inputs):
        return inputs.valid.clone()


class RandomRouter(Router):
    """Random token choice (baseline). Seeded; decode keeps a token with probability 1 - s."""

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self._gen = torch.Generator().manual_seed(self.seed)

    def reset(self) -> None:
        self._gen.manual_seed(self.seed)

    def keep_prob(self, inputs: RouteInputs) -> torch.Tensor:
        u = torch.rand(inputs.position.shape, generator=self._gen)
        return u.to(inputs.position.device)

    def decode_keep(self, prob, inputs):
        return (prob >= inputs.sparsity) & inputs.valid


def seeded_linear(n_in: int, n_out: int, generator: torch.Generator) -> nn.Linear:
    """``nn.Linear(n_in, n_out)`` with torch's default initialisation drawn from ``generator``.

    Weight ``(n_out, n_in)``: Kaiming-uniform with ``a = sqrt(5)``; bias ``(n_out,)``:
    ``U(-1/sqrt(n_in), 1/sqrt(n_in))``. The global RNG is not used.
    """
    layer = torch.nn.utils.skip_init(nn.Linear, n_in, n_out)
    with torch.no_grad():
        nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
        bound = 1.0 / math.sqrt(n_in)
        layer.bias.uniform_(-bound, bound, generator=generator)
    return layer


class TokenRouter(nn.Module, Router):
    """The learned FTP router: one global 2-layer MLP shared by all blocks (paper).

    ``features (B, T, 4) -> Linear(4, hidden) -> GELU -> Linear(hidden, 1) -> sigmoid``.
    Decode threshold 0.5 (paper).

    Args:
        hidden: hidden width (paper: 64).
        threshold: decode keep threshold.
        keep_sink: always keep the first (sink) token in prefill (reconstruction: the static
            router does; losing the attention sink in a block is very costly).
        seed: seed of the initial weights (default 0): two routers built with the same seed are
            identical whatever the global torch RNG state, which they neither read nor advance.
    """

    needs_scores = True

    def __init__(self, hidden: int = 64, threshold: float = 0.5, keep_sink: bool = True, seed: int = 0):
        nn.Module.__init__(self)
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        self.hidden = int(hidden)
        self.threshold = float(threshold)
        self.keep_sink = bool(keep_sink)
        gen = torch.Generator().manual_seed(int(seed))
        first, last = (seeded_linear(n_in, n_out, gen) for n_in, n_out in ((N_FEATURES, hidden), (hidden, 1)))
        self.net = nn.Sequential(first, nn.GELU(), last)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(..., 4) features -> (...) keep probability."""
        if features.shape[-1] != N_FEATURES:
            raise ValueError(f"router features must end with {N_FEATURES}, got {tuple(features.shape)}")
        first, last = self.net[0], self.net[2]  # functional calls: no module-call overhead per decode step
        hidden = nn.functional.gelu(nn.functional.linear(features.to(first.weight.dtype), first.weight, first.bias))
        return torch.sigmoid(nn.functional.linear(hidden, last.weight, last.bias).squeeze(-1))

    def keep_prob(self, inputs: RouteInputs) -> torch.Tensor:
        return self(inputs.features())

    def decode_keep(self, prob, inputs):
        return (prob >= self.threshold) & inputs.valid

    def config(self) -> dict:
        return {
            "type": "TokenRouter",
            "hidden": self.hidden,
            "threshold": self.threshold,
            "keep_sink": self.keep_sink,
            "n_features": N_FEATURES,
        }

    def save(self, path: str | Path, extra: dict | None = None) -> Path:
        """Write the weights and config (as safetensors metadata) to ``path``."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"config": json.dumps(self.config())}
        if extra:
            meta["extra"] = json.dumps(extra)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        tmp = path.with_suffix(path.suffix + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> TokenRouter:
        """Read a router written by :meth:`save`."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"router file not found: {path}")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "config" not in meta:
            raise ValueError(f"{path} has no router config in its safetensors metadata")
        cfg = json.loads(meta["config"])
        if cfg.get("type") != "TokenRouter":
            raise ValueError(f"{path} holds a {cfg.get('type')!r}, not a TokenRouter")
        router = cls(hidden=cfg["hidden"], threshold=cfg.get("threshold", 0.5), keep_sink=cfg.get("keep_sink", False))
        router.load_state_dict(load_file(str(path)))
        return router

    @staticmethod
    def load_extra(path: str | Path) -> dict:
        """The ``extra`` metadata dict stored by :meth:`save` (e.g. schedules), or {}."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return json.loads(meta["extra"]) if "extra" in meta else {}
