"""The domain seam: the config's ``domain`` picks the implementation the flows call."""

import pytest

from flows.domains import Domain, domain_for
from flows.fewshot import FEWSHOT
from flows.knowledge import KNOWLEDGE
from models.config import load_config
from tasks.records import ConfigSelfEditRecord, SelfEditRecord, SelectionRecord, SolvedSelectionRecord


@pytest.mark.parametrize("name, domain", [("knowledge", KNOWLEDGE), ("fewshot", FEWSHOT)])
def test_the_config_picks_the_domain(name, domain):
    assert domain_for(load_config(None, [f"domain={name}"])) is domain
    assert domain.name == name
    members = [m for m in vars(Domain) if not m.startswith("_")] + list(Domain.__annotations__)
    assert all(hasattr(domain, member) for member in members)


def test_each_domain_describes_its_own_self_edits():
    from tasks.records import ArcTask, Context

    context = Context(
        id="c",
        title="T",
        context="Orvanne Kelthrop founded the guild in 1873.",
        questions=["Who founded it?", "When?"],
        answers=[["Orvanne Kelthrop"], ["1873"]],
    )
    knowledge_edit = SelfEditRecord(
        index=0,
        text="Kelthrop founded\nthe guild in 1873 long ago",
        prompt="p",
        documents=["Kelthrop founded", "the guild in 1873 long ago"],
        tokens=9,
    )
    described = KNOWLEDGE.describe(context, knowledge_edit)
    assert {k: described[k] for k in ("documents", "tokens", "answer_coverage")} == {
        "documents": 2,
        "tokens": 9,
        "answer_coverage": 0.5,
    }
    assert described["fact_recall"] == pytest.approx(2 / 3)  # Kelthrop, 1873; not Orvanne
    assert set(described) == {"documents", "tokens", *KNOWLEDGE.edit_measures}
    arc = ArcTask(id="t", train_inputs=[[[1]]], train_outputs=[[[2]]], test_inputs=[[[1]]], test_outputs=[[[2]]])
    invalid = ConfigSelfEditRecord(index=0, text="{", prompt="p", config=None, failure="invalid JSON", attempts=3)
    assert FEWSHOT.describe(arc, invalid) == {"config": None, "attempts": 3}


def test_kept_indices_read_the_same_in_both_domains():
    common = dict(
        context_id="c",
        baseline_accuracy=0.0,
        accuracies=[1.0, 0.0, 1.0],
        rewards=[1, 0, 1],
        failures=[None] * 3,
        outcome="kept",
    )
    assert SelectionRecord(**common, kept=2, tie=True).kept_indices == [2]
    assert SelectionRecord(**common, kept=None, tie=False).kept_indices == []
    assert SolvedSelectionRecord(**common, kept=[0, 2]).kept_indices == [0, 2]


def test_oracle_configs_over_the_step_cap_are_rejected_for_that_task():
    from tasks.records import ArcTask

    config = load_config(None, ["domain=fewshot", "fewshot.max_steps=10"])
    arc = ArcTask(
        id="t", train_inputs=[[[1]]] * 3, train_outputs=[[[2]]] * 3, test_inputs=[[[1]]], test_outputs=[[[2]]]
    )
    records = FEWSHOT.oracle_self_edits(config, arc)
    assert len(records) == len(config.fewshot.oracle_configs)
    assert records[0].config is not None and records[0].failure is None  # 3 examples x 3 epochs = 9 steps
    assert records[1].config is None and "more than fewshot.max_steps=10" in records[1].failure


def test_inner_loops_are_grouped_by_length():
    from models.stacked_lora import length_groups

    # passage-only items (1 document) and self-edits (9) alternate, as in the held-out flow
    lengths = [1, 9, 1, 9, 1, 7, 1, 9]
    groups = length_groups(lengths, 3)
    assert groups == [[0, 2, 4], [6, 5, 1], [3, 7]]
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert length_groups(lengths, 1) == [[i] for i in sorted(range(8), key=lambda i: (lengths[i], i))]


def test_evaluations_are_keyed_without_eval_seeds_and_as_before_when_it_is_unset():
    from prefect.utilities.hashing import hash_objects

    from flows.knowledge import answering

    unset = load_config(None, [])
    keys = {hash_objects(answering(load_config(None, [f"eval.seeds={n}"]))) for n in (1, 3)}
    assert keys == {hash_objects(answering(unset))} == {hash_objects(unset.eval)}  # caches made before hold
