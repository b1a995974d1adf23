"""The CPU thread count of a run's float work (encoder, k-means, similarities).

BLAS libraries (MKL, OpenBLAS, faiss's) may split a reduction differently for another number
of threads, so a float result can change in its last bits with the thread count (measured:
faiss k-means centroids with 4 vs 1 threads, SemDeDup similarities with 2 vs 1). A run
therefore fixes the count (``--threads``; default: torch's count when the run starts),
runs every such step under it, in whichever process (local or Ray worker), and records it in
the fingerprints of the stages whose results it can change.
"""

from __future__ import annotations

import contextlib
import importlib.util


def resolve_threads(threads: int | None) -> int:
    """``threads``, or torch's current CPU thread count when None."""
    import torch

    return int(threads) if threads is not None else torch.get_num_threads()


@contextlib.contextmanager
def compute_threads(threads: int | None):
    """Run the block with torch and faiss on ``threads`` CPU threads (None: unchanged);
    the previous counts are restored after it."""
    if threads is None:
        yield
        return
    import torch

    faiss = None
    if importlib.util.find_spec("faiss") is not None:
        import faiss
    before = torch.get_num_threads(), faiss.omp_get_max_threads() if faiss else None
    _set(torch, faiss, int(threads), int(threads))
    try:
        yield
    finally:
        _set(torch, faiss, *before)


def _set(torch, faiss, torch_threads: int, faiss_threads: int | None) -> None:
    if torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)
    if faiss is not None and faiss_threads is not None:
        faiss.omp_set_num_threads(faiss_threads)
