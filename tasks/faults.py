"""Fault injection for resume tests: make a chosen task fail on its first attempt only.

    SEAL_FAIL_ONCE="train_adapter:edit1"      # the first train-adapter task whose label is edit1
    SEAL_FAIL_ONCE="update_policy"            # the first policy update
    SEAL_FAIL_ONCE="train_adapter:edit1=oom"  # ... failing as if it ran out of memory

A fault fires once per SEAL_HOME (a marker file records it), so the retry or the rerun that
follows goes through: exactly what a transient crash looks like to the flow.
"""

from __future__ import annotations

import os

from models.paths import seal_home
from tasks.records import InnerLoopOutOfMemory


class InjectedFault(RuntimeError):
    """A failure asked for by SEAL_FAIL_ONCE."""


def maybe_fail(task: str, label: str = "") -> None:
    """Raise :class:`InjectedFault` if SEAL_FAIL_ONCE names this task (and label) and has not fired."""
    for spec in filter(None, os.environ.get("SEAL_FAIL_ONCE", "").split(",")):
        target, _, kind = spec.strip().partition("=")
        name, _, wanted = target.partition(":")
        if name != task or (wanted and wanted != label):
            continue
        marker = seal_home() / "faults" / spec.strip().replace(":", "-").replace("/", "_").replace("=", "-")
        marker.parent.mkdir(parents=True, exist_ok=True)
        try:
            marker.touch(exist_ok=False)  # atomic: one attempt wins, every later one passes
        except FileExistsError:
            return
        message = f"SEAL_FAIL_ONCE={spec}: injected failure of {task} {label}".strip()
        if kind == "oom":
            raise InnerLoopOutOfMemory(message)
        raise InjectedFault(message)
