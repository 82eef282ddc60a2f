"""``seal clean``: results and adapters of deleted runs go, everything a run references stays."""

from datetime import datetime, timezone
from pathlib import Path

import pytest
from conftest import TINY, squad_file


def _flow_config(root: Path):
    from models.config import load_config

    return load_config(
        TINY,
        [
            "data.source=squad",
            f"data.path={squad_file(root / 'squad-clean.json')}",
            "data.num_train_contexts=1",
            "data.num_eval_contexts=1",
            "self_edit.num_samples=1",
            "rl.iterations=1",
            "seed=7",
            "tracking.experiment=clean",
            "tracking.log_adapters=false",
        ],
    )


@pytest.fixture
def own_storage(prefect_env, tmp_path, monkeypatch):
    """SEAL_HOME and result storage of this test alone: the session's hold other tests' files,
    which ``seal clean`` would rightly list, whichever tests ran before in this process."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    home, storage = tmp_path / "seal", tmp_path / "seal" / "prefect" / "storage"
    monkeypatch.setenv("SEAL_HOME", str(home))
    monkeypatch.setenv("PREFECT_LOCAL_STORAGE_PATH", str(storage))
    with temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: storage}):
        yield home, storage


def test_clean_lists_then_deletes_only_what_no_run_references(prefect_env, own_storage, capsys):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterStartTime

    from flows.cli import main
    from flows.training import seal_training

    home, storage = own_storage
    config = _flow_config(prefect_env)
    # Leftovers of a killed write and of a run Prefect no longer knows.
    torn = home / "adapters" / ".edit0-x1y2"
    torn.mkdir(parents=True)
    (torn / "adapter_model.safetensors").write_bytes(b"half")
    stray = home / "adapters" / "0123456789abcdef" / "ctx" / "edit0"
    stray.mkdir(parents=True)
    (stray / "adapter_config.json").write_text("{}")

    since = datetime.now(timezone.utc)
    result = seal_training(config)
    adapters = [Path(row["adapter"]) for row in result.iterations[0].rows if row["adapter"]]
    assert adapters and all(a.is_dir() for a in adapters)
    files_before = set(storage.iterdir())

    # Dry run: only the leftovers are listed; nothing is deleted.
    assert main(["clean"]) == 0
    out = capsys.readouterr().out
    assert ".edit0-x1y2" in out and "0123456789abcdef" in out
    assert "would delete 0 result file(s) and 2 folder(s)" in out
    assert torn.exists() and stray.exists() and set(storage.iterdir()) == files_before

    # Delete the run (and its subflows) as a user would in the UI: its results become unreferenced.
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=since)))
        assert len(runs) >= 3  # the training flow, an iteration, the held-out evaluations
        for run in runs:
            client.delete_flow_run(run.id)
    assert main(["clean"]) == 0
    out = capsys.readouterr().out
    assert all(str(a.relative_to(home.parent)) in out or a.name in out for a in adapters)
    assert all(a.is_dir() for a in adapters)

    assert main(["clean", "--yes"]) == 0
    out = capsys.readouterr().out
    assert "deleted" in out
    assert not torn.exists() and not stray.exists()
    assert not any(a.exists() for a in adapters)
    removed = files_before - set(storage.iterdir())
    assert removed, "the deleted run's results were not pruned"
    # Results other runs still reference are kept: a second clean finds nothing more.
    assert main(["clean"]) == 0
    assert "would delete 0 result file(s) and 0 folder(s)" in capsys.readouterr().out

    # The same config runs again (recomputing what was pruned) and gives the same rewards.
    again = seal_training(config)
    assert again.iterations[0].metrics["reward_mean"] == result.iterations[0].metrics["reward_mean"]


def test_sizes_count_what_is_there_and_skip_what_vanished(tmp_path):
    from flows.clean import _size

    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "weights.bin").write_bytes(b"x" * 300)
    (tmp_path / "top.txt").write_bytes(b"y" * 20)
    # A name listed but gone by the time it is measured, as a run's renamed temporary files are.
    (tmp_path / "adapter" / "gone.bin").symlink_to(tmp_path / "removed")
    assert _size(tmp_path) == 320
    assert _size(tmp_path / "top.txt") == 20
