from pathlib import Path

import pytest

from models.config import DataConfig, SealConfig, load_config, parse_overrides
from models.errors import ConfigError

CONFIGS = sorted((Path(__file__).parents[2] / "deployments" / "configs").glob("*.yaml"))


def test_defaults_are_valid():
    config = load_config()
    assert config == SealConfig()
    assert config.lora.rank == 32 and config.inner_loop.learning_rate == 1e-3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert config.model.name


def test_shipped_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"knowledge-smollm2.yaml", "knowledge-tiny.yaml"} <= names


def test_overrides_are_typed_and_win_over_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  rank: 8\n")
    config = load_config(
        path,
        [
            "lora.rank=4",
            "inner_loop.learning_rate=3e-4",
            "lora.target_modules=[q_proj, v_proj]",
            "data.source=squad",
            "data.path=x.json",
        ],
    )
    assert config.lora.rank == 4
    assert config.inner_loop.learning_rate == pytest.approx(3e-4)
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.data.path == "x.json"


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["lora.rnak=4"], ["lora.rnak: unknown key"]),
        (["lora.rank=four"], ["lora.rank", "'four'"]),
        (["lora.rank=0"], ["lora.rank", "greater than or equal to 1"]),
        (["self_edit.prompt=poem"], ["self_edit.prompt", "'poem'"]),
        (["data.source=squad"], ["neither data.path nor data.hub_name"]),
        (["nonsense"], ["expected section.key=value"]),
        (["colours.sky=blue"], ["colours: unknown key"]),
    ],
)
def test_bad_config_names_the_problem(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    for fragment in expected:
        assert fragment in str(info.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["lora.rank=-1", "inner_loop.epochs=0", "eval.colour=red", "oops"])
    message = str(info.value)
    assert "4 problem(s)" in message
    for fragment in ["lora.rank", "inner_loop.epochs", "eval.colour", "oops"]:
        assert fragment in message


@pytest.mark.parametrize(
    "text, fragment",
    [("lora: [1, 2", "not valid YAML"), ("- a\n- b\n", "must hold a mapping")],
)
def test_unreadable_file(tmp_path, text, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=fragment):
        load_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_flat_params_and_digests():
    config = load_config(None, ["lora.rank=8"])
    flat = config.flat()
    assert flat["lora.rank"] == 8 and flat["model.name"] == "smollm2-135m-instruct"
    other = load_config(None, ["lora.rank=16"])
    assert config.section_digest("data") == other.section_digest("data")
    assert config.section_digest("lora") != other.section_digest("lora")
    assert config.digest() != other.digest()


def test_parse_overrides_nests():
    tree, problems = parse_overrides(["a.b.c=1", "a.d=x"])
    assert tree == {"a": {"b": {"c": 1}, "d": "x"}} and problems == []


def test_few_shot_refuses_what_only_the_knowledge_domain_does():
    with pytest.raises(ConfigError) as raised:
        load_config(
            None,
            [
                "domain=fewshot",
                "reward.baseline=passage_only",
                "inner_loop.seeds=3",
                "eval.seeds=2",
                "fewshot.eval_task_ids=[]",
            ],
        )
    message = str(raised.value)
    assert "reward.baseline" in message and "inner_loop.seeds" in message and "eval.seeds" in message
    assert load_config(None, ["reward.baseline=passage_only", "inner_loop.seeds=3"]).inner_loop.seeds == 3


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["data.source=text"], ["data.path is unset", "data.eval_source is unset", "set reward.source=generated"]),
        (["data.source=text", "data.path=t", "data.eval_source=synthetic"], ["set reward.source=generated"]),
        (
            ["data.source=text", "data.path=t", "data.eval_source=squad", "reward.source=generated"],
            ["neither data.eval_path nor data.hub_name"],
        ),
        (
            ["data.source=text", "data.path=t", "data.eval_source=synthetic", "data.eval_path=x.json"],
            ["data.eval_path is set but data.eval_source is 'synthetic'"],
        ),
        (["data.eval_source=synthetic"], ["only apply to data.source=text"]),
        (["domain=fewshot", "reward.source=generated", "fewshot.eval_task_ids=[]"], ["few-shot domain"]),
        (["reward.question_writer=teacher"], ["reward.question_writer", "'teacher'"]),
        (["reward.num_questions=0"], ["reward.num_questions"]),
    ],
)
def test_unlabelled_text_needs_generated_rewards_and_a_labelled_held_out_source(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    for fragment in expected:
        assert fragment in str(info.value)


def test_generated_rewards_on_text_or_labelled_contexts_load():
    config = load_config(
        None,
        [
            "data.source=text",
            "data.path=passages/",
            "data.eval_source=squad",
            "data.eval_path=dev-v1.1.json",
            "reward.source=generated",
            "reward.question_writer=base",
        ],
    )
    held_out = config.data.held_out()
    assert held_out == DataConfig(source="squad", path="dev-v1.1.json")
    assert held_out.problems() == []
    # A labelled source holds out its own contexts.
    assert load_config(None, ["reward.source=generated"]).data.held_out() == DataConfig()
