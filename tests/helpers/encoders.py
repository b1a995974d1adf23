"""Test encoders of the shard pipeline."""

import numpy as np

from pipelines.encoders import PixelProjectionEncoder


class LayoutSensitiveEncoder(PixelProjectionEncoder):
    """The pixel projection, moved by the batch layout: a row shifts with the batch's length
    and its place in it, as when a BLAS kernel picks another reduction order for another shape
    or row (on some machines by a last bit; here always, and visibly). Records the lengths."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.fingerprint = {**self.fingerprint, "kind": "layout_sensitive"}
        self.lengths = []

    def encode_prepared(self, items):
        self.lengths.append(len(items))
        rows = super().encode_prepared(items)
        rows[:, 0] += 1e-3 * len(items)
        rows[:, 1] += 1e-3 * np.arange(len(items))
        return rows
