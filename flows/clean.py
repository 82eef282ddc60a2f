"""``seal clean``: prune persisted results and SEAL artifacts that no run references.

Prefect never deletes persisted task results, and every inner loop leaves an adapter folder
under ``$SEAL_HOME/adapters`` (the continual flow deletes its merged checkpoints under
``$SEAL_HOME/continual`` itself, but a killed run or ``keep_final`` leaves some). What is kept:

- a result file, if a task run or flow run in Prefect's database has it as its result (a
  Completed or a Cached state; deleting a flow run in the UI deletes its task runs and so frees
  their results);
- an adapter, policy or merged-checkpoint folder, if a kept result mentions its path (so a cached
  rerun finds it).
  Registered policies and logged adapters do not need theirs: MLflow keeps its own copies.

Everything else is a candidate: result files of deleted runs, folders no kept result mentions,
and the temporary folders a killed process left behind mid-write (``.name-XXXX``). The default is
a dry run that lists them with their sizes; ``--yes`` deletes them.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ARTIFACT_FOLDERS = ("adapters", "policies", "continual")


@dataclass
class CleanPlan:
    """What ``seal clean`` would delete, and what it keeps."""

    results: list[Path] = field(default_factory=list)
    folders: list[Path] = field(default_factory=list)
    kept_results: int = 0
    kept_folders: int = 0

    @property
    def paths(self) -> list[Path]:
        return self.results + self.folders

    def size_bytes(self) -> int:
        return sum(_size(path) for path in self.paths)


def referenced_storage_keys() -> set[str]:
    """Storage keys of every task run and flow run result Prefect's database knows of."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort, TaskRunSort

    keys: set[str] = set()
    with get_client(sync_client=True) as client:
        for read, order in ((client.read_task_runs, TaskRunSort.ID_DESC), (client.read_flow_runs, FlowRunSort.ID_DESC)):
            offset = 0
            # Pages need a total order, or offsets skip some runs and repeat others.
            while runs := read(sort=order, offset=offset, limit=200):
                offset += len(runs)
                keys.update(key for run in runs if (key := _storage_key(run.state)))
    return keys


def _storage_key(state: Any) -> str | None:
    data = getattr(state, "data", None) if state is not None else None
    metadata = getattr(data, "metadata", data)  # a ResultRecord or its metadata
    return getattr(metadata, "storage_key", None)


def plan_clean(storage: Path, home: Path, referenced: set[str]) -> CleanPlan:
    """Decide what to delete under ``storage`` (Prefect results) and ``home`` (SEAL artifacts).

    Args:
        storage: Prefect's local result storage folder.
        home: ``$SEAL_HOME``.
        referenced: storage keys of results some task run holds (:func:`referenced_storage_keys`).
    """
    plan = CleanPlan()
    kept_paths: set[Path] = set()
    if storage.is_dir():
        for path in sorted(p for p in storage.iterdir() if p.is_file()):
            if str(path) in referenced or str(path.resolve()) in referenced:
                plan.kept_results += 1
                kept_paths.update(_paths_in_result(path, home))
            else:
                plan.results.append(path)
    for name in ARTIFACT_FOLDERS:
        root = home / name
        for folder in _artifact_folders(root):
            if folder.name.startswith(".") or folder.resolve() not in kept_paths:
                plan.folders.append(folder)
            else:
                plan.kept_folders += 1
    return plan


def _artifact_folders(root: Path) -> Iterator[Path]:
    """The leaf artifact folders under ``root``: those holding files (an adapter or a model)."""
    if not root.is_dir():
        return
    for path in sorted(root.iterdir()):
        if not path.is_dir():
            continue
        if path.name.startswith(".") or any(p.is_file() for p in path.iterdir()):
            yield path
        else:
            yield from _artifact_folders(path)


def _paths_in_result(path: Path, home: Path) -> set[Path]:
    """Artifact folders under ``home`` that the persisted result in ``path`` mentions."""
    try:
        value = _load_result(path)
    except Exception:  # unreadable or torn: it cannot be a cache hit either
        return set()
    home = home.resolve()
    found = set()
    for text in _strings(value):
        candidate = Path(text)
        if candidate.is_absolute() and candidate.resolve().is_relative_to(home):
            found.add(candidate.resolve())
    return found


def _load_result(path: Path) -> Any:
    from prefect.results import ResultRecord

    return ResultRecord.deserialize(path.read_bytes()).result


def _strings(value: Any, depth: int = 0) -> Iterator[str]:
    if depth > 8:
        return
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item, depth + 1)
    elif isinstance(value, (list, tuple, set)):
        for item in value:
            yield from _strings(item, depth + 1)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for item in dataclasses.fields(value):
            yield from _strings(getattr(value, item.name), depth + 1)
    elif hasattr(value, "model_dump"):
        yield from _strings(value.model_dump(), depth + 1)


def delete(plan: CleanPlan) -> None:
    for path in plan.paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    # Drop the folders that emptied (adapters/<policy>/<context>/).
    for name in ARTIFACT_FOLDERS:
        for folder in sorted({p.parent for p in plan.folders}, key=lambda p: -len(p.parts)):
            while folder.name != name and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
                folder = folder.parent


def format_plan(plan: CleanPlan, home: Path, storage: Path, dry_run: bool) -> str:
    verb = "would delete" if dry_run else "deleted"
    lines = []
    for path in plan.paths:
        lines.append(f"  {_human(_size(path)):>9}  {_relative(path, home, storage)}")
    lines.append(
        f"{verb} {len(plan.results)} result file(s) and {len(plan.folders)} folder(s), "
        f"{_human(plan.size_bytes())}; kept {plan.kept_results} result(s) and {plan.kept_folders} folder(s)"
    )
    if dry_run and plan.paths:
        lines.append("run `seal clean --yes` to delete them")
    return "\n".join(lines)


def _relative(path: Path, *roots: Path) -> str:
    for root in roots:
        if path.is_relative_to(root):
            return str(root.name / path.relative_to(root))
    return str(path)


def _size(path: Path) -> int:
    """Bytes under ``path``; files that vanish while it is counted (a run still writing, a
    temporary folder renamed into place) count as nothing."""
    if path.is_file():
        return _file_size(path)
    total = 0
    for folder, _, files in os.walk(path):  # os.walk skips a folder it can no longer list
        total += sum(_file_size(Path(folder) / name) for name in files)
    return total


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"
