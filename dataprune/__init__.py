"""Dataset pruning: SSP, SemDeDup, DBP, KD-aided random subsets.

Methods are pure: embeddings (n, d) in, a :class:`Selection` out, one function per method
named after it (:func:`semdedup`, :func:`dbp`, :func:`ssp`, :func:`random_subset`), the
budget ``keep`` (a fraction or a count) first after the data, and ``order`` (``"hard"``:
farthest from the centroid first) wherever a method ranks rows.
"""

from .dbp import cluster_complexity, dbp, dbp_quotas, prune_dbp
from .kd import TeacherLogitCache, fill_teacher_cache, kd_alpha, kd_loss
from .random_subset import random_subset
from .selection import Selection
from .semdedup import semdedup, semdedup_sweep
from .ssp import class_prototypes, prune_ssp, ssp, ssp_scores

__all__ = [
    "Selection",
    "TeacherLogitCache",
    "class_prototypes",
    "cluster_complexity",
    "dbp",
    "dbp_quotas",
    "fill_teacher_cache",
    "kd_alpha",
    "kd_loss",
    "prune_dbp",  # deprecated alias of dbp
    "prune_ssp",  # deprecated alias of ssp
    "random_subset",
    "semdedup",
    "semdedup_sweep",
    "ssp",
    "ssp_scores",
]
