import threading

import pytest
import torch
from torch import nn

import models.lm_loss as lm_loss
from models.base_model import load_model
from models.lm_loss import token_losses
from models.stacked_lora import StackedLoraLinear


@pytest.fixture
def model(tmp_path):
    loaded = load_model("tiny-random", home=tmp_path, device="cpu", dtype="float32")
    for name, p in loaded.model.named_parameters():
        p.requires_grad_("layers" in name)  # head and embeddings frozen, as under LoRA
    return loaded.model


def _batch(model):
    torch.manual_seed(0)
    input_ids = torch.randint(3, model.config.vocab_size, (3, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0  # a padded row
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return input_ids, attention_mask, labels


def _reference(model, input_ids, attention_mask, labels):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction="none"
    ).view(labels[:, 1:].shape)


def _grads(model, losses, labels):
    model.zero_grad()
    mask = labels[:, 1:] != -100
    (losses[mask] * torch.linspace(0.5, 2.0, int(mask.sum()))).sum().backward()  # uneven weights per token
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_chunked_losses_and_gradients_equal_the_full_logits(model, monkeypatch):
    monkeypatch.setattr(lm_loss, "_CHUNK_ELEMENTS", model.config.vocab_size * 5)  # 5 tokens a chunk: 7 chunks
    input_ids, attention_mask, labels = _batch(model)
    expected = _reference(model, input_ids, attention_mask, labels)
    expected_grads = _grads(model, expected, labels)
    losses = token_losses(model, input_ids, labels, attention_mask=attention_mask)
    grads = _grads(model, losses, labels)
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-5)
    assert torch.all(losses[1, 8:] == 0)  # ignored positions
    assert grads.keys() == expected_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-4, atol=1e-5)


def test_each_threads_logits_buffer_grows_and_serves_every_call(model, monkeypatch):
    monkeypatch.setattr(lm_loss, "_BUFFERS", threading.local())
    input_ids, attention_mask, labels = _batch(model)
    for rows in (slice(0, 1), slice(0, 3), slice(2, 3)):  # smaller, larger, smaller again
        args = input_ids[rows], attention_mask[rows], labels[rows]
        torch.testing.assert_close(
            token_losses(model, args[0], args[2], attention_mask=args[1]),
            _reference(model, *args),
            rtol=1e-5,
            atol=1e-5,
        )
    assert lm_loss._BUFFERS.logits.numel() == 3 * 11 * model.config.vocab_size


def test_a_trainable_head_takes_the_full_logits_path(model):
    model.get_output_embeddings().weight.requires_grad_(True)
    input_ids, attention_mask, labels = _batch(model)
    losses = token_losses(model, input_ids, labels, attention_mask=attention_mask)
    losses.sum().backward()
    assert model.get_output_embeddings().weight.grad is not None
    torch.testing.assert_close(losses, _reference(model, input_ids, attention_mask, labels))


def test_tokens_outside_the_loss_get_no_gradient_even_when_not_finite():
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(16, 8)
    poisoned = hidden.detach().clone()
    poisoned[2] = float("nan")
    poisoned.requires_grad_(True)
    losses = lm_loss._LinearCrossEntropy.apply(poisoned, weight, torch.tensor([1, 2, 3, 4]))
    assert torch.isnan(losses[2])
    losses[[0, 1, 3]].sum().backward()
    assert torch.isfinite(poisoned.grad).all() and torch.all(poisoned.grad[2] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stacked_lora_layer_gradients_equal_plain_autograd(dtype):
    torch.manual_seed(0)
    layer = StackedLoraLinear(nn.Linear(8, 6, bias=False).to(dtype), rank=4, alpha=8, dropout=0.0, slots=3)
    layer.base.weight.requires_grad_(False)
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    layer.rows = torch.tensor([2, 0])
    x = torch.randn(2, 5, 8, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(2, 5, 6, dtype=dtype)

    (layer(x) * grad_out).sum().backward()
    got = [x.grad, layer.lora_A.grad, layer.lora_B.grad]

    x.grad, layer.lora_A.grad, layer.lora_B.grad = None, None, None
    a, b = layer.lora_A[layer.rows], layer.lora_B[layer.rows]
    plain = layer.base(x) + (
        layer.scaling * torch.bmm(torch.bmm(x.to(a.dtype), a.transpose(1, 2)), b.transpose(1, 2))
    ).to(dtype)
    (plain * grad_out).sum().backward()
    for mine, expected in zip(got, [x.grad, layer.lora_A.grad, layer.lora_B.grad]):
        torch.testing.assert_close(mine, expected)
    assert torch.all(got[1][1] == 0)  # adapter 1 had no row
