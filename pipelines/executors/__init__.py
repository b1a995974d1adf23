"""Who runs the shard stages' units of work: this process (:mod:`.local`) or Ray Data (:mod:`.ray`).

An executor has ``embed(stage, todo)``, ``select(embed, clustering, steps)`` and
``write(stage, plan, todo)``; the stages call it and stay the same whichever runs them.
"""

from .local import LocalExecutor

__all__ = ["LocalExecutor"]
