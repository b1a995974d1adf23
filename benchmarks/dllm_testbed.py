"""A small, really trained masked diffusion LM (dLLM) to test dLLM decoding rules honestly.

No diffusion-LM weights exist offline, so this module trains one: a bidirectional transformer
with an MDLM/LLaDA-style masking objective on tasks whose answers are checked exactly and
which have local structure (see :data:`TASKS`):

* ``add``: ``a+b=`` with ``a, b`` of 1..``DIGITS`` digits, each written least-significant
  digit first and zero-padded; the answer is ``a+b`` least-significant digit first, then
  ``<eos>`` up to ``GEN_LENGTH``: ``829000+508600=`` -> ``3377`` (928 + 6805 = 7733).
* ``parity``: 12 bits; the answer is the running parity ``s_i = s_{i-1} xor d_i``.

Training (LLaDA SFT convention): the prompt is never masked; each generated-region token is
replaced by ``<mask>`` with probability ``t ~ U(0, 1)`` per sample, and the loss is the
cross-entropy on the masked tokens. CPU, 1-2 threads, a few minutes; the weights are cached
under ``~/.cache/prunekit/dllm_testbed/`` (override with ``$PRUNEKIT_CACHE``).

The model's ``forward(input_ids, attention_mask=None, past_key_values=None, use_cache=False)``
returns an object with ``.logits`` (and ``.past_key_values`` when asked), as LLaDA/Dream do,
so :func:`tokenprune.localleap_generate` runs on it unchanged, prefix KV cache included.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

DIGITS = 6
GEN_LENGTH = 16
CHARS = "0123456789+="
SPECIALS = ["<bos>", "<eos>", "<mask>", "<pad>"]


# ------------------------------------------------------------------------------ tokenizer
class TestbedTokenizer:
    """Character tokenizer with the attributes dLLM pipelines read (mask/eos/pad/bos ids)."""

    def __init__(self):
        self.vocab = list(CHARS) + SPECIALS
        self.stoi = {s: i for i, s in enumerate(self.vocab)}
        self.bos_token_id = self.stoi["<bos>"]
        self.eos_token_id = self.stoi["<eos>"]
        self.mask_token_id = self.stoi["<mask>"]
        self.pad_token_id = self.stoi["<pad>"]
        self.all_special_ids = [self.stoi[s] for s in SPECIALS]

    def __len__(self):
        return len(self.vocab)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            ids = [self.stoi[c] for c in text]
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} is not in the testbed vocabulary") from None
        return ([self.bos_token_id] if add_special_tokens else []) + ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        special = set(self.all_special_ids)
        return "".join(self.vocab[i] for i in ids if not (skip_special_tokens and i in special))


# ------------------------------------------------------------------------------ model
@dataclass
class TestbedConfig:
    vocab_size: int = len(CHARS) + len(SPECIALS)
    d_model: int = 96
    n_layers: int = 3
    n_heads: int = 4
    max_len: int = 40
    mask_token_id: int = len(CHARS) + 2
    eos_token_id: int = len(CHARS) + 1


@dataclass
class TestbedOutput:
    logits: torch.Tensor
    past_key_values: tuple | None = None


class _Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.h = h
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, key_mask, past):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=-1)
        q, k, v = (t.view(B, T, self.h, D // self.h).transpose(1, 2) for t in (q, k, v))
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # bidirectional
        x = x + self.proj(attn.transpose(1, 2).reshape(B, T, D))
        x = x + self.mlp(self.ln2(x))
        return x, (k, v)


class TestbedDLLM(nn.Module):
    """Bidirectional transformer masked-diffusion LM (pre-LN, learned positions)."""

    def __init__(self, config: TestbedConfig | None = None):
        super().__init__()
        self.config = config or TestbedConfig()
        c = self.config
        self.tok = nn.Embedding(c.vocab_size, c.d_model)
        self.pos = nn.Embedding(c.max_len, c.d_model)
        self.blocks = nn.ModuleList(_Block(c.d_model, c.n_heads) for _ in range(c.n_layers))
        self.ln = nn.LayerNorm(c.d_model)
        self.head = nn.Linear(c.d_model, c.vocab_size)

    def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=False):
        B, T = input_ids.shape
        past_len = past_key_values[0][0].shape[2] if past_key_values else 0
        if attention_mask is not None:  # left padding: positions count real tokens only
            am = attention_mask.bool()
            if am.shape[1] != past_len + T:
                raise ValueError("attention_mask must cover the cached and the new positions")
            pos = (am.long().cumsum(-1) - 1).clamp_min(0)[:, past_len:]
            key_mask = am[:, None, None, :]
        else:
            pos = torch.arange(past_len, past_len + T, device=input_ids.device).expand(B, T)
            key_mask = None
        if pos.max() >= self.config.max_len:
            raise ValueError(f"sequence longer than max_len={self.config.max_len}")
        x = self.tok(input_ids) + self.pos(pos)
        new_cache = []
        for i, blk in enumerate(self.blocks):
            x, kv = blk(x, key_mask, past_key_values[i] if past_key_values else None)
            new_cache.append(kv)
        logits = self.head(self.ln(x))
        return TestbedOutput(logits=logits, past_key_values=tuple(new_cache) if use_cache else None)


# ------------------------------------------------------------------------------ tasks
# A problem is a (prompt, answer) pair of strings; exact match compares the generated text
# before the first <eos> with the answer.
PARITY_BITS = 12


def _add_problems(n, generator):
    lens = torch.randint(1, DIGITS + 1, (n, 2), generator=generator)
    lo = (10 ** (lens - 1)).double()
    hi = (10**lens).double()
    u = torch.rand((n, 2), generator=generator, dtype=torch.float64)
    vals = torch.where(lens == 1, (u * 10).floor().long(), (lo + u * (hi - lo)).floor().long())
    return [(f"{str(a).zfill(DIGITS)[::-1]}+{str(b).zfill(DIGITS)[::-1]}=", str(a + b)[::-1]) for a, b in vals.tolist()]


def _parity_problems(n, generator):
    d = torch.randint(0, 2, (n, PARITY_BITS), generator=generator)
    s = d.cumsum(-1) % 2
    return [("".join(map(str, a)) + "=", "".join(map(str, b))) for a, b in zip(d.tolist(), s.tolist())]


TASKS = {
    # reversed addition: a, b of 1..6 digits, least-significant digit first, zero-padded;
    # answer = reversed sum. The carry is the only long-range dependency.
    "add": _add_problems,
    # running parity of 12 bits ("worked steps" of a parity): s_i = s_{i-1} xor d_i; each
    # answer bit is easy given its left neighbour, hard from the prompt alone (parity).
    "parity": _parity_problems,
}


# training steps per task (the default of load_or_train and of the benchmark)
TRAIN_STEPS = {"add": 3000, "parity": 6000}


def make_problems(n: int, *, task: str = "add", generator: torch.Generator | None = None):
    """``n`` random (prompt, answer) string pairs of ``task`` (see :data:`TASKS`)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")
    return TASKS[task](n, generator)


def make_batch(problems, tok: TestbedTokenizer, *, gen_length: int = GEN_LENGTH):
    """Token ids ``(n, P + gen_length)`` (prompt, answer, eos fill) and the prompt length P."""
    rows = []
    P = None
    for prompt, ans in problems:  # data preparation, once per example
        p = tok.encode(prompt)
        a = tok.encode(ans, add_special_tokens=False)
        if P is None:
            P = len(p)
        if len(p) != P or len(a) > gen_length:
            raise ValueError("prompts of a task must share one length; answers fit gen_length")
        rows.append(p + a + [tok.eos_token_id] * (gen_length - len(a)))
    return torch.tensor(rows, dtype=torch.long), P


def cache_dir() -> Path:
    root = Path(os.environ.get("PRUNEKIT_CACHE", Path.home() / ".cache" / "prunekit"))
    return root / "dllm_testbed"


def train(
    *,
    task: str = "add",
    steps: int = 3000,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    threads: int = 2,
    log_every: int = 250,
    config: TestbedConfig | None = None,
):
    """Train the testbed dLLM; returns the model (eval mode)."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    tok = TestbedTokenizer()
    model = TestbedDLLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    t0 = time.time()
    model.train()
    for step in range(steps):
        ids, P = make_batch(make_problems(batch_size, task=task, generator=g), tok)
        t = torch.rand(batch_size, 1, generator=g)
        noise = torch.rand(ids.shape, generator=g)
        mask = (noise < t) & (torch.arange(ids.shape[1]) >= P)
        mask[:, P] |= ~mask[:, P:].any(-1)  # at least one masked token per row
        inp = ids.masked_fill(mask, tok.mask_token_id)
        logits = model(inp).logits
        loss = F.cross_entropy(logits[mask], ids[mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            msg = f"step {step:5d}  loss {loss.item():.4f}  {time.time() - t0:6.1f}s"
            if step and (step % (4 * log_every) == 0 or step == steps - 1):
                model.eval()
                msg += f"  one-per-step acc {quick_accuracy(model, tok, task=task, n=64):.3f}"
                model.train()
            print(msg, flush=True)
    model.eval()
    return model


def weights_path(task: str, steps: int) -> Path:
    return cache_dir() / f"testbed_{task}_g{GEN_LENGTH}_s{steps}.pt"


def load_or_train(
    *, task: str = "add", steps: int | None = None, retrain: bool = False, threads: int = 2, verbose: bool = True
) -> TestbedDLLM:
    """Load the cached weights (``safetensors``-free plain state dict, ``weights_only``) or train."""
    steps = TRAIN_STEPS[task] if steps is None else steps
    path = weights_path(task, steps)
    model = TestbedDLLM()
    if path.exists() and not retrain:
        model.load_state_dict(torch.load(path, weights_only=True))
        model.eval()
        return model
    if verbose:
        print(f"training the testbed dLLM on {task!r} ({steps} steps) -> {path}", flush=True)
    model = train(task=task, steps=steps, threads=threads, log_every=100 if verbose else 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return model


def quick_accuracy(model, tok, *, task: str = "add", n: int = 64, seed: int = 123) -> float:
    """Exact match of LLaDA one-token-per-step decoding on ``n`` fresh problems."""
    from tokenprune.localleap import localleap_generate

    pairs = make_problems(n, task=task, generator=torch.Generator().manual_seed(seed))
    ids, P = make_batch(pairs, tok)
    res = localleap_generate(
        model, ids[:, :P], gen_length=GEN_LENGTH, block_length=GEN_LENGTH, mask_id=tok.mask_token_id, rule="llada"
    )
    return exact_match(res.generated, pairs, tok).float().mean().item()


def exact_match(generated: torch.Tensor, problems, tok: TestbedTokenizer) -> torch.Tensor:
    """(n,) bool: the generated text before the first ``<eos>`` equals the answer."""
    out = []
    for row, (_, ans) in zip(generated.tolist(), problems):
        if tok.eos_token_id in row:
            row = row[: row.index(tok.eos_token_id)]
        out.append(tok.decode(row) == ans)
    return torch.tensor(out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="add", choices=sorted(TASKS))
    ap.add_argument("--steps", type=int, default=None, help="default: TRAIN_STEPS[task]")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--retrain", action="store_true")
    args = ap.parse_args()
    load_or_train(task=args.task, steps=args.steps, retrain=args.retrain, threads=args.threads)
