import peft
import pytest
import torch

from models.base_model import load_model
from models.config import InnerLoopConfig, LoraConfig
from models.stacked_lora import stacked_adapters, train_stacked

LORA = LoraConfig(rank=4, alpha=8)
TRAIN = InnerLoopConfig(learning_rate=1e-2, epochs=3, batch_size=1, max_length=64)
DOCS = [
    ["Kelthrop\nOrvanne Kelthrop founded the Thessory Guild in 1873.", "Kelthrop\nIt had 412 members."],
    ["Sallowmere\nThe lantern weighs 37 kilograms.", "Sallowmere\nIt hangs in Brindlecourt.", "A third, longer document here."],
    ["Only one document for this adapter."],
]
SEEDS = [11, 12, 13]


@pytest.fixture
def model(tmp_path):
    return load_model("tiny-random", home=tmp_path, device="cpu")


def _weights(stack, k):
    return [p.detach().clone() for p in stack.parameters(k)]


def test_training_together_equals_training_alone(model):
    with stacked_adapters(model.model, LORA, SEEDS) as stack:
        together = train_stacked(stack, model.tokenizer, DOCS, TRAIN)
        stacked_weights = [_weights(stack, k) for k in range(3)]
    for k in range(3):
        with stacked_adapters(model.model, LORA, [SEEDS[k]]) as alone_stack:
            (alone,) = train_stacked(alone_stack, model.tokenizer, [DOCS[k]], TRAIN)
            alone_weights = _weights(alone_stack, 0)
        assert together[k].steps == alone.steps == 3 * len(DOCS[k])
        assert together[k].mean_loss == pytest.approx(alone.mean_loss, rel=1e-5)
        for a, b in zip(stacked_weights[k], alone_weights):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        assert any(not torch.equal(w, torch.zeros_like(w)) for w in stacked_weights[k])  # B moved


def test_base_weights_untouched_and_layers_restored(model):
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    with stacked_adapters(model.model, LORA, SEEDS) as stack:
        train_stacked(stack, model.tokenizer, DOCS, TRAIN)
    after = model.model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_saved_adapter_loads_in_peft_with_the_same_outputs(model, tmp_path):
    ids = model.tokenizer(["Who founded the guild?"], return_tensors="pt")["input_ids"]
    with stacked_adapters(model.model, LORA, SEEDS) as stack:
        train_stacked(stack, model.tokenizer, DOCS, TRAIN)
        stack.route(torch.tensor([1]))
        expected = model.model(ids).logits
        stack.route(None)
        folder = stack.save(1, tmp_path / "adapter1")
    loaded = peft.PeftModel.from_pretrained(model.model, folder)
    torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-4, atol=1e-5)
    loaded.unload()


def test_every_adapter_needs_documents(model):
    with stacked_adapters(model.model, LORA, [0, 1]) as stack, pytest.raises(ValueError, match="non-empty"):
        train_stacked(stack, model.tokenizer, [["doc"], []], TRAIN)


def test_stacked_evaluation_matches_each_adapter_alone(model, tmp_path):
    from models.config import EvalConfig
    from models.inner_loop import evaluate_adapter, loaded_adapter
    from models.stacked_lora import evaluate_stacked

    questions = [["Who founded the guild?", "How many members?"], ["What does it weigh?"], ["Where?", "When?"]]
    answers = [[["Orvanne Kelthrop"], ["412"]], [["37 kilograms"]], [["Brindlecourt"], ["1873"]]]
    config = EvalConfig(max_new_tokens=6, batch_size=3)  # chunks cut across adapters
    with stacked_adapters(model.model, LORA, SEEDS) as stack:
        train_stacked(stack, model.tokenizer, DOCS, TRAIN.model_copy(update={"learning_rate": 5e-2}))
        together = evaluate_stacked(stack, model.tokenizer, questions, answers, config)
        folders = [stack.save(k, tmp_path / f"adapter{k}") for k in range(3)]
    for k, folder in enumerate(folders):
        with loaded_adapter(model.model, folder) as adapted:
            alone = evaluate_adapter(adapted, model.tokenizer, questions[k], answers[k], config)
        assert together[k].predictions == alone.predictions
        assert together[k].correct == alone.correct
