"""benchmarks/inner_loop.py and benchmarks/baselines.py on the tiny model: the three methods do
the same work in their own ways, and the report is computed from what was measured."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[2]
sys.path.insert(0, str(ROOT))  # benchmarks/ is not an installed package

from benchmarks import baselines  # noqa: E402
from benchmarks import inner_loop as bench  # noqa: E402
from models.config import load_config  # noqa: E402
from models.inner_loop import tokenize_documents  # noqa: E402

TINY = ROOT / "deployments" / "configs" / "knowledge-tiny.yaml"
SMALL = ["inner_loop.epochs=2", "eval.max_new_tokens=4", "self_edit.max_new_tokens=16", "lora.rank=4", "lora.alpha=8"]
DOCUMENTS = [
    ["Kelthrop\nOrvanne Kelthrop founded the Thessory Guild in 1873.", "Kelthrop\nIt had 412 members."],
    [
        "Kelthrop\nThe guild met in Brindlecourt.",
        "Kelthrop\nIts founder was Orvanne Kelthrop.",
        "Kelthrop\nOrvanne Kelthrop founded the Thessory Guild in 1873. It had 412 members.",
    ],
]
QUESTIONS = ["Who founded the Thessory Guild?", "How many members did it have?"]
ANSWERS = [["Orvanne Kelthrop"], ["412"]]


@pytest.fixture(scope="module")
def config():
    return load_config(TINY, bench.COMPARISON + SMALL)


@pytest.fixture
def generate_calls(tiny, monkeypatch):
    """Counts ``generate`` calls on the tiny model's class (a PEFT wrapper ends up there too),
    with the number of rows of each."""
    calls = []
    original = type(tiny.model).generate

    def counting(self, *args, **kwargs):
        calls.append(len(kwargs["input_ids"]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(tiny.model), "generate", counting)
    return calls


@pytest.fixture
def answer_calls(monkeypatch):
    """Counts ``answer_lines`` calls (ours answers with it), with the number of rows of each."""
    import models.inner_loop
    import models.stacked_lora.evaluation
    from models.self_edit import answer_lines

    calls = []

    def counting(model, tokenizer, prompts, **kwargs):
        calls.append(len(prompts))
        return answer_lines(model, tokenizer, prompts, **kwargs)

    monkeypatch.setattr(models.inner_loop, "answer_lines", counting)
    monkeypatch.setattr(models.stacked_lora.evaluation, "answer_lines", counting)
    return calls


def _unchanged(tiny, before, requires_grad):
    after = tiny.model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in tiny.model.parameters()] == requires_grad


def test_three_methods_train_on_the_same_documents_and_tokens(tiny, config):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    requires_grad = [p.requires_grad for p in tiny.model.parameters()]
    ours = bench.run_ours(tiny, config, [("ctx", DOCUMENTS, QUESTIONS, ANSWERS)])[0]
    strong = baselines.run_strong(
        tiny.model, tiny.tokenizer, DOCUMENTS, QUESTIONS, ANSWERS, config.lora, config.inner_loop, config.eval
    )
    reference = [
        baselines.run_reference(
            tiny.model,
            tiny.tokenizer,
            docs,
            QUESTIONS,
            ANSWERS,
            config.lora,
            config.inner_loop,
            config.eval,
            timed_steps=1,
        )
        for docs in DOCUMENTS
    ]
    _unchanged(tiny, before, requires_grad)
    for k, docs in enumerate(DOCUMENTS):
        ids = tokenize_documents(tiny.tokenizer, docs, config.inner_loop.max_length)
        expected_tokens = sum(len(row) for row in ids) * config.inner_loop.epochs
        assert ours[k].tokens == strong[k].tokens == reference[k].tokens == expected_tokens
        assert ours[k].steps == strong[k].steps == reference[k].steps == len(docs) * config.inner_loop.epochs
        assert strong[k].steps_timed == strong[k].steps and reference[k].steps_timed == 1
        # batch size 1: the strong baseline runs over no padding, the reference over 2048 per row
        assert strong[k].padded_tokens == strong[k].tokens
        assert reference[k].padded_tokens == baselines.REFERENCE_MAX_LENGTH * len(docs) * config.inner_loop.epochs


def test_strong_masks_padding_in_labels_and_the_reference_keeps_it(tiny):
    short, long = "Kelthrop\nA short one.", "Kelthrop\nA much longer document about the Thessory Guild."
    ids = tokenize_documents(tiny.tokenizer, [short, long], 256)

    reference = baselines.reference_rows(tiny.tokenizer, [short, long], 256)
    for row, real in zip(reference, ids):
        assert len(row["input_ids"]) == len(row["labels"]) == baselines.REFERENCE_MAX_LENGTH
        assert row["input_ids"][: len(real)] == real
        assert row["labels"] == row["input_ids"]  # the padding is trained on
        assert set(row["labels"][len(real) :]) == {tiny.tokenizer.pad_token_id}
        assert sum(row["attention_mask"]) == len(real)

    batch = baselines.strong_collator(tiny.tokenizer)(baselines.strong_rows(tiny.tokenizer, [short, long], 256))
    assert batch["input_ids"].shape == (2, max(len(r) for r in ids))  # padded to the batch, not 2048
    padding = batch["attention_mask"] == 0
    assert padding[0].sum() == len(ids[1]) - len(ids[0]) > 0
    assert (batch["labels"][padding] == -100).all()
    assert torch.equal(batch["labels"][~padding], batch["input_ids"][~padding])


def test_baseline_answers_once_per_context_for_strong_and_per_self_edit_for_reference(tiny, config, generate_calls):
    baselines.run_strong(
        tiny.model, tiny.tokenizer, DOCUMENTS, QUESTIONS, ANSWERS, config.lora, config.inner_loop, config.eval
    )
    assert generate_calls == [len(QUESTIONS)] * (1 + len(DOCUMENTS))  # shared baseline, then one per self-edit
    generate_calls.clear()
    for docs in DOCUMENTS:
        baselines.run_reference(
            tiny.model,
            tiny.tokenizer,
            docs,
            QUESTIONS,
            ANSWERS,
            config.lora,
            config.inner_loop,
            config.eval,
            timed_steps=1,
        )
    assert generate_calls == [1] * (2 * len(QUESTIONS) * len(DOCUMENTS))  # one question at a time, twice


def test_ours_answers_every_contexts_baseline_in_one_call_and_lanes_change_no_result(tiny, answer_calls):
    inputs = [("first", DOCUMENTS, QUESTIONS, ANSWERS), ("second", DOCUMENTS[::-1], QUESTIONS[:1], ANSWERS[:1])]
    runs = {}
    for lanes in (1, 2):
        config = load_config(TINY, bench.COMPARISON + SMALL + [f"inner_loop.lanes={lanes}", "inner_loop.group_size=4"])
        answer_calls.clear()
        runs[lanes] = bench.run_ours(tiny, config, inputs)
        # the baseline: both contexts' questions in one call; then the group's adapters' questions,
        # every lane's in one call (AdapterLanes.evaluate_saved loads them into one stack)
        assert answer_calls == [len(QUESTIONS) + 1, 2 * len(QUESTIONS) + 2 * 1]
    for one, two in zip(runs[1], runs[2], strict=True):
        assert [t.tokens for t in one] == [t.tokens for t in two]
        assert [t.steps for t in one] == [t.steps for t in two]
        assert [t.predictions for t in one] == [t.predictions for t in two]
    assert [len(timings) for timings in runs[2]] == [len(DOCUMENTS), len(DOCUMENTS)]
    assert runs[2][1][0].tokens == runs[2][0][1].tokens  # the same documents, the same work


@pytest.mark.parametrize(
    "train_s, steps_seconds, steps, expected",
    [
        (10.0, [4.0, 2.0, 2.0], 10, 10.0 - (2.0 + 2.0) + 2.0 * 9),  # setup and first step once, later steps' mean
        (10.0, [4.0, 2.0, 2.0], 3, 10.0),  # all steps timed
        (5.0, [3.0], 4, 5.0 - 3.0 + 3.0 * 4),  # one step stands for every step
    ],
)
def test_extrapolate(train_s, steps_seconds, steps, expected):
    assert baselines.extrapolate(train_s, steps_seconds, steps) == pytest.approx(expected)


def test_script_reports_measured_numbers(seal_home, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert (
        bench.main(
            [
                "--config",
                str(TINY),
                "--contexts",
                "1",
                "--k",
                "2",
                "--reference-steps",
                "2",
                "--matmul-size",
                "128",
                "--json",
                str(out),
                *SMALL,
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())

    assert report["overrides"][: len(bench.COMPARISON)] == bench.COMPARISON
    assert report["matmul"]["peak_gflops"] > 0 and report["parameters"] > 0
    for batch in ("batch_1", "batch_k"):
        assert report["sampling"][batch]["tokens"] > 0 and report["sampling"][batch]["tokens_per_s"] > 0
    assert set(report["summary"]) == {"ours", "strong", "reference"}
    for method, summary in report["summary"].items():
        records = report["records"][method]
        assert summary["self_edits"] == len(records) == (1 if method == "reference" else 2)
        for key in (
            "per_self_edit_s",
            "baseline_s",
            "train_s",
            "eval_s",
            "self_edits_per_min",
            "tokens_per_self_edit",
            "train_gflops_per_s",
            "train_fraction_of_peak",
        ):
            assert summary[key] > 0, (method, key)
        assert summary["per_self_edit_s"] == pytest.approx(sum(r["total_s"] for r in records) / len(records))
        assert summary["train_gflops_per_s"] == pytest.approx(
            4 * report["parameters"] * sum(r["tokens"] for r in records) / sum(r["train_s"] for r in records) / 1e9
        )
        assert summary["train_fraction_of_peak"] == pytest.approx(
            summary["train_gflops_per_s"] / report["matmul"]["peak_gflops"]
        )
    for name in ("strong", "reference"):
        ratio = report["summary"][name]["per_self_edit_s"] / report["summary"]["ours"]["per_self_edit_s"]
        assert report["speedup"][name] == pytest.approx(ratio)
        assert f"ours vs {name}: {ratio:.2f}x" in printed
    # the same self-edits, the same tokens, for all three
    tokens = {m: {(r["context"], r["self_edit"]): r["tokens"] for r in rs} for m, rs in report["records"].items()}
    assert tokens["ours"] == tokens["strong"]
    assert all(tokens["ours"][key] == value for key, value in tokens["reference"].items())
    (reference,) = report["records"]["reference"]
    assert reference["steps_timed"] == 2 < reference["steps"] and report["summary"]["reference"]["extrapolated"]
    assert "EXTRAPOLATED" in printed
    assert report["peak_memory_mb"]["after_reference_mb"] > 0


def test_fit_line_recovers_fixed_and_per_row_costs():
    from benchmarks.step_scaling import fit_line

    assert fit_line([1, 2, 5], [700 + 400 * n for n in (1, 2, 5)]) == pytest.approx((700, 400))
    with pytest.raises(ValueError, match="two different adapter counts"):
        fit_line([5, 5], [1.0, 2.0])


def test_step_scaling_script_times_each_count_and_fits_the_line(seal_home, tmp_path):
    from benchmarks import step_scaling

    out = tmp_path / "scaling.json"
    assert (
        step_scaling.main(
            [
                "--config",
                str(TINY),
                "--adapters",
                "1",
                "3",
                "--tokens",
                "12",
                "--steps",
                "2",
                "--repeats",
                "1",
                "--matmul-size",
                "128",
                "--json",
                str(out),
                "lora.rank=4",
                "lora.alpha=8",
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert [p["adapters"] for p in report["points"]] == [1, 3]
    assert all(p["ms_per_step"] > 0 and p["tokens_per_row"] >= 12 for p in report["points"])
    ms = [p["ms_per_step"] for p in report["points"]]
    fit = report["fit"]
    assert fit["adapters"] == [1, 3]
    assert fit["fixed_ms_per_step"] + fit["ms_per_row"] == pytest.approx(ms[0])  # two points: the line through them
    assert report["matmul_floor_ms_per_token"] > 0


def test_frozen_step_is_the_packed_loss_and_reaches_the_first_layer_without_parameter_gradients(tiny):
    from benchmarks.step_ceiling import frozen_step
    from models.lm_loss import token_losses
    from models.packing import pack_sequences, packed_attention

    model = tiny.model
    requires_grad = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    reached = []
    hook = model.get_decoder().layers[0].register_full_backward_hook(lambda *args: reached.append(True))
    try:
        batch = pack_sequences([[5, 9, 13, 2, 7], [3, 8, 4]])
        loss = frozen_step(model, batch)
        with torch.no_grad(), packed_attention(model):
            expected = token_losses(model, batch.input_ids, batch.labels, **batch.model_kwargs()).sum().item()
    finally:
        hook.remove()
        model.eval()
        for p, flag in zip(model.parameters(), requires_grad):
            p.requires_grad_(flag)
    assert loss == pytest.approx(expected, rel=1e-5)
    assert reached  # the backward pass went through every layer, down to the first
    assert all(p.grad is None for p in model.parameters())


def test_step_ceiling_script_times_ours_and_the_frozen_model_on_the_same_rows(seal_home, tmp_path, capsys):
    from benchmarks import step_ceiling

    out = tmp_path / "ceiling.json"
    assert (
        step_ceiling.main(
            [
                "--config",
                str(TINY),
                "--rows",
                "1",
                "2",
                "--tokens",
                "12",
                "--steps",
                "2",
                "--repeats",
                "1",
                "--matmul-size",
                "128",
                "--json",
                str(out),
                "lora.rank=4",
                "lora.alpha=8",
                "inner_loop.lanes=2",
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert report["lanes"] == 2 and report["matmul_peak_gflops"] > 0
    assert [p["rows_per_lane"] for p in report["points"]] == [1, 2]
    for point in report["points"]:
        assert point["ours_ms_per_step"] > 0 and point["frozen_ms_per_step"] > 0
        tokens = point["tokens_per_row"] * point["rows_per_lane"] * report["lanes"]
        for method in ("ours", "frozen"):
            gflops = 4 * report["parameters"] * tokens / (point[f"{method}_ms_per_step"] / 1000) / 1e9
            assert point[f"{method}_gflops"] == pytest.approx(gflops)
            assert point[f"{method}_fraction_of_peak"] == pytest.approx(gflops / report["matmul_peak_gflops"])
        assert point["ours_fraction_of_frozen"] == pytest.approx(
            point["frozen_ms_per_step"] / point["ours_ms_per_step"]
        )
        assert f"ours at {point['ours_fraction_of_frozen']:.0%} of the frozen model's rate" in printed


def test_learning_study_writes_table_2_with_intervals_after_every_iteration(prefect_env, tmp_path, capsys):
    from benchmarks import learning_study

    out = tmp_path / "study.json"
    assert (
        learning_study.main(
            [
                "--config",
                str(TINY),
                "--json",
                str(out),
                "rl.iterations=2",
                "tracking.experiment=study",
                "tracking.registered_model=study-policy",
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert len(report["held_out"]) == 3 and report["held_out"][0]["policy"] == "base"  # after each iteration
    for row in report["held_out"]:
        assert list(row["columns"]) == ["no_adaptation", "passage_only", "base_self_edits", "policy_self_edits"]
        for column in row["columns"].values():
            assert column["low"] <= column["accuracy"] <= column["high"]
        assert [d["of"] for d in row["differences"]] == [
            ["policy_self_edits", "passage_only"],
            ["policy_self_edits", "base_self_edits"],  # the RL gain
        ]
        assert row["difference"] == row["differences"][0]
    assert [i["iteration"] for i in report["iterations"]] == [1, 2]
    assert "self_edit/fact_recall" in report["iterations"][0]
    assert out.with_suffix(".png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "policy self edits - passage only" in printed and "policy self edits - base self edits" in printed

    # A study stopped early is reported from what its run logged: here the same tables.
    rebuilt = tmp_path / "rebuilt.json"
    assert learning_study.main(["--config", str(TINY), "--from-run", report["run_id"], "--json", str(rebuilt)]) == 0
    again = json.loads(rebuilt.read_text())
    # (Labelled by step: a policy that kept nothing is still "base" in the flow's own labels.)
    assert [{**row, "policy": None} for row in again["held_out"]] == [
        {**row, "policy": None} for row in report["held_out"]
    ]
    assert [row["policy"] for row in again["held_out"]] == ["base", "iteration-1", "iteration-2"]
    assert again["iterations"] == report["iterations"]
    assert not again["stopped_early"] and 0 < again["wall_s"] and rebuilt.with_suffix(".png").exists()


def test_a_stopped_study_is_rebuilt_from_the_tables_its_run_logged(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from benchmarks.learning_study import report_from_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    client = MlflowClient()
    run = client.create_run(client.create_experiment("stopped", artifact_location=str(tmp_path / "artifacts")))
    run_id = run.info.run_id
    columns = ["no_adaptation", "passage_only", "base_self_edits", "policy_self_edits"]
    for step, policy_means in [(0, [0.5, 1.0]), (1, [2.5, 3.0])]:
        table = {"context_id": ["a", "b"], "questions": [4, 5]}
        table |= {"no_adaptation": [0, 0], "passage_only": [1.0, 2.0], "base_self_edits": [0.5, 1.5]}
        client.log_table(run_id, table | {"policy_self_edits": policy_means}, f"held_out/step-{step}.json")
    client.log_metric(run_id, "reward_mean", 0.25, step=1)
    client.log_metric(run_id, "held_out/passage_only", 1 / 3, step=1)  # a held-out metric, not an iteration's

    report, iterations, held_out = report_from_run(run_id)  # the run never finished: stopped early
    assert report["stopped_early"] and [label for label, _ in held_out] == ["base", "iteration-1"]
    after = report["held_out"][1]
    assert list(after["columns"]) == columns
    assert after["columns"]["policy_self_edits"]["correct"] == 5.5 and after["columns"]["passage_only"]["total"] == 9
    assert after["difference"]["value"] == pytest.approx((5.5 - 3.0) / 9)
    assert report["iterations"] == [{"iteration": 1, "reward_mean": 0.25}] and iterations[0].iteration == 1


def test_results_table_matches_the_result_files():
    """benchmarks/README.md's table is what benchmarks/report.py makes of benchmarks/results/*.json."""
    from benchmarks import report

    assert report.main(["--check"]) == 0, "run python benchmarks/report.py and commit benchmarks/README.md"


def test_report_names_what_a_new_result_file_lacks(tmp_path):
    from benchmarks import report

    (tmp_path / "serve-new-machine.json").write_text("{}")
    with pytest.raises(SystemExit, match="add an entry to CONDITIONS"):
        report.table(tmp_path)
    (tmp_path / "serve-new-machine.json").unlink()
    (tmp_path / "unknown-cpu.json").write_text("{}")
    with pytest.raises(SystemExit, match="add a summary for it to BENCHMARKS"):
        report.table(tmp_path)


def test_continual_benchmark_writes_each_variant_with_its_matrix(prefect_env, tmp_path, capsys):
    from benchmarks import continual
    from conftest import squad_file as _squad

    out = tmp_path / "continual.json"
    squad = _squad(tmp_path / "squad-continual-bench.json")
    assert (
        continual.main(
            [
                "--config",
                str(TINY),
                "--json",
                str(out),
                "--variants",
                "self_edit,replay",
                "--replay",
                "1",
                "--rerun",
                "data.source=squad",
                f"data.path={squad}",
                "data.validation_fraction=0.95",
                "continual.sequences=1",
                "continual.passages=2",
                "continual.probe_prompts=1",
                "tracking.experiment=continual-bench",
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert list(report["variants"]) == ["self_edit", "replay"]
    for name, variant in report["variants"].items():
        assert variant["wall_s"] > 0 and variant["projected_8x8_s"] == pytest.approx(variant["wall_s"] * 32)
        assert len(variant["mean"]) == 3 and variant["mean"][1][1] is None
        assert {"forgetting", "backward_transfer", "newest_accuracy"} <= set(variant["metrics"])
        assert (tmp_path / f"continual-{name}.png").stat().st_size > 0
        # the rerun is timed, not compared: on a loaded CPU a mostly cached first run can be faster
        assert variant["peak_tree_memory_mb"] > 0 and variant["rerun_wall_s"] > 0
        assert any(task.startswith("continual_step") for task in variant["task_s_by_task"])
    assert report["variants"]["replay"]["continual"]["replay"] == 1
    assert report["machine"]["cpus"] and "== replay" in capsys.readouterr().out


@pytest.mark.parametrize(
    "variant, expected",
    [
        ("self_edit", []),
        ("passage_only", ["continual.training=passage_only"]),
        ("replay", ["continual.replay=3"]),
        ("routed", ["continual.adapters=routed"]),
        ("policy", ["continual.policy=models:/seal-policy@best"]),
    ],
)
def test_continual_benchmark_variants_are_config_switches(variant, expected):
    import argparse

    from benchmarks import continual

    args = argparse.Namespace(replay=3, policy="models:/seal-policy@best")
    assert continual.variant_overrides(variant, args) == expected
    with pytest.raises(SystemExit, match="needs --policy"):
        continual.variant_overrides("policy", argparse.Namespace(replay=3, policy=None))


def test_generated_questions_script_scores_the_kept_pairs_and_the_real_questions(seal_home, tmp_path, monkeypatch):
    from benchmarks import generated_questions as script
    from models import generated_questions

    # The tiny model writes no pair: a writer's text per passage, with one answer in the passage
    # (its first word) and one not, goes through the real parser and filters.
    def scripted(model, tokenizer, prompts, **kwargs):
        firsts = [p.split("Passage:\n", 1)[1].split("\n")[1].split()[0].strip(".,") for p in prompts]
        return [f"Q: What comes first? A: {first}\nQ: What is missing? A: qqqxqqq\n" for first in firsts]

    monkeypatch.setattr(generated_questions, "generate", scripted)
    out = tmp_path / "gq.json"
    assert script.main(["--config", str(TINY), "--contexts", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["parsed"] == 4 and report["kept"] == 2 and report["dropped"]["answer_not_in_passage"] == 2
    assert report["contexts_without_pairs"] == 0 and report["mean_pairs"] == 1.0
    for table in ("unadapted", "passage_only"):
        assert report[table]["generated"]["total"] == 2 and report[table]["real"]["total"] > 0
    assert [len(e["pairs"]) for e in report["examples"]] == [1, 1]


def test_learning_study_variants_compare_reward_sources_and_report_the_gain_recovered(tmp_path, monkeypatch, capsys):
    from benchmarks import learning_study
    from flows.held_out import HeldOutResult
    from flows.knowledge import HELD_OUT_COMPARISONS

    # Per reward source, policy self-edits' correct answers on 4 contexts of 5 questions; base
    # self-edits get 1 everywhere. Real questions gain 2 per context, generated ones 1 (half).
    policy_correct = {"questions": 3, "generated": 2, "generated_base": 1}
    runs = []

    def study(config):
        runs.append((config.reward.source, config.reward.question_writer))
        base_writer = config.reward.source == "generated" and config.reward.question_writer == "base"
        correct = policy_correct["generated_base" if base_writer else config.reward.source]
        columns = {"no_adaptation": 0, "passage_only": 2, "base_self_edits": 1, "policy_self_edits": correct}
        counts = {column: [(n, 5)] * 4 for column, n in columns.items()}
        per_context = [{"context_id": f"c{i}", "questions": 5} for i in range(4)]
        result = HeldOutResult(None, counts, 0.0, HELD_OUT_COMPARISONS, per_context)
        report = {"wall_s": 1.0, "run_id": f"run-{len(runs)}", "held_out": [learning_study.table_row("x", result)]}
        finished[report["run_id"]] = report, [], [("iteration-1", result)]
        return finished[report["run_id"]]

    finished = {}

    monkeypatch.setattr(learning_study, "run_study", study)
    out = tmp_path / "variants.json"
    argv = ["--config", str(TINY), "--json", str(out), "--variants", "questions,generated,generated_base"]
    assert learning_study.main(argv) == 0
    assert runs == [("questions", "policy"), ("generated", "policy"), ("generated", "base")]
    report = json.loads(out.read_text())
    assert list(report["variants"]) == ["questions", "generated", "generated_base"]
    (generated,) = report["recovery"]["generated"]
    assert generated["recovery"] == pytest.approx(0.5) and generated["reference_gain"] == pytest.approx(0.4)
    assert generated["meaningful"] and generated["reference_low"] == pytest.approx(0.4)
    # The target as a difference: +20 points less 80 % of +40 falls short in every resample.
    assert generated["margin"]["value"] == pytest.approx(0.2 - 0.8 * 0.4) and generated["margin"]["high"] < 0
    assert report["recovery"]["generated_base"][0]["recovery"] == pytest.approx(0.0)
    assert all((tmp_path / f"variants-{v}.png").exists() for v in report["variants"])
    from benchmarks.report import learning_study as headline

    assert "generated: after x:" in headline(report) and "recovers 50 % [50 %, 50 %]" in headline(report)
    assert "gain − 80 % of the real gain −12.0 points [−12.0, −12.0]" in headline(report)
    assert "recovers 50% [50%, 50%] of the real questions' gain, +40.0 points" in capsys.readouterr().out

    # --from-run with --variants rebuilds the comparison from one run per variant, in order.
    monkeypatch.setattr(learning_study, "report_from_run", finished.__getitem__)
    rebuilt = tmp_path / "rebuilt.json"
    argv = ["--config", str(TINY), "--json", str(rebuilt), "--variants", "questions,generated,generated_base"]
    assert learning_study.main([*argv, "--from-run", "run-1,run-2,run-3"]) == 0
    assert json.loads(rebuilt.read_text())["recovery"] == report["recovery"] and len(runs) == 3
    with pytest.raises(SystemExit):  # argparse's error: one run for three variants
        learning_study.main([*argv, "--from-run", "run-1"])
    assert "one run per variant: 1 runs, 3 variants" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown variants nope"):
        learning_study.main(["--config", str(TINY), "--variants", "questions,nope"])
