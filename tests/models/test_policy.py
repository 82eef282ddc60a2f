import math

import pytest
import torch

from models.base_model import build_tiny_tokenizer, load_model
from models.config import LoraConfig, PolicyUpdateConfig
from models.errors import NonFiniteLossError
from models.policy import collate_pairs, format_pair, tokenize_pairs, update_policy
from models.self_edit import render_prompt, self_edit_prompt

PAIRS = [
    (
        self_edit_prompt("implications", "Kelthrop", "Orvanne Kelthrop founded the Thessory Guild in 1873."),
        "1. The Thessory Guild is older than 1900.\n2. Kelthrop was a founder.",
    ),
    (
        self_edit_prompt("implications", "Sallowmere", "Sallowmere is a town of 412 clockmakers."),
        "1. Sallowmere makes clocks.\n2. Many people in Sallowmere are clockmakers.",
    ),
    (
        self_edit_prompt("rewrite", "Lantern", "The Brassmoor lantern weighs 37 kg."),
        "The lantern from Brassmoor has a mass of 37 kilograms.",
    ),
]
TARGETS = LoraConfig().target_modules
CONFIG = PolicyUpdateConfig(rank=8, alpha=16, learning_rate=1e-2, epochs=3, batch_size=2, max_length=512)


def _fresh_policy(home):
    return load_model("tiny-random", home=home, device="cpu", dtype="float32")


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def _self_edit_log_likelihood(model, tokenizer, pairs):
    """Summed log-probability of the self-edits (and EOS) given their rendered prompts."""
    examples, _ = tokenize_pairs(tokenizer, pairs, max_length=10_000)
    batch = collate_pairs(examples, tokenizer.pad_token_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # position t predicts token t+1: (batch, len-1, vocab) against (batch, len-1)
    labels = batch["labels"][:, 1:]
    logprobs = logits[:, :-1].log_softmax(-1)
    picked = logprobs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked[labels != -100].sum().item()


# --- formatting and labels ---


def test_labels_cover_the_self_edit_and_eos_even_when_pad_is_eos():
    eos = 7  # the pad id is often the EOS id
    batch = collate_pairs([([1, 2, 3], [4, eos]), ([5], [eos, 6, eos])], pad_id=eos)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, eos], [5, eos, 6, eos, eos]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 4, eos], [-100, eos, 6, eos, -100]]


def test_format_pair_applies_the_chat_template(tiny):
    prompt, self_edit = PAIRS[0]
    prompt_ids, self_edit_ids = format_pair(tiny.tokenizer, prompt, self_edit)
    rendered = tiny.tokenizer.decode(prompt_ids)
    assert rendered == render_prompt(tiny.tokenizer, prompt)
    assert rendered.startswith("<|im_start|>user\nLet's read") and rendered.endswith("<|im_start|>assistant\n")
    assert self_edit_ids[-1] == tiny.tokenizer.eos_token_id
    assert tiny.tokenizer.decode(self_edit_ids) == self_edit + "<|im_end|>"


def test_format_pair_without_a_chat_template_uses_the_plain_prompt():
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = None
    prompt_ids, _ = format_pair(tokenizer, "Plain prompt:\n", "An answer.")
    assert tokenizer.decode(prompt_ids) == "Plain prompt:\n"


def test_long_self_edits_are_cut_and_long_prompts_skipped(tiny):
    short = ("Q", "x" * 40)
    too_long_prompt = ("p" * 100, "y")
    examples, skipped = tokenize_pairs(tiny.tokenizer, [short, too_long_prompt], max_length=32)
    assert skipped == 1 and len(examples) == 1
    prompt_ids, self_edit_ids = examples[0]
    assert prompt_ids == format_pair(tiny.tokenizer, *short)[0]  # the prompt is never cut
    assert len(prompt_ids) + len(self_edit_ids) == 32
    assert tiny.tokenizer.eos_token_id not in self_edit_ids  # cut short, so it did not end


# --- the update ---


def test_update_raises_the_likelihood_of_kept_self_edits_and_saves_the_policy(tmp_path):
    policy = _fresh_policy(tmp_path)
    before = _state(policy.model)
    likelihood_before = _self_edit_log_likelihood(policy.model, policy.tokenizer, PAIRS)

    result = update_policy(policy.model, policy.tokenizer, PAIRS, CONFIG, TARGETS, tmp_path / "policy-1", source="test")

    assert result.path == tmp_path / "policy-1"
    assert (result.pairs, result.skipped, result.steps) == (3, 0, 6)  # 2 batches x 3 epochs
    assert math.isfinite(result.mean_loss) and result.final_loss < result.mean_loss
    reloaded = load_model(str(result.path), home=tmp_path, device="cpu", dtype="float32")
    assert reloaded.digest == result.digest
    assert reloaded.digest != policy.digest
    after = reloaded.model.state_dict()
    assert after.keys() == before.keys()  # merged: no LoRA layers left
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert any("q_proj" in k for k in moved) and any("down_proj" in k for k in moved)
    assert all(any(t in k for t in TARGETS) for k in moved)  # embeddings and norms untouched
    likelihood_after = _self_edit_log_likelihood(reloaded.model, reloaded.tokenizer, PAIRS)
    assert likelihood_after > likelihood_before + 50  # nats, summed over ~150 tokens
    # The original policy's folder is untouched.
    original = _fresh_policy(tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in original.model.state_dict().items())


def test_same_inputs_and_seed_give_the_same_policy(tmp_path):
    def run(name, seed):
        policy = _fresh_policy(tmp_path)
        return update_policy(
            policy.model,
            policy.tokenizer,
            PAIRS,
            CONFIG.model_copy(update={"seed": seed}),
            TARGETS,
            tmp_path / name,
            source="test",
        ).digest

    assert run("a", seed=0) == run("b", seed=0)
    assert run("c", seed=1) != run("a", seed=0)


@pytest.mark.parametrize("max_grad_norm", [None, 1e-3])
def test_the_optimizer_sees_gradients_clipped_to_max_grad_norm(tmp_path, monkeypatch, max_grad_norm):
    norms = []
    step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norms.append(torch.nn.utils.get_total_norm(grads).item())
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    policy = _fresh_policy(tmp_path)
    update_policy(
        policy.model,
        policy.tokenizer,
        PAIRS,
        CONFIG.model_copy(update={"max_grad_norm": max_grad_norm}),
        TARGETS,
        tmp_path / "policy",
        source="test",
    )
    assert len(norms) == 6
    if max_grad_norm is None:
        assert min(norms) > 1e-2  # the gradients this test clips below
    else:
        assert max(norms) == pytest.approx(max_grad_norm, rel=1e-3)


def test_pairs_with_too_long_prompts_are_counted(tmp_path):
    policy = _fresh_policy(tmp_path)
    pairs = [("a short prompt", "a short self-edit"), ("p" * 200, "never trained on")]
    config = CONFIG.model_copy(update={"max_length": 64})
    result = update_policy(policy.model, policy.tokenizer, pairs, config, TARGETS, tmp_path / "p", source="test")
    assert (result.pairs, result.skipped) == (1, 1)


def test_no_pairs_is_an_error_that_says_to_keep_the_policy():
    with pytest.raises(ValueError, match="keep the previous policy"):
        update_policy(None, None, [], CONFIG, TARGETS, None, source="test")


def test_only_too_long_prompts_is_an_error(tiny, tmp_path):
    config = CONFIG.model_copy(update={"max_length": 16})
    with pytest.raises(ValueError, match="raise policy_update.max_length"):
        update_policy(tiny.model, tiny.tokenizer, [("p" * 50, "x")], config, TARGETS, tmp_path / "p", source="test")
    assert not (tmp_path / "p").exists()


def test_non_finite_loss_is_an_error_and_writes_nothing(tmp_path):
    policy = _fresh_policy(tmp_path)
    policy.model.lm_head.weight.data.fill_(float("nan"))
    keys = set(policy.model.state_dict())
    with pytest.raises(NonFiniteLossError, match="lower policy_update.learning_rate"):
        update_policy(policy.model, policy.tokenizer, PAIRS, CONFIG, TARGETS, tmp_path / "p", source="test")
    assert not (tmp_path / "p").exists()
    assert set(policy.model.state_dict()) == keys  # the adapter was removed again


def test_accumulated_gradients_equal_one_padded_batch(tiny):
    from models.inner_loop import lora_config
    from models.policy import accumulate_gradients
    import peft

    examples, _ = tokenize_pairs(tiny.tokenizer, PAIRS, max_length=512)
    torch.manual_seed(0)
    adapted = peft.get_peft_model(tiny.model, lora_config(LoraConfig(rank=4, alpha=8, target_modules=TARGETS)))
    try:
        for name, param in adapted.named_parameters():  # B is zero at init: give it weight
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.1)
        batch = collate_pairs(examples, tiny.tokenizer.pad_token_id)
        padded_loss = adapted(**batch).loss
        padded_loss.backward()
        padded = {n: p.grad.clone() for n, p in adapted.named_parameters() if p.requires_grad}
        adapted.zero_grad(set_to_none=True)

        loss = accumulate_gradients(adapted, examples, tiny.tokenizer.pad_token_id)

        assert loss == pytest.approx(padded_loss.item(), rel=1e-5)
        for name, param in adapted.named_parameters():
            if param.requires_grad:
                torch.testing.assert_close(param.grad, padded[name], rtol=1e-4, atol=1e-6)
    finally:
        adapted.unload()
