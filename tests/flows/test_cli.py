from pathlib import Path

from flows.cli import main

TINY = str(Path(__file__).parents[2] / "deployments" / "configs" / "knowledge-tiny.yaml")


def test_inner_loop_demo_prints_the_three_columns_with_counts(seal_home, capsys):
    assert main(["inner-loop", TINY, "--contexts", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("passage + self-edit") >= 3  # two context lines and the table
    table = out[out.index("condition") :]
    for label in ("no adaptation", "passage only", "passage + self-edit"):
        line = next(line for line in table.splitlines() if line.startswith(label))
        correct, total = line.split()[-2].split("/")
        assert 0 <= int(correct) <= int(total) and int(total) >= 8
    assert "(2 contexts" in table and "peak memory" in out
    assert (seal_home / "models" / "tiny-random" / "model.safetensors").exists()


def test_invalid_config_stops_before_any_work(seal_home, capsys):
    assert main(["inner-loop", TINY, "lora.rank=0", "eval.bogus=1"]) == 2
    err = capsys.readouterr().err
    assert "2 problem(s)" in err and "lora.rank" in err and "eval.bogus" in err
    assert not seal_home.exists()


def test_missing_model_is_a_clear_error(seal_home, capsys):
    assert main(["inner-loop", TINY, "model.name=./nowhere"]) == 2
    assert "not a folder with a model" in capsys.readouterr().err


def test_continual_refuses_a_bad_config_before_any_work(seal_home, capsys):
    assert main(["continual", TINY, "continual.passages=0", "continual.policy=models:/seal-policy"]) == 2
    err = capsys.readouterr().err
    assert "continual.passages" in err and "continual.policy" in err
    assert main(["continual", TINY, "domain=fewshot"]) == 2
    assert "domain=knowledge" in capsys.readouterr().err
    assert not seal_home.exists()
