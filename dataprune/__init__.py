"""Dataset pruning: SSP, SemDeDup, DBP, KD-aided random subsets.

Methods are pure: embeddings (n, d) in, a :class:`Selection` out.
"""

from .dbp import cluster_complexity, dbp_quotas, prune_dbp
from .kd import TeacherLogitCache, fill_teacher_cache, kd_alpha, kd_loss
from .random_subset import random_subset
from .selection import Selection
from .semdedup import semdedup
from .ssp import class_prototypes, prune_ssp, ssp_scores

__all__ = [
    "Selection",
    "TeacherLogitCache",
    "class_prototypes",
    "cluster_complexity",
    "dbp_quotas",
    "fill_teacher_cache",
    "kd_alpha",
    "kd_loss",
    "prune_dbp",
    "prune_ssp",
    "random_subset",
    "semdedup",
    "ssp_scores",
]
