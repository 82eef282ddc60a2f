"""Progress of a flow phase: a Prefect progress artifact, and bars when attached to a terminal.

    progress = Progress("iteration-2", {"sampling": 8, "training": 24, "evaluation": 32})
    progress.advance("training")
    progress.close()

The artifact (one per phase, keyed ``progress-<name>``) moves in the Prefect UI as tasks finish;
on a terminal ``seal run`` also draws one bar per stage. Not on a terminal, nothing is drawn:
Prefect's log lines ("Task run ... Finished") are the plain record.
"""

from __future__ import annotations

import re
import sys

from prefect.artifacts import create_progress_artifact, update_progress_artifact


def artifact_key(name: str) -> str:
    """``name`` as a Prefect artifact key, which takes only lowercase letters, digits and dashes
    (``models:/seal-policy@best`` -> ``models-seal-policy-best``)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unnamed"


class Progress:
    def __init__(self, name: str, totals: dict[str, int], stream=None) -> None:
        self.totals = dict(totals)
        self.done = dict.fromkeys(totals, 0)
        self.artifact_id = create_progress_artifact(
            progress=0.0,
            key=artifact_key(f"progress-{name}"),
            description=f"{name}: " + ", ".join(f"{stage} 0/{total}" for stage, total in totals.items()),
        )
        stream = stream if stream is not None else sys.stderr
        self.bars = {}
        if stream.isatty():
            from tqdm import tqdm

            self.bars = {
                stage: tqdm(
                    total=total,
                    desc=f"{name} {stage}",
                    unit="task",
                    file=stream,
                    position=i,
                    leave=True,
                    dynamic_ncols=True,
                )
                for i, (stage, total) in enumerate(totals.items())
            }

    @property
    def fraction(self) -> float:
        total = sum(self.totals.values())
        return sum(self.done.values()) / total if total else 1.0

    def advance(self, stage: str, count: int = 1) -> None:
        step = min(count, self.totals[stage] - self.done[stage])
        if step <= 0:
            return
        self.done[stage] += step
        update_progress_artifact(self.artifact_id, progress=100 * self.fraction)
        if stage in self.bars:
            self.bars[stage].update(step)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
