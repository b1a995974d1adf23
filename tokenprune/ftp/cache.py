"""A compact per-layer KV cache for FTP (a transformers ``Cache``).

Each layer stores only the K/V of the tokens it computed, ``(B, H_kv, N_l, D)``, with their
original slots ``(B, N_l)`` and a validity mask ``(B, N_l)`` (False for padding, and for
entries a batch row did not compute while another row did). ``N_l`` is the largest number of
tokens any row computed in that layer, so the KV memory shrinks with the sparsity.

The cache also carries the per-sequence routing state (validity of every slot, the latest
attention-score feature, the valid-token count, and which rows are still before an
end-of-sequence token), so that beam search reorders it together with the K/V
(:meth:`FTPCache.reorder_cache`, :meth:`FTPCache.batch_select_indices`,
:meth:`FTPCache.batch_repeat_interleave`).

``get_seq_length()`` is the number of slots seen (prompt plus generated tokens), as with a
dense cache, so ``generate``'s position bookkeeping and the model's mask sizes stay correct.

A cache the caller passes to a routed prefill (``model(ids, cache=DynamicCache())``) is not
filled with dense K/V: an :class:`FTPCache` stands in for it (:func:`stand_in_for`,
:func:`adopt`). A plain ``DynamicCache`` is adopted (it shares the compact layers, so its
length is right and passing it again continues the sequence); any other cache type stays
empty and passing it again for a continuation is refused with an error.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache


class CompactLayer(CacheLayerMixin):
    """One layer's compact K/V.

    Attributes:
        keys, values: (B, H_kv, N, D) K/V of the entries (after rotary embeddings); views of
            buffers with a little spare room (at most 1/32 + 8 slots), so a decode step appends
            in place instead of copying the whole cache as ``torch.cat`` would.
        slots: (B, N) long, the original slot of every entry.
        valid: (B, N) bool, entries a query may attend to.
        seen: slots processed by this layer so far (host int; skipped tokens count).
        complete: host flag, the layer holds every slot ``0..seen-1`` in order with the
            sequence's validity (a dense layer: the model's own mask is right for it).
        holes: host flag, some entry is invalid (attention then needs an explicit mask).
        pending: ``(slots (B, Tq), valid (B, Tq))`` of the next :meth:`update`, set by the
            routed layer before it calls the wrapped attention.
    """

    is_sliding = False
    is_croppable = False

    def __init__(self):
        super().__init__()
        self.buffers: list[torch.Tensor] = []  # keys, values (B, H, cap, D); slots, valid (B, cap)
        self.n = 0
        self.seen = 0
        self.complete = True
        self.holes = False
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, dev = key_states.shape[0], key_states.device
        self.buffers = [
            key_states.new_zeros(*key_states.shape[:2], 0, key_states.shape[3]),
            value_states.new_zeros(*value_states.shape[:2], 0, value_states.shape[3]),
            torch.zeros(B, 0, dtype=torch.long, device=dev),
            torch.zeros(B, 0, dtype=torch.bool, device=dev),
        ]
        self.device = dev
        self.is_initialized = True
        self.set_views()

    def set_views(self) -> None:
        self.keys, self.values = self.buffers[0][:, :, : self.n], self.buffers[1][:, :, : self.n]

    @property
    def slots(self) -> torch.Tensor | None:
        return self.buffers[2][:, : self.n] if self.buffers else None

    @property
    def valid(self) -> torch.Tensor | None:
        return self.buffers[3][:, : self.n] if self.buffers else None

    def update(self, key_states, value_states, *args, **kwargs):
        """Append the staged entries; return every entry's K/V ``(B, H_kv, N + Tq, D)``."""
        if self.pending is None:
            raise RuntimeError("FTP cache layer updated without staged slots; the layer must be wrapped by attach_ftp")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        slots, ok = self.pending
        self.pending = None
        n, new = self.n, (key_states, value_states, slots, ok)
        need = n + key_states.shape[-2]
        cap = self.buffers[2].shape[1]
        if need > cap:  # grow: exact for a prefill, then a little spare room for decode steps
            room = need if n == 0 else need + 8 + need // 32
            self.buffers = [self.grown(buf, n, room) for buf in self.buffers]
        for buf, x in zip(self.buffers, new):
            if buf.ndim == 4:
                buf[:, :, n:need] = x
            else:
                buf[:, n:need] = x
        self.n = need
        self.set_views()
        return self.keys, self.values

    @staticmethod
    def grown(buf: torch.Tensor, n: int, room: int) -> torch.Tensor:
        """A buffer with ``room`` slots holding the first ``n`` slots of ``buf``."""
        dim = 2 if buf.ndim == 4 else 1
        shape = list(buf.shape)
        shape[dim] = room
        out = buf.new_zeros(shape)
        out.narrow(dim, 0, n).copy_(buf.narrow(dim, 0, n))
        return out

    def entries(self) -> int:
        """N, the number of stored entries (0 before the first update)."""
        return self.n

    def nbytes(self) -> int:
        """Bytes allocated for this layer's K/V (spare room included)."""
        return sum(b.numel() * b.element_size() for b in self.buffers[:2])

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the FTP cache cannot be cropped (assisted decoding is not supported with FTP)")

    def offload(self):
        raise NotImplementedError("the FTP cache does not offload")

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep/reorder batch rows: ``index`` (B',) long."""
        if self.is_initialized:
            index = index.to(self.device)
            self.buffers = [b.index_select(0, index) for b in self.buffers]
            self.set_views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.select_rows(torch.as_tensor(indices).reshape(-1))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            B = self.buffers[0].shape[0]
            self.select_rows(torch.arange(B, device=self.device).repeat_interleave(repeats))


class FTPCache(Cache):
    """Compact per-layer KV cache plus the per-sequence routing state of FTP.

    Attributes (the routing state; all ``(B, ...)`` on the model's device):
        seq_valid: (B, S) bool, False on padding slots.
        score: (B, S) float32, the latest attention-score feature of every slot.
        n_valid: (B,) long, valid slots so far.
        alive: (B,) bool, False once the row fed an end-of-sequence token (statistics only).
    """

    def __init__(self, n_layers: int):
        super().__init__(layers=[CompactLayer() for _ in range(n_layers)])
        self.seq_valid: torch.Tensor | None = None
        self.score: torch.Tensor | None = None
        self.n_valid: torch.Tensor | None = None
        self.alive: torch.Tensor | None = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].seen

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.layers[layer_idx].get_mask_sizes(query_length)

    def append_tokens(self, valid_new: torch.Tensor) -> None:
        """Grow the routing state by the ``(B, T)`` bool validity of a call's new tokens."""
        B, T = valid_new.shape
        new_score = torch.zeros(B, T, dtype=torch.float32, device=valid_new.device)
        if self.seq_valid is None:
            self.seq_valid, self.score = valid_new, new_score
            self.n_valid = valid_new.sum(1)
            self.alive = torch.ones(B, dtype=torch.bool, device=valid_new.device)
        else:
            self.seq_valid = torch.cat([self.seq_valid, valid_new], 1)
            self.score = torch.cat([self.score, new_score], 1)
            self.n_valid = self.n_valid + valid_new.sum(1)

    def _select_state(self, index: torch.Tensor) -> None:
        if self.seq_valid is not None:
            index = index.to(self.seq_valid.device)
            self.seq_valid, self.score = self.seq_valid.index_select(0, index), self.score.index_select(0, index)
            self.n_valid, self.alive = self.n_valid.index_select(0, index), self.alive.index_select(0, index)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._select_state(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._select_state(torch.as_tensor(indices).reshape(-1))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.seq_valid is not None:
            B = self.seq_valid.shape[0]
            self._select_state(torch.arange(B, device=self.seq_valid.device).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the FTP cache cannot be cropped (assisted decoding is not supported with FTP)")


def adopt(stand_ins, own: Cache, seq: FTPCache) -> None:
    """Let ``seq`` stand in for the caller's cache ``own`` passed to a routed prefill.

    A plain ``DynamicCache`` takes ``seq``'s compact layers (one list shared by both), so its
    ``get_seq_length()`` counts the sequence and passing it again continues with ``seq``;
    any other cache type is only marked (it stays empty; :func:`stand_in_for` refuses it for
    a continuation).

    Args:
        stand_ins: ``weakref.WeakKeyDictionary`` caller cache -> FTPCache (or None: marked).
        own: the caller's empty cache; seq: the FTPCache the model runs with instead.
    """
    if type(own) is DynamicCache:
        own.layers = seq.layers
        stand_ins[own] = seq
    else:
        stand_ins[own] = None


def stand_in_for(stand_ins, own: Cache, attention_mask: torch.Tensor | None, n_new: int) -> Cache:
    """The cache a routed call runs with when the caller passes its own (non-FTP) cache ``own``.

    Returns the adopted :class:`FTPCache` when ``own`` is a ``DynamicCache`` that FTP filled
    (the plain manual decode loop), else ``own`` (a fresh prefill: FTP then swaps a new
    FTPCache in and :func:`adopt` s ``own``).

    Raises:
        ValueError: ``own`` is another cache type that FTP left empty at a prefill and it comes
            back for a continuation (an ``attention_mask`` longer than the ``n_new`` new
            tokens, or no mask): decoding from it would silently restart the sequence.
    """
    if own not in stand_ins:
        return own
    seq = stand_ins[own]
    if seq is not None:  # an adopted DynamicCache; after own.reset() its shared layers are empty again
        return seq if own.layers is seq.layers and seq.get_seq_length() > 0 else own
    if own.get_seq_length() == 0 and (attention_mask is None or attention_mask.shape[1] != n_new):
        raise ValueError(
            f"this {type(own).__name__} was passed to an FTP prefill and stays empty: FTP keeps the K/V in its own "
            "FTPCache, returned as the output's `cache` (`past_key_values`). Pass that returned cache to the next "
            "call (`cache = out.past_key_values`), or pass a DynamicCache (FTP fills it), or a new cache (with an "
            "attention_mask of the new tokens only) to start a new sequence"
        )
    return own


def cache_nbytes(cache) -> int:
    """Bytes allocated for the K/V of a transformers cache (an :class:`FTPCache` or a dense one)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        if isinstance(layer, CompactLayer):
            total += layer.nbytes()
            continue
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
