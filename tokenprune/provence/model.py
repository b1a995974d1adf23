"""Provence model (encoder + ranking head + token head), checkpoint loading and the pruner.

The model wraps ``AutoModelForSequenceClassification`` (``num_labels=1``: the backbone, its
pooler of the first token and the ``classifier`` ranking head, exactly as each architecture
defines them) and adds ``token_classifier`` (hidden -> 2) on the last hidden state. Any
transformers encoder works: DeBERTa-v2/v3, BERT/MiniLM, RoBERTa, ModernBERT...

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

import copy
import functools
import numbers
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from prunecore.budget import check_keep, keep_count, rank_order
from prunecore.device import resolve_device, resolve_dtype
from prunecore.io import atomic_path, atomic_write_bytes, atomic_write_json
from prunecore.models import CheckpointError, load_tokenizer, load_transformers, read_json, read_safetensors
from tokenprune.stats import TokenStats

from .core import (
    MODES,
    apply_title_rule,
    assemble_pruned,
    batch_inputs,
    batch_titles,
    budget_sentences,
    compression,
    kept_token_count,
    normalize_query,
    plan_blocks,
    provence_sentences,
    sentence_scores,
    shape_outputs,
    stitch_blocks,
    token_sentence_spans,
)
from .sentences import split_sentences

__all__ = [
    "ProvenceModel",
    "ProvencePruner",
    "load_provence_model",
    "save_provence_model",
    "resolve_checkpoint_dir",
    "check_fast_tokenizer",
]

MARKER = "prunekit_provence.json"
#: Per-context result keys of :meth:`ProvencePruner.process` (plus ``stats`` for the call).
RESULT_KEYS = (
    "pruned_context",
    "reranking_score",
    "kept_sentences",
    "kept_spans",
    "compression",
    "compression_rate",
    "token_compression",
)
_IGNORED_KEY_SUFFIXES = ("position_ids", "num_batches_tracked")


class ProvenceModel(nn.Module):
    """Cross-encoder with a ranking head and a per-token keep head.

    ``forward(input_ids (B,T), attention_mask (B,T), token_type_ids=None)`` returns
    ``(rank_logits (B,), token_logits (B, T, 2))``.
    """

    def __init__(self, config):
        super().__init__()
        from transformers import AutoModelForSequenceClassification

        config.num_labels = 1
        self.config = config
        self.ranker = AutoModelForSequenceClassification.from_config(config)
        self.token_classifier = nn.Linear(config.hidden_size, 2)

    @classmethod
    def from_encoder(cls, path: str | os.PathLike, **kwargs) -> ProvenceModel:
        """Start from a plain pretrained encoder folder (heads randomly initialised, fp32)."""
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(path), num_labels=1, trust_remote_code=False)
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model.config = config
        model.ranker = load_transformers(
            path, auto_class="AutoModelForSequenceClassification", device=None, dtype="fp32", config=config, **kwargs
        ).train()
        model.token_classifier = nn.Linear(config.hidden_size, 2)
        return model

    def __reduce__(self):
        """Pickle as config + weights (transformers 5 installs unpicklable forward hooks; the
        rebuilt model gets its own)."""
        if type(self) is not ProvenceModel:  # a subclass pickles the plain way
            return super().__reduce__()
        return rebuild_provence_model, (self.config, self.state_dict(), self.training)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        kwargs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "output_hidden_states": True,
            "return_dict": True,
        }
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        out = self.ranker(**kwargs)
        hidden = out.hidden_states[-1]
        head = self.token_classifier
        token_logits = head(hidden.to(head.weight.dtype))
        return out.logits.reshape(-1), token_logits

    # --- state dict in the released (naver) layout -------------------------------------
    def released_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under the naver/Provence key names (``deberta.*``/``bert.*``, ``classifier.*``,
        ``token_classifier.*``)."""
        sd = {k: v for k, v in self.ranker.state_dict().items()}
        for k, v in self.token_classifier.state_dict().items():
            sd[f"token_classifier.{k}"] = v
        return sd

    def load_released_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load weights in the naver, OpenProvence or prunekit layout; raise a ValueError naming
        missing/unexpected keys otherwise."""
        mapped = {}
        for key, value in state.items():
            if key.startswith("ranking_model."):
                key = "ranker." + key[len("ranking_model.") :]
            elif key.startswith("pruning_head.classifier."):
                key = "token_classifier." + key[len("pruning_head.classifier.") :]
            elif key.startswith("pruning_head."):
                key = "unsupported_pruning_head." + key[len("pruning_head.") :]
            elif not key.startswith("token_classifier."):
                key = "ranker." + key
            mapped[key] = value
        own = self.state_dict()
        missing = sorted(k for k in own if k not in mapped and not k.endswith(_IGNORED_KEY_SUFFIXES))
        unexpected = sorted(k for k in mapped if k not in own and not k.endswith(_IGNORED_KEY_SUFFIXES))
        shape_bad = sorted(k for k in mapped if k in own and own[k].shape != mapped[k].shape)
        if missing or unexpected or shape_bad:

            def show(keys):
                return ", ".join(keys[:12]) + (f" ... (+{len(keys) - 12})" if len(keys) > 12 else "")

            raise ValueError(
                "checkpoint does not match a Provence model for this config: "
                f"missing keys [{show(missing)}]; unexpected keys [{show(unexpected)}]; "
                f"shape mismatches [{show(shape_bad)}]"
            )
        self.load_state_dict({k: v for k, v in mapped.items() if k in own}, strict=False)


def rebuild_provence_model(config, state: dict[str, torch.Tensor], training: bool) -> ProvenceModel:
    """Unpickle a :class:`ProvenceModel`: same config, weights, dtype, device and mode."""
    model = ProvenceModel(config)
    first = next(iter(state.values()))
    model.to(device=first.device, dtype=first.dtype)
    model.load_state_dict(state)
    return model.train(training)


# ----------------------------------------------------------------------------------------
# loading / saving
# ----------------------------------------------------------------------------------------
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


def _read_config(folder: Path):
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
    config, raw = _read_config(folder)
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

    Every file is published atomically (a killed save never leaves a half-written file).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model.ranker).__name__]
    atomic_write_bytes(folder / "config.json", model.config.to_json_string().encode())
    state = {k: v.detach().contiguous().cpu() for k, v in model.released_state_dict().items()}
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(state, str(tmp))
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


# ----------------------------------------------------------------------------------------
# the pruner
# ----------------------------------------------------------------------------------------
def check_fast_tokenizer(tokenizer) -> None:
    """Offsets are needed to map tokens to sentences: only fast tokenizers give them."""
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"Provence needs a fast (Rust) tokenizer with offset mapping; got "
            f"{type(tokenizer).__name__} (is_fast=False). Load it with "
            "AutoTokenizer.from_pretrained(..., use_fast=True) or convert it."
        )


class ProvencePruner:
    """Prune and rerank RAG contexts with a Provence model.

    Safe to call from many threads at once: every thread encodes with its own copy of the
    tokenizer (a fast tokenizer's truncation/padding settings are state that each call
    changes), and the model is only read. Picklable (the per-thread copies are dropped).

    Args:
        model_or_path: a :class:`ProvenceModel`, or a folder / cached hub id to load.
        tokenizer: a fast tokenizer (required when a model object is passed).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:0"``...
        dtype: ``"auto"`` (bf16/fp16 on CUDA, fp32 on CPU), or a torch dtype / name.
        max_length: window in tokens (query + context + special tokens), at most the
            backbone's position limit; longer contexts are split into blocks with the query
            repeated. Default: the window saved with the checkpoint (prunekit marker or
            OpenProvence ``max_length``), else ``min(512, position limit)`` — never the
            generation default ``PretrainedConfig.max_length`` (20).
        sentence_splitter: ``text -> list[(start, end)]`` character spans (default: the
            rule-based :func:`tokenprune.provence.sentences.split_sentences`).
        mode: sentence rule of :func:`tokenprune.provence.core.provence_sentences`.
        max_query_tokens: queries longer than this are truncated (default: half the window).
    """

    def __init__(
        self,
        model_or_path,
        tokenizer=None,
        *,
        device="auto",
        dtype="auto",
        max_length: int | None = None,
        sentence_splitter: Callable[[str], list] = split_sentences,
        mode: str = "decision_average",
        max_query_tokens: int | None = None,
    ):
        meta: dict[str, Any] = {}
        #: the folder / hub id the model was loaded from (None for an in-memory model)
        self.source = os.fspath(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) else None
        if isinstance(model_or_path, (str, os.PathLike)):
            model, loaded_tok, meta = load_provence_model(model_or_path)
            tokenizer = tokenizer or loaded_tok
        elif isinstance(model_or_path, ProvenceModel):
            model = model_or_path
            if tokenizer is None:
                raise ValueError("a tokenizer is required when a ProvenceModel object is passed")
        else:
            raise TypeError(
                f"model_or_path must be a ProvenceModel or a path / hub id, got {type(model_or_path).__name__}"
            )
        check_fast_tokenizer(tokenizer)
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.tokenizer = tokenizer
        self.n_special = int(tokenizer.num_special_tokens_to_add(pair=True))
        self.max_length = check_window(max_length, meta.get("window"), model.config, self.n_special)
        self.max_query_tokens = int(max_query_tokens or (self.max_length - self.n_special) // 2)
        self.sentence_splitter = sentence_splitter
        self.mode = mode
        self._local = threading.local()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_local"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def thread_tokenizer(self):
        """This thread's own copy of the tokenizer (made on first use in the thread)."""
        tok = getattr(self._local, "tokenizer", None)
        if tok is None:
            tok = self._local.tokenizer = copy.deepcopy(self.tokenizer)
        return tok

    # -- token probabilities ----------------------------------------------------------------
    def _prepare_query(self, question: str) -> tuple[str, int]:
        tok = self.thread_tokenizer()
        q = normalize_query(question)
        # verbose=False: a long query is truncated here, so transformers' "longer than the
        # maximum sequence length" warning would be false
        enc = tok(q, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids = enc["input_ids"]
        if len(ids) > self.max_query_tokens:
            q = q[: enc["offset_mapping"][self.max_query_tokens - 1][1]]
            ids = tok(q, add_special_tokens=False, verbose=False)["input_ids"]
        return q, len(ids)

    @torch.inference_mode()
    def _run_pairs(self, queries: list[str], texts: list[str], batch_size: int):
        """Run the model on (query, text) pairs.

        Returns ``(per pair: (offsets (T_c, 2) into text, keep probs (T_c,), rank logit),
        number of forward passes)``.
        """
        tok = self.thread_tokenizer()
        results: list[Any] = [None] * len(texts)
        lengths = np.array([len(q) + len(t) for q, t in zip(queries, texts)])
        order = np.argsort(-lengths, kind="stable")
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size].tolist()
            enc = tok(
                [queries[i] for i in idx],
                [texts[i] for i in idx],
                padding=True,
                truncation="only_second",
                max_length=self.max_length,
                return_offsets_mapping=True,
                return_tensors="pt",
            )
            offsets = enc.pop("offset_mapping").numpy()
            inputs = {
                k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")
            }
            rank, tok_logits = self.model(**inputs)
            probs = torch.softmax(tok_logits.float(), dim=-1)[..., 1].cpu().numpy()
            rank = rank.float().cpu().numpy()
            for row, i in enumerate(idx):
                ctx = np.asarray(enc.sequence_ids(row), dtype=object) == 1
                results[i] = (offsets[row][ctx], probs[row][ctx], float(rank[row]))
        return results, -(-len(order) // batch_size)

    # -- public API -------------------------------------------------------------------------
    def process(
        self,
        question,
        context,
        title="first_sentence",
        batch_size: int = 32,
        threshold: float = 0.1,
        always_select_title: bool = False,
        reorder: bool = False,
        top_k: int = 5,
        enable_warnings: bool = True,
        *,
        mode: str | None = None,
        target_tokens: int | None = None,
        target_total_tokens: int | None = None,
        target_ratio: float | None = None,
        keep: float | int | None = None,
        budget_tokenizer=None,
    ):
        """Prune (and optionally rerank) contexts for questions.

        The signature up to ``enable_warnings`` is the released one (positional order
        included). Shapes: ``(str, str)`` -> scalars; ``(str, [str, ...])`` -> one list;
        ``([q, ...], [[ctx, ...], ...])`` -> nested lists (one list per question);
        ``([q, ...], [ctx, ...])`` of equal length -> one context per question, lists.

        Args:
            title: ``"first_sentence"`` (the first sentence of each context is its title),
                ``None`` (no title), or title text(s) matching the contexts' structure: a given
                title is placed before its context (``title + "\\n" + context``) and can then
                appear in the output.
            threshold, mode: the threshold rule, see
                :func:`tokenprune.provence.core.provence_sentences`.
            always_select_title: keep the title iff another sentence is kept.
            reorder: sort each question's contexts by reranking score (descending) and keep
                ``top_k``.
            enable_warnings: warn about a question that is empty after normalisation.
            target_tokens, target_total_tokens, target_ratio: the token budget rule, used
                instead of the threshold when any is given: keep the highest-scoring sentences
                (mean keep probability) that fit in ``target_tokens`` per context, in
                ``target_total_tokens`` over all contexts of a question, and in
                ``keep_count(T, target_ratio)`` tokens of a context of T tokens
                (:func:`tokenprune.provence.core.budget_sentences`; tokens are the model's
                unless ``budget_tokenizer`` is given). With ``reorder``, the budgets are spent
                on the ``top_k`` contexts that are returned (highest reranking scores), so a
                total budget is not lost on contexts that are cut. An integer budget smaller
                than every sentence warns (everything would be pruned to nothing).
            keep: prunekit's budget vocabulary for the same rule: a fraction in (0, 1] is
                ``target_ratio``, an int count is ``target_tokens`` (per context). ``keep=1``
                is a one-token budget, not "keep all" (that is ``keep=1.0``): an int ``keep``
                smaller than every sentence raises a ValueError saying so.
            budget_tokenizer: count the budgets in the generator's tokens instead of the
                pruner's: a Hugging Face tokenizer (counted without special tokens), a
                tokenizer folder, or a callable ``text -> number of tokens``. Sentences are
                counted one by one, and every pruned context is re-counted whole, so
                ``budget_tokenizer(pruned_context)`` never exceeds ``target_tokens`` and the
                sum over a question's contexts never exceeds ``target_total_tokens``.

        Returns:
            dict with, per context, ``pruned_context``, ``reranking_score``,
            ``kept_sentences`` (sorted sentence indices), ``kept_spans`` (``(start, end)``
            character offsets of the kept sentences in the context as passed; a separately
            given title has none), ``compression`` (share of characters removed),
            ``compression_rate`` (the same in percent, OpenProvence's key),
            ``token_compression`` (share of context tokens removed); with ``reorder=True``
            also ``context_index`` (original positions); and ``stats``: one
            :class:`~tokenprune.stats.TokenStats` of the call (context tokens in / inside kept
            sentences, forward passes; extras ``contexts`` and ``blocks``).
        """
        scored = self.score(question, context, title=title, batch_size=batch_size, enable_warnings=enable_warnings)
        return self.decide(
            scored,
            threshold=threshold,
            always_select_title=always_select_title,
            reorder=reorder,
            top_k=top_k,
            mode=mode,
            target_tokens=target_tokens,
            target_total_tokens=target_total_tokens,
            target_ratio=target_ratio,
            keep=keep,
            budget_tokenizer=budget_tokenizer,
        )

    __call__ = process

    def score(
        self, question, context, *, title="first_sentence", batch_size: int = 32, enable_warnings: bool = True
    ) -> dict:
        """The model part of :meth:`process`: token keep probabilities and reranking scores.

        Returns an opaque dict for :meth:`decide` (so several rules can be applied to one
        forward pass); ``scored["items"][q][c]`` holds ``text``, ``sents`` (S, 2), ``offsets``
        (T, 2), ``probs`` (T,) and ``score`` of each context.
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        questions, contexts, shape = batch_inputs(question, context)
        titles = batch_titles(title, contexts, shape)
        tok = self.thread_tokenizer()
        pairs_q, pairs_t, owners, per_ctx = [], [], [], []
        for qi, (q, ctxs) in enumerate(zip(questions, contexts)):
            qn, q_len = self._prepare_query(q)
            if enable_warnings and not qn:
                warnings.warn(
                    f"question {qi} is empty after normalisation ({q!r}): Provence scores the contexts "
                    "without a query, so pruning is not query-aware",
                    stacklevel=3,
                )
            budget = self.max_length - self.n_special - q_len
            for ci, ctx in enumerate(ctxs):
                if not isinstance(ctx, str):
                    raise TypeError(f"contexts must be str, got {type(ctx).__name__}")
                t = titles[qi][ci]
                given_title = t not in ("first_sentence", None)
                text = f"{t}\n{ctx}" if given_title else ctx
                sents = np.asarray(self.sentence_splitter(text), dtype=np.int64).reshape(-1, 2)
                # the whole text is tokenised only for its offsets, then split into windows
                # (plan_blocks): verbose=False silences transformers' false "will result in
                # indexing errors" warning for texts longer than the model's window
                enc = tok(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
                off = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
                tok_spans = token_sentence_spans(off, sents)
                blocks = plan_blocks(tok_spans[:, 0], len(off), budget)
                for a, b in blocks:
                    ca = 0 if a == 0 else int(off[a, 0])
                    cb = len(text) if b >= len(off) else int(off[b, 0])
                    pairs_q.append(qn)
                    pairs_t.append(text[ca:cb])
                    owners.append((len(per_ctx), ca))
                per_ctx.append(
                    {
                        "q": qi,
                        "c": ci,
                        "text": text,
                        "ctx": ctx,
                        "ctx_start": len(text) - len(ctx),
                        "sents": sents,
                        "title_idx": None if t is None or not len(sents) else 0,
                    }
                )
        raw, passes = self._run_pairs(pairs_q, pairs_t, batch_size) if pairs_q else ([], 0)
        grouped: list[list] = [[] for _ in per_ctx]
        for (k, ca), (off, probs, sc) in zip(owners, raw):
            grouped[k].append((off + ca, probs, sc))
        items = [[None] * len(c) for c in contexts]
        for k, info in enumerate(per_ctx):
            offs, probs, sc = stitch_blocks(*zip(*grouped[k]))
            info.update(offsets=offs, probs=probs, score=sc, n_blocks=len(grouped[k]))
            items[info["q"]][info["c"]] = info
        return {"items": items, "shape": shape, "forward_passes": passes}

    def decide(
        self,
        scored: dict,
        *,
        threshold: float = 0.1,
        always_select_title: bool = False,
        reorder: bool = False,
        top_k: int = 5,
        mode: str | None = None,
        target_tokens: int | None = None,
        target_total_tokens: int | None = None,
        target_ratio: float | None = None,
        keep: float | int | None = None,
        budget_tokenizer=None,
        budget_candidates=None,
    ):
        """The sentence part of :meth:`process`, applied to the output of :meth:`score`.

        ``budget_candidates``: for a single question, the indices of the contexts the token
        budgets are spent on (the others keep nothing), e.g. the ones a caller's ``top_k``
        will return. Default: with ``reorder``, the ``top_k`` best-scored contexts; else all.
        """
        mode = mode or self.mode
        keep_int = keep if isinstance(keep, numbers.Integral) and not isinstance(keep, bool) else None
        target_tokens, target_ratio = keep_as_targets(keep, target_tokens, target_ratio)
        budgeted = any(x is not None for x in (target_tokens, target_total_tokens, target_ratio))
        count = token_counter(budget_tokenizer)
        candidates = check_candidates(budget_candidates, scored["items"])
        out = []
        stats = TokenStats("provence", forward_passes=scored["forward_passes"], extras={"contexts": 0, "blocks": 0})
        for row in scored["items"]:
            spans = [token_sentence_spans(info["offsets"], info["sents"]) for info in row]
            if budgeted:
                chosen = candidates
                if chosen is None and reorder:
                    chosen = sorted(range(len(row)), key=lambda i, row=row: -row[i]["score"])[:top_k]
                keeps, shortest = budget_keeps(
                    row,
                    spans,
                    always_select_title,
                    target_tokens,
                    target_total_tokens,
                    target_ratio,
                    count=count,
                    candidates=chosen,
                )
                check_int_budget(shortest, keep_int, target_tokens, target_total_tokens)
            else:
                keeps = [
                    provence_sentences(info["probs"], sp, threshold=threshold, mode=mode)
                    for info, sp in zip(row, spans)
                ]
            new_row = []
            for info, sp, keep in zip(row, spans, keeps):
                keep = apply_title_rule(keep, title_index=info["title_idx"], always_select_title=always_select_title)
                pruned = assemble_pruned(info["text"], info["sents"], keep)
                n_kept = kept_token_count(sp, keep)
                stats = stats + TokenStats(
                    "provence",
                    tokens_in=len(info["offsets"]),
                    tokens_kept=n_kept,
                    extras={"contexts": 1, "blocks": info["n_blocks"]},
                )
                char_share = compression(info["text"], pruned)
                in_ctx = info["sents"][keep] - info["ctx_start"]
                new_row.append(
                    {
                        "pruned_context": pruned,
                        "reranking_score": info["score"],
                        "kept_sentences": np.flatnonzero(keep).tolist(),
                        "kept_spans": [tuple(s) for s in in_ctx[in_ctx[:, 0] >= 0].tolist()],
                        "compression": char_share,
                        "compression_rate": 100.0 * char_share,
                        "token_compression": 1.0 - n_kept / len(info["offsets"]) if len(info["offsets"]) else 0.0,
                    }
                )
            out.append(new_row)
        result = shape_outputs(out, scored["shape"], RESULT_KEYS, reorder=reorder, top_k=top_k)
        result["stats"] = stats
        return result


def keep_as_targets(keep, target_tokens, target_ratio):
    """``keep=`` (a fraction or a count, checked by the one budget rule) as ``(target_tokens,
    target_ratio)``; a ValueError when it would override an explicit target."""
    if keep is None:
        return target_tokens, target_ratio
    check_keep(keep)
    if isinstance(keep, numbers.Integral):
        if target_tokens is not None:
            raise ValueError("pass either keep=<count> or target_tokens=, not both")
        return int(keep), target_ratio
    if target_ratio is not None:
        raise ValueError("pass either keep=<fraction> or target_ratio=, not both")
    return target_tokens, float(keep)


def token_counter(budget_tokenizer) -> Callable[[str], int] | None:
    """``text -> token count`` of a budget tokenizer (None: count the pruner's own tokens).

    Accepts a Hugging Face tokenizer (counted without special tokens), a tokenizer folder /
    cached hub id (loaded once, no remote code) or a callable ``text -> int``.
    """
    if budget_tokenizer is None:
        return None
    if isinstance(budget_tokenizer, (str, os.PathLike)):
        budget_tokenizer = cached_tokenizer(os.fspath(budget_tokenizer))
    if hasattr(budget_tokenizer, "num_special_tokens_to_add") and hasattr(budget_tokenizer, "encode"):
        tok = budget_tokenizer
        return lambda text: len(tok.encode(text, add_special_tokens=False, verbose=False))
    if callable(budget_tokenizer):
        fn = budget_tokenizer

        def count(text: str) -> int:
            n = fn(text)
            if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
                raise TypeError(f"budget_tokenizer must return a non-negative int token count, got {n!r}")
            return int(n)

        return count
    raise TypeError(
        "budget_tokenizer must be a Hugging Face tokenizer, a tokenizer folder, or a callable text -> token "
        f"count (e.g. lambda s: len(enc.encode(s)) for tiktoken), got {type(budget_tokenizer).__name__}"
    )


@functools.lru_cache(maxsize=4)
def cached_tokenizer(name_or_path: str):
    """A budget tokenizer loaded once per folder / cached hub id (no download, no remote code)."""
    return load_tokenizer(resolve_checkpoint_dir(name_or_path))


def check_candidates(candidates, items: list[list[dict]]) -> list[int] | None:
    """``budget_candidates`` as a list of context indices of the single question (or None)."""
    if candidates is None:
        return None
    if len(items) != 1:
        raise ValueError(f"budget_candidates needs a single question, got {len(items)}")
    out = [int(i) for i in candidates]
    if any(not 0 <= i < len(items[0]) for i in out):
        raise ValueError(f"budget_candidates {out} out of range for {len(items[0])} contexts")
    return out


def check_int_budget(shortest: int | None, keep_int, target_tokens, target_total) -> None:
    """Refuse (``keep=<int>``) or warn (``target_tokens`` / ``target_total_tokens``) when an
    integer token budget is smaller than every sentence, so every context would come back
    empty. ``shortest``: tokens of the shortest sentence that could be kept (None: none)."""
    ints = [b for b in (target_tokens, target_total) if b is not None]
    if shortest is None or not ints or min(ints) >= shortest:
        return
    if keep_int is not None and keep_int == min(ints):
        raise ValueError(
            f"keep={keep_int} is a budget of {keep_int} token(s) (an int keep is a token count), smaller than "
            f"every sentence (the shortest has {shortest} tokens): every context would be pruned to nothing. "
            f"To keep everything pass keep=1.0 (a fraction) or no budget; for a token budget pass keep >= {shortest}"
        )
    warnings.warn(
        f"token budget {min(ints)} (target_tokens={target_tokens}, target_total_tokens={target_total}) is smaller "
        f"than every sentence (the shortest has {shortest} tokens): every context is pruned to nothing. To keep "
        f"everything pass no budget (or target_ratio=1.0 / keep=1.0); for a token budget pass at least {shortest}",
        UserWarning,
        stacklevel=4,
    )


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


def budget_keeps(
    row: list[dict],
    spans: list,
    always_select_title: bool,
    target_tokens,
    target_total,
    target_ratio,
    *,
    count: Callable[[str], int] | None = None,
    candidates: list[int] | None = None,
):
    """Sentence keep masks of one question's contexts under the token budgets.

    ``row``: the contexts' scored items; ``spans``: their (S_c, 2) token spans. Budgets per
    context: ``target_tokens`` and ``keep_count(T_c, target_ratio)`` (the smaller), and
    ``target_total`` over the row. With ``always_select_title`` the title is taken first so
    that it fits inside the budget. ``count``: ``text -> tokens`` of the budget tokenizer
    (None: the pruner's tokens); then every pruned context is counted whole, as it will be
    sent (:func:`counted_budget_sentences`: token counts need not add up over sentences).
    ``candidates``: the contexts the budgets are spent on (None: all); the others keep nothing.

    Returns ``(masks, shortest)``: the (S_c,) bool masks, and the tokens of the shortest
    sentence that could be kept (None when there is none), for :func:`check_int_budget`.
    """
    if not row:
        return [], None
    chosen = set(range(len(row)) if candidates is None else candidates)
    scores, lengths, groups, group_budgets = [], [], [], []
    for c, (info, sp) in enumerate(zip(row, spans)):
        sc = sentence_scores(info["probs"], sp)
        if always_select_title and info["title_idx"] is not None and np.isfinite(sc[info["title_idx"]]):
            sc[info["title_idx"]] = np.inf
        if c not in chosen:
            sc[:] = -np.inf
        scores.append(sc)
        if count is None:
            lengths.append(sp[:, 1] - sp[:, 0])
            n_tokens = len(info["offsets"])
        else:
            lengths.append(np.array([count(info["text"][a:b]) for a, b in info["sents"]], dtype=np.int64))
            n_tokens = count(info["text"])
        groups.append(np.full(len(sp), c))
        cap = n_tokens if target_tokens is None else int(target_tokens)
        if target_ratio is not None:
            cap = min(cap, keep_count(n_tokens, float(target_ratio)))
        group_budgets.append(cap)
    scores, lengths, groups = np.concatenate(scores), np.concatenate(lengths), np.concatenate(groups)
    keepable = (scores != -np.inf) & (lengths > 0)
    shortest = int(lengths[keepable].min()) if keepable.any() else None
    bounds = np.cumsum([0] + [len(sp) for sp in spans])
    if count is None:
        keep = budget_sentences(scores, lengths, groups=groups, group_budgets=group_budgets, total_budget=target_total)
    else:
        keep = counted_budget_sentences(row, scores, groups, bounds, group_budgets, target_total, count)
    return [keep[a:b] for a, b in zip(bounds[:-1], bounds[1:])], shortest


def counted_budget_sentences(row, scores, groups, bounds, group_budgets, target_total, count) -> np.ndarray:
    """The budget rule of :func:`~tokenprune.provence.core.budget_sentences` with a token
    count that need not add up over sentences: sentences are visited by score (best first,
    ties by position) and one is kept when the whole pruned text of its context, counted by
    ``count``, still fits its context's budget and the sum over contexts the total budget.

    Returns the (N,) bool mask over the concatenated sentences of ``row``.
    """
    keep = np.zeros(scores.shape[0], dtype=bool)
    used = np.zeros(len(row), dtype=np.int64)
    total = np.iinfo(np.int64).max if target_total is None else int(target_total)
    for i in rank_order(scores).tolist():
        if scores[i] == -np.inf:
            continue
        g = int(groups[i])
        keep[i] = True
        mask = keep[bounds[g] : bounds[g + 1]]
        n = count(assemble_pruned(row[g]["text"], row[g]["sents"], mask))
        if n <= group_budgets[g] and used.sum() - used[g] + n <= total:
            used[g] = n
        else:
            keep[i] = False
    return keep
