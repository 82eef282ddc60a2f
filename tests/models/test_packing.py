import pytest
import torch

from models.base_model import load_model
from models.lm_loss import IGNORE_INDEX, token_losses
from models.packing import PACKED_ATTENTION, pack_sequences, packed_attention

ROWS = [[5, 17, 42, 8, 99, 3], [7, 7, 12], [64, 2, 31, 31, 9, 11, 4, 70, 1], [13, 6]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # float32 on every CPU: in bf16 (the default where the CPU multiplies it natively) eager and
    # SDPA attention round differently, by more than the equivalence checked here
    return load_model("tiny-random", home=tmp_path_factory.mktemp("home"), device="cpu", dtype="float32").model


def test_pack_sequences_restarts_positions_and_ignores_each_rows_first_label():
    batch = pack_sequences(ROWS[:2])
    assert batch.input_ids.tolist() == [[5, 17, 42, 8, 99, 3, 7, 7, 12]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2]]
    assert batch.labels.tolist() == [[IGNORE_INDEX, 17, 42, 8, 99, 3, IGNORE_INDEX, 7, 12]]
    assert batch.lengths == (6, 3) and batch.starts() == [0, 6] and batch.tokens == 9
    kwargs = batch.model_kwargs()
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 6, 9] and kwargs["max_length_q"] == 6
    with pytest.raises(ValueError, match="no empty rows"):
        pack_sequences([[1, 2], []])


def _row_losses(model, rows):
    """Each row alone, unpadded: its next-token losses and the gradient of their sum."""
    losses = []
    for row in rows:
        ids = torch.tensor([row])
        losses.append(token_losses(model, ids, ids.clone())[0])
    return losses


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_packed_rows_get_the_losses_and_gradients_of_rows_alone(tiny, implementation):
    original = tiny.config._attn_implementation
    tiny.config._attn_implementation = implementation
    embeddings = tiny.get_input_embeddings().weight
    embeddings.requires_grad_(True)
    try:
        alone = _row_losses(tiny, ROWS)
        torch.stack([loss.sum() for loss in alone]).sum().backward()
        expected_grad, embeddings.grad = embeddings.grad.clone(), None

        batch = pack_sequences(ROWS)
        with packed_attention(tiny):
            packed = token_losses(tiny, batch.input_ids, batch.labels, **batch.model_kwargs())[0]
        packed.sum().backward()
        for row, start, length in zip(alone, batch.starts(), batch.lengths):
            torch.testing.assert_close(packed[start : start + length - 1], row, rtol=1e-5, atol=1e-5)
            if start + length - 1 < len(packed):
                assert packed[start + length - 1] == 0  # the next row's first token is not a target
        # atol as the losses': a sum of float32 gradients in another order is off by ~2e-6 with 1 thread
        torch.testing.assert_close(embeddings.grad, expected_grad, rtol=1e-4, atol=1e-5)
    finally:
        embeddings.grad = None
        embeddings.requires_grad_(False)
        tiny.config._attn_implementation = original


def test_without_packed_attention_rows_would_see_each_other(tiny):
    """The check above is not vacuous: plain causal attention over the packed row differs."""
    batch = pack_sequences(ROWS)
    with torch.no_grad():
        leaky = token_losses(
            tiny,
            batch.input_ids,
            batch.labels,
            attention_mask=torch.ones_like(batch.input_ids),
            position_ids=batch.position_ids,
        )[0]
        alone = _row_losses(tiny, ROWS)
    start = batch.starts()[1]
    assert not torch.allclose(leaky[start : start + len(ROWS[1]) - 1], alone[1], atol=1e-4)


def test_packed_attention_is_plain_attention_for_unpacked_calls_and_is_put_back(tiny):
    ids = torch.tensor([ROWS[0], ROWS[2][:6]])
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    original = tiny.config._attn_implementation
    with torch.no_grad():
        expected = tiny(input_ids=ids, attention_mask=mask).logits
        with packed_attention(tiny):
            assert tiny.config._attn_implementation == PACKED_ATTENTION
            inside = tiny(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(inside, expected)
    assert tiny.config._attn_implementation == original
    with pytest.raises(RuntimeError), packed_attention(tiny):
        raise RuntimeError("boom")
    assert tiny.config._attn_implementation == original
