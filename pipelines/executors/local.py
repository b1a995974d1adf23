"""The local executor: every unit of work in this process, one after the other."""

from __future__ import annotations

from pipelines.shards.select import select_chain
from pipelines.shards.write import write_outputs


class LocalExecutor:
    """Runs the stages' pending units in this process (the default ``--backend local``)."""

    def embed(self, stage, todo: list[int]) -> None:
        """Embed input shards ``todo`` of an EmbedStage."""
        stage.embed_local(todo)

    def select(self, embed, clustering, steps, *, device="auto", progress=False):
        """The step chain over every embedding row: (Selection, stats)."""
        return select_chain(embed, clustering, steps, device=device, progress=progress)

    def write(self, stage, plan, todo: list[int]) -> None:
        """Write output tar shards ``todo`` of a WriteStage in one pass over the inputs."""
        write_outputs(stage.output.units(stage.dir), plan, todo, progress=stage.progress)
