import math

import pytest
import torch

from models.base_model import load_model, weights_digest
from models.config import EvalConfig, InnerLoopConfig, LoraConfig
from models.inner_loop import (
    NonFiniteLossError,
    evaluate_adapter,
    fresh_adapter,
    is_correct,
    loaded_adapter,
    normalize_answer,
    pad_batch,
    save_adapter,
    token_f1,
    train_adapter,
    train_and_merge,
)

DOCS = ["Kelthrop\nOrvanne Kelthrop founded the Thessory Guild in 1873.", "Kelthrop\nThe guild had 412 members."]
QUESTIONS = ["Who founded the Thessory Guild?", "How many members did the guild have?"]
ANSWERS = [["Orvanne Kelthrop"], ["412"]]
LORA = LoraConfig(rank=4, alpha=8)
TRAIN = InnerLoopConfig(learning_rate=1e-2, epochs=3, batch_size=2, max_length=64)
EVAL = EvalConfig(max_new_tokens=6)


def _base_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_adapter_moves_and_base_weights_do_not(tiny):
    before = _base_state(tiny.model)
    with fresh_adapter(tiny.model, LORA, seed=0) as adapted:
        lora_before = {n: p.detach().clone() for n, p in adapted.named_parameters() if p.requires_grad}
        assert lora_before and all("lora_" in n for n in lora_before)
        result = train_adapter(adapted, tiny.tokenizer, DOCS, TRAIN)
        moved = [n for n, p in adapted.named_parameters() if p.requires_grad and not torch.equal(p, lora_before[n])]
    assert result.steps == 3 and result.tokens > 0 and math.isfinite(result.mean_loss)
    assert len(moved) == len(lora_before)
    after = tiny.model.state_dict()
    assert after.keys() == before.keys()  # LoRA layers are gone again
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_training_is_deterministic_given_a_seed(tiny):
    def run(seed):
        with fresh_adapter(tiny.model, LORA, seed=seed) as adapted:
            return train_adapter(adapted, tiny.tokenizer, DOCS, TRAIN.model_copy(update={"seed": seed}))

    first, again, other = run(0), run(0), run(1)
    assert (first.mean_loss, first.final_loss) == (again.mean_loss, again.final_loss)
    assert first.mean_loss != other.mean_loss


def test_loss_decreases_on_a_repeated_document(tiny):
    config = InnerLoopConfig(learning_rate=1e-2, epochs=40, batch_size=1, max_length=64)
    with fresh_adapter(tiny.model, LoraConfig(rank=8, alpha=16), seed=0) as adapted:
        result = train_adapter(adapted, tiny.tokenizer, DOCS[:1], config)
    assert result.final_loss < 0.7 * result.mean_loss


def test_padding_is_masked_out_of_the_loss_but_eos_is_not():
    eos = 7  # the pad id is often the EOS id
    batch = pad_batch([[1, 2, eos], [3, eos]], pad_id=eos)
    assert batch["input_ids"].tolist() == [[1, 2, eos], [3, eos, eos]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[1, 2, eos], [3, eos, -100]]


def test_non_finite_loss_is_an_error_naming_the_fix(tiny):
    with fresh_adapter(tiny.model, LORA, seed=0) as adapted:
        next(p for n, p in adapted.named_parameters() if "lora_A" in n).data.fill_(float("nan"))
        with pytest.raises(NonFiniteLossError, match="lower inner_loop.learning_rate"):
            train_adapter(adapted, tiny.tokenizer, DOCS, TRAIN)


def test_no_documents():
    with pytest.raises(ValueError, match="at least one document"):
        train_adapter(None, None, [], TRAIN)


def test_saved_adapter_reloads_to_the_same_answers(tiny, tmp_path):
    with fresh_adapter(tiny.model, LORA, seed=0) as adapted:
        train_adapter(adapted, tiny.tokenizer, DOCS, TRAIN)
        trained = evaluate_adapter(adapted, tiny.tokenizer, QUESTIONS, ANSWERS, EVAL)
        folder = save_adapter(adapted, tmp_path / "adapter")
    assert (folder / "adapter_model.safetensors").exists()
    assert not list(tmp_path.glob(".adapter-*"))  # no temporary folder left behind
    with loaded_adapter(tiny.model, folder) as reloaded:
        again = evaluate_adapter(reloaded, tiny.tokenizer, QUESTIONS, ANSWERS, EVAL)
    assert again.predictions == trained.predictions and again.correct == trained.correct


def test_evaluate_batches_and_grades(tiny):
    result = evaluate_adapter(
        tiny.model, tiny.tokenizer, QUESTIONS * 3, ANSWERS * 3, EvalConfig(batch_size=4, max_new_tokens=4)
    )
    assert result.total == 6 and len(result.predictions) == 6
    assert result.accuracy == result.num_correct / 6
    with pytest.raises(ValueError, match="2 questions but 1 answer lists"):
        evaluate_adapter(tiny.model, tiny.tokenizer, QUESTIONS, ANSWERS[:1], EVAL)


@pytest.mark.parametrize(
    "prediction, golds, correct",
    [
        ("Orvanne Kelthrop founded it.", ["Orvanne Kelthrop"], True),
        ("orvanne  KELTHROP!", ["Orvanne Kelthrop"], True),
        ("It was founded in 1873.", ["1873"], True),
        ("It was founded in 18734.", ["1873"], False),  # whole words only
        ("The Brindlecourt library", ["Brindlecourt Library", "Brindlecourt"], True),
        ("I do not know.", ["412"], False),
        ("", ["412"], False),
        ("the", ["The"], False),  # a gold that normalizes to nothing matches nothing
    ],
)
def test_is_correct(prediction, golds, correct):
    assert is_correct(prediction, golds) is correct


@pytest.mark.parametrize(
    "prediction, gold, f1",
    [
        ("Orvanne Kelthrop", "Orvanne Kelthrop", 1.0),
        ("Kelthrop", "Orvanne Kelthrop", 2 / 3),
        ("nothing", "412", 0.0),
        ("The 412 members", "412", 2 / 3),
    ],
)
def test_token_f1(prediction, gold, f1):
    assert token_f1(prediction, gold) == pytest.approx(f1)


def test_normalize_answer():
    assert normalize_answer("  The  Quillmarsh, Lantern! ") == "quillmarsh lantern"


def test_an_adapter_slot_trains_like_a_fresh_adapter_and_answers_as_the_base_between_uses(tiny, tmp_path):
    from models.inner_loop import AdapterSlot, saved_lora

    base = _base_state(tiny.model)
    before = evaluate_adapter(tiny.model, tiny.tokenizer, QUESTIONS, ANSWERS, EVAL)
    logits = tiny.model(**tiny.tokenizer(DOCS[:1], return_tensors="pt")).logits
    slot = AdapterSlot(tiny.model, LORA)
    try:
        assert slot.matches(LORA) and not slot.matches(LoraConfig(rank=8, alpha=16))
        assert slot.matches(LoraConfig(rank=4, alpha=8, target_modules=sorted(LORA.target_modules)))
        results = []
        for attempt in range(2):  # the same seed gives the same adapter, however often reused
            with slot.fresh(seed=0) as adapted:
                result = train_adapter(adapted, tiny.tokenizer, DOCS, TRAIN)
                trained = evaluate_adapter(adapted, tiny.tokenizer, QUESTIONS, ANSWERS, EVAL)
                folder = save_adapter(adapted, tmp_path / f"adapter{attempt}")
            results.append((result.mean_loss, trained.predictions))
            # Disabled between uses: the wrapped model answers exactly as the base.
            torch.testing.assert_close(tiny.model(**tiny.tokenizer(DOCS[:1], return_tensors="pt")).logits, logits)
            assert (
                evaluate_adapter(tiny.model, tiny.tokenizer, QUESTIONS, ANSWERS, EVAL).predictions == before.predictions
            )
        assert results[0] == results[1]
        assert result.final_loss < result.mean_loss  # it learns
        with slot.fresh(seed=1):
            pass
        assert slot.matches(saved_lora(folder))
        with slot.loaded(folder) as reloaded:  # a saved adapter comes back exactly
            assert (
                evaluate_adapter(reloaded, tiny.tokenizer, QUESTIONS, ANSWERS, EVAL).predictions == trained.predictions
            )
    finally:
        slot.close()
    after = tiny.model.state_dict()
    assert after.keys() == base.keys() and all(torch.equal(after[k], base[k]) for k in base)


def test_train_and_merge_saves_the_merged_model_or_nothing(tmp_path):
    private = load_model("tiny-random", home=tmp_path / "home", device="cpu", dtype="float32")
    before = _base_state(private.model)

    def interrupted(adapted):
        train_adapter(adapted, private.tokenizer, DOCS, TRAIN)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_and_merge(private.model, private.tokenizer, LORA, 0, interrupted, tmp_path / "merged", "test")
    assert not (tmp_path / "merged").exists()
    after = private.model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)

    def train(adapted):
        return train_adapter(adapted, private.tokenizer, DOCS, TRAIN)

    digest, result = train_and_merge(private.model, private.tokenizer, LORA, 0, train, tmp_path / "merged", "test")
    assert result.steps == 3 and digest == weights_digest(tmp_path / "merged")
    merged = private.model.state_dict()
    assert merged.keys() == before.keys()  # merged into the weights: no LoRA layers left
    assert any(not torch.equal(before[k], merged[k]) for k in before)
    saved = load_model(str(tmp_path / "merged"), device="cpu", dtype="float32").model.state_dict()
    assert all(torch.equal(merged[k], saved[k]) for k in merged)
