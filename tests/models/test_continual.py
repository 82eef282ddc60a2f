"""models/continual.py: the matrix measures, replay, merging a self-edit, probe KL."""

import math

import numpy as np
import pytest
import torch

from models import continual
from models.config import InnerLoopConfig, LoraConfig, load_config
from models.errors import ConfigError
from models.self_edit import SelfEdit

NAN = math.nan
# Three passages; row r: after r merges. Passage 0 learns (0.2 -> 0.8), then decays to 0.4.
MATRIX = np.array(
    [
        [0.2, 0.0, 0.4],
        [0.8, NAN, NAN],
        [0.6, 1.0, NAN],
        [0.4, 0.5, 0.9],
    ]
)

MEASURES = [
    # (measure, matrix, expected)
    (continual.newest_accuracy, MATRIX, (0.8 + 1.0 + 0.9) / 3),
    (continual.forgetting, MATRIX, ((0.8 - 0.4) + (1.0 - 0.5)) / 2),
    (continual.forgetting_max, MATRIX, ((0.8 - 0.4) + (1.0 - 0.5)) / 2),
    (continual.backward_transfer, MATRIX, -((0.8 - 0.4) + (1.0 - 0.5)) / 2),
    (continual.gain_over_base, MATRIX, ((0.4 - 0.2) + (0.5 - 0.0) + (0.9 - 0.4)) / 3),
    # Passage 0 peaks after merge 2, not its own: forgetting_max counts from the peak.
    (continual.forgetting, np.array([[0.0, 0.0], [0.5, NAN], [0.9, 0.7]]), 0.5 - 0.9),
    (continual.forgetting_max, np.array([[0.0, 0.0], [0.5, NAN], [0.9, 0.7]]), 0.0),
    # One passage: nothing comes after it.
    (continual.forgetting, np.array([[0.1], [0.6]]), 0.0),
    (continual.backward_transfer, np.array([[0.1], [0.6]]), 0.0),
    (continual.newest_accuracy, np.array([[0.1], [0.6]]), 0.6),
]


@pytest.mark.parametrize(
    "measure, matrix, expected", MEASURES, ids=[f"{m.__name__}-{i}" for i, (m, _, _) in enumerate(MEASURES)]
)
def test_measures(measure, matrix, expected):
    assert measure(matrix) == pytest.approx(expected)


def test_accuracy_matrix_places_rows_and_checks_their_lengths():
    matrix = continual.accuracy_matrix([0.2, 0.0, 0.4], [[0.8], [0.6, 1.0], [0.4, 0.5, 0.9]])
    np.testing.assert_array_equal(matrix, MATRIX)
    partial = continual.accuracy_matrix([0.2, 0.0], [[0.8]])  # a sequence still running
    assert partial.shape == (3, 2) and np.isnan(partial[2]).all()
    with pytest.raises(ValueError, match="step 1 holds 1 accuracies; expected 2"):
        continual.accuracy_matrix([0.2, 0.0], [[0.8], [0.6]])
    with pytest.raises(ValueError, match="3 steps for 2 passages"):
        continual.accuracy_matrix([0.2, 0.0], [[0.8], [0.6, 1.0], [0.1, 0.1, 0.1]])


def test_lag_curve_and_step_drops():
    # d = 0: the diagonal; d = 1: (M[2,0] + M[3,1]) / 2; d = 2: M[3,0].
    assert continual.lag_curve([MATRIX]) == pytest.approx([(0.8 + 1.0 + 0.9) / 3, (0.6 + 0.5) / 2, 0.4])
    # Merge 2 costs passage 0 0.2; merge 3 leaves passages 0 and 1 0.4 and 0.5 below their own.
    assert continual.step_drops(MATRIX) == pytest.approx([0.2, (0.4 + 0.5) / 2])


@pytest.mark.parametrize(
    "xs, ys, expected",
    [
        ([1, 2, 3], [2, 4, 6], 1.0),
        ([1, 2, 3], [3, 2, 1], -1.0),
        ([1, 2, 3], [5, 5, 5], None),  # constant: undefined, not NaN
        ([1, 2], [1, 2], None),  # too few points
    ],
)
def test_pearson(xs, ys, expected):
    result = continual.pearson(xs, ys)
    assert result == (None if expected is None else pytest.approx(expected))


def test_summarize_means_over_sequences_and_correlates_drift_with_drops():
    other = MATRIX.copy()
    other[3, :2] = [0.8, 1.0]  # a sequence that forgets nothing
    summary = continual.summarize([MATRIX, other], [[0.1, 0.3, 0.6], [0.1, 0.0, 0.0]])
    assert summary.mean.shape == (4, 3) and np.isnan(summary.mean[1, 1])
    assert summary.mean[3, 0] == pytest.approx(0.6) and summary.std[3, 0] == pytest.approx(np.std([0.4, 0.8], ddof=1))
    assert summary.std[0, 0] == 0
    assert summary.metrics["forgetting"] == pytest.approx((0.45 + 0.0) / 2)
    assert summary.metrics["forgetting_std"] == pytest.approx(np.std([0.45, 0.0], ddof=1))
    assert summary.metrics["kl_final"] == pytest.approx(0.3)
    # More drift went with larger drops: KL (0.3, 0.6, 0.0, 0.0) against drops (0.2, 0.45, 0.2, 0.0).
    assert summary.kl_forgetting_correlation > 0.5
    single = continual.summarize([MATRIX], [[0.1, 0.2, 0.3]])
    assert single.metrics["forgetting_std"] == 0 and np.nanmax(single.std) == 0
    json = single.as_json()
    assert json["mean"][1][1] is None and json["mean"][3] == pytest.approx([0.4, 0.5, 0.9])
    assert "p2" in continual.format_matrix(single.mean, single.std)


@pytest.mark.parametrize(
    "history, count, expected",
    [
        ([], 3, 0),
        ([["a", "b"], ["c"]], 0, 0),
        ([["a", "b"], ["c"]], 2, 2),
        ([["a", "b"], ["c"]], 10, 3),  # bounded by what there is
    ],
)
def test_replay_sample_is_bounded_and_seeded(history, count, expected):
    drawn = continual.replay_sample(history, count, seed=1)
    assert len(drawn) == expected and len(set(drawn)) == expected
    assert drawn == continual.replay_sample(history, count, seed=1)
    assert set(drawn) <= {doc for step in history for doc in step}


@pytest.mark.parametrize("self_edit_epochs, expected_replays", [(None, 1), (2, 2)])
def test_continual_documents_weigh_replay_as_self_edit_lines(self_edit_epochs, expected_replays):
    config = InnerLoopConfig(epochs=3, self_edit_epochs=self_edit_epochs)
    edit = SelfEdit("one line here\nanother line", ("one line here", "another line"))
    documents, own, plan = continual.continual_documents(edit, "T", "the passage", ["old doc"], config)
    assert own == ["T\none line here", "T\nanother line", "T\nthe passage"]
    assert documents.count("old doc") == expected_replays
    assert documents.count("T\none line here") == (self_edit_epochs or 1)
    assert plan.epochs == (3 if self_edit_epochs is None else 1)
    alone, own_alone, _ = continual.continual_documents(None, "T", "the passage", [], config)
    assert own_alone == ["T\nthe passage"] and set(alone) == {"T\nthe passage"}


@pytest.fixture
def private_tiny(tmp_path):
    """A private copy of the tiny model: merging changes its weights."""
    from models.base_model import load_model

    return load_model("tiny-random", home=tmp_path / "home", device="cpu", dtype="float32")


def test_merge_self_edit_changes_the_weights_and_saves_them_with_their_digest(private_tiny, tmp_path):
    from models.base_model import load_model, weights_digest

    model, tokenizer = private_tiny.model, private_tiny.tokenizer
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    lora = LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
    config = InnerLoopConfig(epochs=2, learning_rate=1e-2, max_grad_norm=None, max_length=64)
    result = continual.merge_self_edit(
        model, tokenizer, ["T\nzq zq zq", "T\nthe passage"], lora, config, tmp_path / "merged", source="test"
    )
    assert result.digest == weights_digest(tmp_path / "merged") and result.train.steps == 4
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert moved and all(("q_proj" in n or "v_proj" in n) for n in moved)  # merged into those layers only
    assert not any("lora" in n for n, _ in model.named_parameters())  # no LoRA layers left behind
    reloaded = load_model(str(tmp_path / "merged"), device="cpu", dtype="float32")
    for name, p in reloaded.model.named_parameters():
        torch.testing.assert_close(p, dict(model.named_parameters())[name])

    # Drift: none from itself, some from the unedited model.
    original = load_model("tiny-random", home=tmp_path / "home", device="cpu", dtype="float32")
    texts = continual.PROBE_TEXTS[:3]
    assert continual.probe_kl(model, model, tokenizer, texts) == pytest.approx(0.0, abs=1e-6)
    assert continual.probe_kl(original.model, model, tokenizer, texts) > 1e-4
    with pytest.raises(ValueError, match="at least one probe text"):
        continual.probe_kl(model, model, tokenizer, [])


def test_remove_checkpoint_only_deletes_under_its_root(tmp_path):
    root = tmp_path / "continual"
    inside, outside = root / "abc" / "seq0-step0" / "key", tmp_path / "policy"
    for folder in (inside, outside):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"x")
    assert not continual.remove_checkpoint(outside, root) and outside.is_dir()
    assert continual.remove_checkpoint(inside, root) and not (root / "abc").exists()
    assert not continual.remove_checkpoint(inside, root)  # already gone


@pytest.mark.parametrize(
    "policy, fragment",
    [
        ("models:/seal-policy", "not a registry URI"),
        ("/no/such/folder", "neither 'base'"),
    ],
)
def test_continual_policy_is_checked_when_the_config_loads(policy, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [f"continual.policy={policy}", "continual.replay=-1"])
    for good in ("base", "models:/seal-policy@best", "models:/seal-policy/3"):
        assert load_config(None, [f"continual.policy={good}"]).continual.policy == good


def test_run_step_merges_scores_every_passage_and_names_the_checkpoint_by_content(private_tiny, tmp_path):
    from models.base_model import load_model
    from models.config import EvalConfig

    reference = load_model("tiny-random", home=tmp_path / "home", device="cpu", dtype="float32")
    contexts = [("A", "zq zq zq", ["What is a?"], [["zq"]]), ("B", "zq zq", ["What is b?", "And c?"], [["zq"], ["zq"]])]
    edit = SelfEdit("zq is b\nb is zq", ("zq is b", "b is zq"))
    lora = LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
    config = InnerLoopConfig(epochs=2, learning_rate=1e-2, max_grad_norm=None, max_length=64)
    step = dict(
        history=[["A\nzq zq zq"]],
        replay=1,
        replay_seed=0,
        lora=lora,
        config=config,
        eval_config=EvalConfig(max_new_tokens=4),
        probe_texts=continual.PROBE_TEXTS[:2],
        source="t",
    )
    result = continual.run_step(
        private_tiny.model, private_tiny.tokenizer, reference.model, edit, contexts, root=tmp_path / "a", **step
    )
    assert result.own_documents == ["B\nzq is b", "B\nb is zq", "B\nzq zq"] and result.replayed == ["A\nzq zq zq"]
    assert [s.total for s in result.scores] == [1, 2] and result.kl > 0
    assert result.merge.path.parent == tmp_path / "a" and result.merge.train.steps == 2 * 4
    # The same documents and settings name the same folder; another self-edit, another one.
    fresh = load_model("tiny-random", home=tmp_path / "home", device="cpu", dtype="float32")
    again = continual.run_step(
        fresh.model, fresh.tokenizer, reference.model, edit, contexts, root=tmp_path / "b", **step
    )
    assert again.merge.path.name == result.merge.path.name and again.merge.digest == result.merge.digest
    other = load_model("tiny-random", home=tmp_path / "home", device="cpu", dtype="float32")
    alone = continual.run_step(
        other.model, other.tokenizer, reference.model, None, contexts, root=tmp_path / "a", **step
    )
    assert alone.merge.path.name != result.merge.path.name and alone.own_documents == ["B\nzq zq"]


ROUTED_CONTEXTS = [
    ("A", "zq zq zq zq zq zq", ["zq zq zq?"], [["zq"]]),
    ("B", "wv wv wv wv wv wv", ["wv wv wv?", "wv wv?"], [["wv"], ["wv"]]),
]


def _routed_steps(model, tokenizer, root):
    """Two routed steps on ``model``: adapter 0 learns passage A, adapter 1 passage B."""
    from models.config import EvalConfig

    step = dict(
        history=[],
        replay=0,
        replay_seed=0,
        lora=LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj"]),
        config=InnerLoopConfig(epochs=6, learning_rate=2e-2, max_grad_norm=None, max_length=64),
        eval_config=EvalConfig(max_new_tokens=4),
        probe_texts=continual.PROBE_TEXTS[:2],
        root=root,
    )
    first = continual.run_routed_step(model, tokenizer, None, ROUTED_CONTEXTS[:1], adapters=[], **step)
    second = continual.run_routed_step(model, tokenizer, None, ROUTED_CONTEXTS, adapters=[first.merge.path], **step)
    return first, second, step


def test_routed_steps_keep_the_model_and_route_each_question_to_its_passages_adapter(private_tiny, tmp_path):
    from models.base_model import weights_digest

    model, tokenizer = private_tiny.model, private_tiny.tokenizer
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    first, second, _ = _routed_steps(model, tokenizer, tmp_path / "adapters")
    # Nothing merged, nothing left attached: every step trains on the starting model.
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert set(dict(model.named_modules())) == set(dict(private_tiny.model.named_modules()))
    assert not any("lora" in n for n, _ in model.named_parameters())
    for result in (first, second):
        assert (result.merge.path / "adapter_model.safetensors").is_file()
        assert result.merge.digest == weights_digest(result.merge.path)
    assert [s.total for s in second.scores] == [1, 2] and first.routed == 1.0
    # Each adapter explains its own passage's words best: A's question to adapter 0, B's to 1.
    assert second.routed == 1.0 and second.kl > 0


def test_routed_answers_and_drift_are_those_of_the_chosen_adapter_alone(private_tiny, tmp_path):
    from models.config import EvalConfig
    from models.inner_loop import evaluate_adapter, loaded_adapter
    from models.stacked_lora import AdapterStack

    model, tokenizer = private_tiny.model, private_tiny.tokenizer
    first, second, step = _routed_steps(model, tokenizer, tmp_path / "adapters")
    folders = [first.merge.path, second.merge.path]
    questions = [c[2] for c in ROUTED_CONTEXTS] + [["zq wv?", "something else entirely"]]
    answers = [c[3] for c in ROUTED_CONTEXTS] + [[["zq"], ["wv"]]]
    config = EvalConfig(max_new_tokens=4)
    stack = AdapterStack.attach(model, step["lora"], 2)
    try:
        stack.load(folders)
        routed, choices = continual.evaluate_routed(stack, tokenizer, questions, answers, config)
        texts = list(continual.PROBE_TEXTS[:3])
        probe_choices = continual.route_by_likelihood(stack, tokenizer, texts)
        kl = continual.routed_probe_kl(stack, tokenizer, texts)
    finally:
        stack.close()
    flat = [(q, a) for qs, golds in zip(questions, answers) for q, a in zip(qs, golds)]
    for (question, gold), adapter, prediction in zip(
        flat, choices, [p for r in routed for p in r.predictions], strict=True
    ):
        with loaded_adapter(model, folders[adapter]) as alone:
            assert evaluate_adapter(alone, tokenizer, [question], [gold], config).predictions == (prediction,)
    # The drift is probe_kl of each probe's adapter from the bare model.
    total, tokens = 0.0, 0
    for text, adapter in zip(texts, probe_choices):
        ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=64).input_ids
        with torch.no_grad():
            bare = model(input_ids=ids).logits
            with loaded_adapter(model, folders[adapter]) as alone:
                total += continual._kl_sum(bare, alone(input_ids=ids).logits)
        tokens += ids.shape[1]
    assert kl == pytest.approx(total / tokens, rel=1e-4) and kl > 0
    with pytest.raises(ValueError, match="at least one probe text"):
        continual.routed_probe_kl(stack, tokenizer, [])
