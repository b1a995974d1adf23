"""The cache a routed layer's attention talks to (see :mod:`tokenprune.ftp.attach`)."""

from __future__ import annotations


class ProxyCache:
    """What the wrapped attention sees as its cache; only ``update`` is used by the attention.

    ``update`` receives the K/V of the gathered query tokens ``(B, H_kv, Tq, D)``, writes them
    (at their slots, zeros elsewhere) into the real cache when there is one, and returns the K/V
    of the key slots the layer may attend to, ``(B, H_kv, K, D)``.
    """

    def __init__(self, real, *, T, S_total=None, q_keep=None, q_ok=None, k_idx=None):
        self.real = real
        self.T = T
        self.S_total = T if S_total is None else S_total
        self.q_keep = q_keep  # (B, T) bool or None (= identity, all T queries in order)
        self.q_ok = q_ok  # (B, Tq) bool
        self.k_idx = k_idx  # (B, K) long slots to return, or None (= everything)
        self.keys = None

    def _full(self, x):
        if self.q_keep is None:
            return x
        B, H, _, D = x.shape
        full = x.new_zeros(B, self.T, H, D)
        full[self.q_keep] = x.transpose(1, 2)[self.q_ok]
        return full.transpose(1, 2)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = self._full(key_states), self._full(value_states)
        if self.real is not None:
            k, v = self.real.update(k, v, layer_idx, *args, **kwargs)
        if self.k_idx is not None:
            # a sliding-window cache returns only the last slots; older ones are outside the
            # window of every query of this call (masked), so clamping their index is harmless
            offset = self.S_total - k.shape[2]
            kidx = (self.k_idx - offset).clamp_min(0)
            idx = kidx[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
            k, v = k.gather(2, idx), v.gather(2, idx)
        self.keys = k
        return k, v

    def __getattr__(self, name):  # anything else (rarely used by attention code) -> real cache
        real = self.__dict__.get("real")
        if real is None:
            raise AttributeError(name)
        return getattr(real, name)
