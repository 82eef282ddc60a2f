import peft
import pytest
import torch

from models.base_model import load_model
from models.config import InnerLoopConfig, LoraConfig
from models.packing import pack_sequences
from models.stacked_lora import (
    TrainJob,
    adapter_spans,
    stacked_adapters,
    token_budget_parts,
    train_slots,
    train_stacked,
)

LORA = LoraConfig(rank=4, alpha=8)
TRAIN = InnerLoopConfig(learning_rate=1e-2, epochs=3, batch_size=1, max_length=64)
DOCS = [
    ["Kelthrop\nOrvanne Kelthrop founded the Thessory Guild in 1873.", "Kelthrop\nIt had 412 members."],
    [
        "Sallowmere\nThe lantern weighs 37 kilograms.",
        "Sallowmere\nIt hangs in Brindlecourt.",
        "A third, longer document here.",
    ],
    ["Only one document for this adapter."],
]
SEEDS = [11, 12, 13]


@pytest.fixture
def model(tmp_path):
    return load_model("tiny-random", home=tmp_path, device="cpu", dtype="float32")


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


def test_slots_refilled_as_adapters_finish_train_each_as_alone(model):
    """Three adapters through two slots: the shortest finishes first and the third starts in its
    slot, fresh weights and optimizer state, and every adapter ends as trained alone."""
    jobs = iter([TrainJob(k, DOCS[k], SEEDS[k]) for k in (2, 0, 1)])  # one document, two, three
    finished = {}

    def done(job, slot, result):
        finished[job.index] = (slot, result, _weights(stack, slot))

    with stacked_adapters(model.model, LORA, SEEDS[:2]) as stack:
        train_slots(stack, model.tokenizer, lambda: next(jobs, None), TRAIN, done)
    assert [finished[k][0] for k in (2, 0, 1)] == [0, 1, 0]  # adapter 1 took adapter 2's slot
    for k in range(3):
        with stacked_adapters(model.model, LORA, [SEEDS[k]]) as alone_stack:
            (alone,) = train_stacked(alone_stack, model.tokenizer, [DOCS[k]], TRAIN)
            alone_weights = _weights(alone_stack, 0)
        _, result, weights = finished[k]
        assert (result.steps, result.tokens) == (alone.steps, alone.tokens)
        assert result.mean_loss == pytest.approx(alone.mean_loss, rel=1e-5)
        for a, b in zip(weights, alone_weights):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


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


def test_a_reused_stack_trains_and_loads_like_a_fresh_one(model, tmp_path):
    from models.stacked_lora import AdapterStack

    with stacked_adapters(model.model, LORA, SEEDS[:2]) as fresh:
        train_stacked(fresh, model.tokenizer, DOCS[:2], TRAIN)
        expected = [_weights(fresh, k) for k in range(2)]
    stack = AdapterStack.attach(model.model, LORA, slots=3)
    try:
        stack.reset(SEEDS)  # a first group of three, then a group of two in the same layers
        train_stacked(stack, model.tokenizer, DOCS, TRAIN)
        stack.reset(SEEDS[:2])
        assert stack.count == 2
        train_stacked(stack, model.tokenizer, DOCS[:2], TRAIN)
        for k in range(2):
            for a, b in zip(_weights(stack, k), expected[k]):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        folders = [stack.save(k, tmp_path / f"a{k}") for k in range(2)]
        stack.reset([0, 0, 0])
        stack.load(folders[::-1])
        for a, b in zip(_weights(stack, 0), expected[1]):
            torch.testing.assert_close(a, b)
        with pytest.raises(ValueError, match="does not fit a stack of 3"):
            stack.load(folders * 2)
    finally:
        stack.close()
    assert not any(isinstance(m, type(stack.layers[next(iter(stack.layers))])) for m in model.model.modules())


def test_an_adapter_whose_loss_blows_up_stops_alone(model):
    from models.errors import NonFiniteLossError

    with stacked_adapters(model.model, LORA, SEEDS[:2]) as stack:
        # a learning rate that only the rows of adapter 0 see would need per-adapter configs;
        # instead poison adapter 0's weights so its first loss is NaN
        with torch.no_grad():
            stack.parameters(0)[0].fill_(float("nan"))
        results = train_stacked(stack, model.tokenizer, DOCS[:2], TRAIN)
        alone_ok = results[1]
    assert isinstance(results[0], NonFiniteLossError) and "step 0" in str(results[0])
    with stacked_adapters(model.model, LORA, [SEEDS[1]]) as alone:
        (expected,) = train_stacked(alone, model.tokenizer, DOCS[1:2], TRAIN)
    assert alone_ok.steps == expected.steps
    assert alone_ok.mean_loss == pytest.approx(expected.mean_loss, rel=1e-5)


def test_bf16_base_keeps_float32_adapters(tmp_path):
    bf16 = load_model("tiny-random", home=tmp_path, device="cpu", dtype="bfloat16")
    with stacked_adapters(bf16.model, LORA, SEEDS[:2]) as stack:
        assert all(p.dtype == torch.float32 for p in stack.parameters(0))
        results = train_stacked(stack, bf16.tokenizer, DOCS[:2], TRAIN)
    assert all(torch.isfinite(torch.tensor(r.mean_loss)) for r in results)


@pytest.mark.parametrize("max_grad_norm", [None, 1e-2])  # 1e-2 clips every step
def test_one_adapter_trains_as_peft_with_torch_adamw_does(model, max_grad_norm):
    """The stack's own AdamW, clipping and routing against the plain path: peft's LoRA layers,
    torch's clip_grad_norm_, AdamW and LambdaLR (models.inner_loop.train_adapter), from the same
    initial weights."""
    from peft.tuners.lora import LoraLayer

    from models.inner_loop import fresh_adapter, train_adapter

    config = TRAIN.model_copy(update={"max_grad_norm": max_grad_norm})

    with stacked_adapters(model.model, LORA, [SEEDS[0]]) as stack:
        initial = {name: (layer.lora_A[0].clone(), layer.lora_B[0].clone()) for name, layer in stack.layers.items()}
        (ours,) = train_stacked(stack, model.tokenizer, [DOCS[1]], config)
        trained = {name: (layer.lora_A[0].clone(), layer.lora_B[0].clone()) for name, layer in stack.layers.items()}
    with fresh_adapter(model.model, LORA, seed=0) as adapted:
        layers = {
            name.removeprefix("base_model.model."): m for name, m in adapted.named_modules() if isinstance(m, LoraLayer)
        }
        assert layers.keys() == initial.keys()
        with torch.no_grad():
            for name, layer in layers.items():
                layer.lora_A["default"].weight.copy_(initial[name][0])
                layer.lora_B["default"].weight.copy_(initial[name][1])
        reference = train_adapter(adapted, model.tokenizer, DOCS[1], config)
        for name, layer in layers.items():
            torch.testing.assert_close(layer.lora_A["default"].weight, trained[name][0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(layer.lora_B["default"].weight, trained[name][1], rtol=1e-4, atol=1e-5)
    assert ours.steps == reference.steps and ours.tokens == reference.tokens
    assert ours.mean_loss == pytest.approx(reference.mean_loss, rel=1e-5)


def test_token_budget_parts_fill_packed_batches_up_to_the_budget():
    rows = [(0, [1] * 10), (1, [1] * 3), (2, [1] * 9), (3, [1] * 4), (4, [1] * 30), (5, [1] * 6)]
    parts = token_budget_parts(rows, max_tokens=20)
    # 30 alone; then longest first, each into the first batch with room: 10+9, 6+4+3
    assert [[k for k, _ in part] for part in parts] == [[4], [0, 2], [1, 3, 5]]
    assert all(sum(len(seq) for _, seq in part) <= 20 for part in parts[1:])
    assert sorted(k for part in parts for k, _ in part) == [0, 1, 2, 3, 4, 5]


def test_adapter_spans_merge_an_adapters_rows_and_need_them_grouped():
    batch = pack_sequences([[1, 2], [3, 4, 5], [6], [7, 8]])
    assert adapter_spans([0, 0, 2, 3], batch) == [(0, 0, 5), (2, 5, 6), (3, 6, 8)]
    with pytest.raises(ValueError, match="grouped by adapter"):
        adapter_spans([0, 1, 0, 3], batch)


def test_a_step_split_by_the_token_budget_trains_as_one_batch(model):
    # An adapter's rows may land in different parts. Clipping off: it acts on the step's summed
    # gradient, after every part, and its norm's round-off would add to the packing's.
    batch_of_two = TRAIN.model_copy(update={"batch_size": 2, "max_grad_norm": None})
    results = {}
    for budget in (10_000, 1):  # one batch per step; every row on its own
        config = batch_of_two.model_copy(update={"max_batch_tokens": budget})
        with stacked_adapters(model.model, LORA, SEEDS) as stack:
            trained = train_stacked(stack, model.tokenizer, DOCS, config)
            results[budget] = (trained, [_weights(stack, k) for k in range(3)])
    (whole, whole_weights), (split, split_weights) = results[10_000], results[1]
    for k in range(3):
        assert split[k].mean_loss == pytest.approx(whole[k].mean_loss, rel=1e-5)
        assert split[k].tokens == whole[k].tokens
        for a, b in zip(split_weights[k], whole_weights[k]):
            # Round-off of differently packed batches: Adam turns a near-zero gradient's round-off
            # into a step of up to lr (1e-2) in either direction. Nearly every weight agrees to 1 %
            # of lr; the few whose gradient was round-off (1 of 256 on an AVX-512 EPYC, at 1.5 %
            # of lr) stay within one lr.
            off = (a - b).abs() > 1e-4
            assert off.float().mean() < 0.01, f"{int(off.sum())} of {off.numel()} weights differ"
            torch.testing.assert_close(a, b, rtol=0, atol=TRAIN.learning_rate)


@pytest.mark.parametrize("row_adapter", [[0, 1, 2], [0, 0, 1, 1], [0, 0, 1, 2, 2], [0, 2, 2, 2], [2, 0, 1, 0]])
def test_every_routing_gives_each_row_its_own_adapters_output_and_gradients(row_adapter):
    """Consecutive adapters and equal groups take one bmm, other grouped batches one product
    per adapter, ungrouped ones a gather of per-row weights; all must agree with the formula."""
    from models.stacked_lora import AdapterStack, StackedLoraLinear

    torch.manual_seed(0)
    layer = StackedLoraLinear(torch.nn.Linear(8, 6, bias=False), rank=2, alpha=4, dropout=0.0, slots=3)
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    x = torch.randn(len(row_adapter), 5, 8, requires_grad=True)
    AdapterStack(None, {"layer": layer}, LORA, slots=3, frozen=[]).route(torch.tensor(row_adapter))
    out = layer(x)
    (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
    got = (out.detach(), x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone())

    x.grad, layer.lora_A.grad, layer.lora_B.grad = None, None, None
    expected = torch.stack(
        [layer.base(x[i]) + 2.0 * x[i] @ layer.lora_A[k].T @ layer.lora_B[k].T for i, k in enumerate(row_adapter)]
    )
    (expected * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
    for a, b in zip(got, (expected.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("row_adapter", [[0, 0, 1, 2, 2], [1, 1, 2], [0, 2, 2, 2], [1]])
def test_a_decoding_step_gives_each_row_its_own_adapters_output(row_adapter):
    """One token per row without gradients (generation after rows have left) takes every
    adapter's products for every row, each row's own kept: the formula, adapters missing or not."""
    from models.stacked_lora import AdapterStack, StackedLoraLinear

    torch.manual_seed(0)
    layer = StackedLoraLinear(torch.nn.Linear(8, 6, bias=False), rank=2, alpha=4, dropout=0.0, slots=3)
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    x = torch.randn(len(row_adapter), 1, 8)
    AdapterStack(None, {"layer": layer}, LORA, slots=3, frozen=[]).route(torch.tensor(row_adapter))
    with torch.no_grad():
        out = layer(x)
        expected = torch.stack(
            [layer.base(x[i]) + 2.0 * x[i] @ layer.lora_A[k].T @ layer.lora_B[k].T for i, k in enumerate(row_adapter)]
        )
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "counts, batch_size, expected",
    [
        ([5, 5, 5, 5, 5, 5, 5], 32, [(0, 6), (6, 7)]),  # six adapters' questions per generation
        ([2, 40, 3], 32, [(0, 1), (1, 2), (2, 3)]),  # more than a generation's rows: alone
        ([1, 1], 8, [(0, 2)]),
        ([], 8, []),
    ],
)
def test_adapter_chunks_fill_generations(counts, batch_size, expected):
    from models.stacked_lora import adapter_chunks

    assert adapter_chunks(counts, batch_size) == expected


@pytest.mark.parametrize(
    "counts, batch_size, expected",
    [
        ([5] * 10, 32, [(0, 30), (30, 50)]),  # whole adapters: equal groups in each batch
        ([4, 6, 5, 5, 7, 3], 32, [(0, 30)]),
        ([40, 2], 32, [(0, 32), (32, 42)]),  # a group larger than a batch is split
        ([5, 5], 5, [(0, 5), (5, 10)]),
        ([], 32, []),
    ],
)
def test_row_batches_cut_between_adapters(counts, batch_size, expected):
    from models.stacked_lora import row_batches

    assert row_batches(counts, batch_size) == expected


@pytest.mark.parametrize(
    "spans",
    [
        [(0, 0, 4), (1, 4, 11), (2, 11, 13)],  # training's case: consecutive adapters cover the row
        [(1, 0, 6), (2, 6, 13)],  # adapter 0 unused: its gradient is zero
        [(0, 0, 3), (2, 3, 13)],
        [(2, 0, 13)],
        [(0, 2, 5), (1, 9, 13)],  # tokens outside any span get no adapter
        [(1, 0, 6), (2, 6, 9)],
    ],
)
@pytest.mark.parametrize("base", ["float32", "bfloat16 with bias", "float32 with LoRA dropout"])
def test_every_packed_routing_gives_each_span_its_own_adapters_output_and_gradients(spans, base):
    """The base layer and each span's adapter in one function, against the formula token by
    token: outputs, and the gradients of the input and of every adapter's weights. A bf16 base
    (with a bias, as Qwen's q, k and v have) keeps float32 adapters; with LoRA dropout the
    adapters see the dropped input and the base the input as it is."""
    from models.stacked_lora import AdapterStack, StackedLoraLinear

    torch.manual_seed(0)
    dtype = torch.bfloat16 if "bfloat16" in base else torch.float32
    dropout = 0.5 if "dropout" in base else 0.0
    linear = torch.nn.Linear(8, 6, bias="bias" in base).to(dtype)
    layer = StackedLoraLinear(linear, rank=2, alpha=4, dropout=dropout, slots=3)
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    x = torch.randn(1, 13, 8, dtype=dtype, requires_grad=True)
    AdapterStack(None, {"layer": layer}, LORA, slots=3, frozen=[]).route_spans(spans)
    torch.manual_seed(1)
    out = layer(x)
    weights = torch.linspace(-1, 1, out.numel()).view(out.shape).to(dtype)
    (out * weights).sum().backward()
    got = (out.detach(), x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone())

    x.grad, layer.lora_A.grad, layer.lora_B.grad = None, None, None
    torch.manual_seed(1)  # the same dropout mask
    dropped = torch.nn.functional.dropout(x[0].float(), dropout) if dropout else x[0].float()
    adapter = dict.fromkeys(range(13))
    for k, start, stop in spans:
        adapter.update(dict.fromkeys(range(start, stop), k))
    expected = torch.stack(
        [
            layer.base(x[0, t]).float() + (0 if k is None else 2.0 * dropped[t] @ layer.lora_A[k].T @ layer.lora_B[k].T)
            for t, k in adapter.items()
        ]
    )[None]
    (expected * weights.float()).sum().backward()
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    for a, b in zip(got, (expected.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad)):
        torch.testing.assert_close(a.float(), b.float(), **tolerance)


def test_each_adapters_gradient_is_clipped_on_its_own():
    from models.stacked_lora import StackedAdamW

    weights = [torch.nn.Parameter(torch.zeros(3, 2, 2)), torch.nn.Parameter(torch.zeros(3, 4))]
    weights[0].grad = torch.stack([torch.full((2, 2), 3.0), torch.full((2, 2), 0.1), torch.full((2, 2), 5.0)])
    weights[1].grad = torch.stack([torch.full((4,), 4.0), torch.full((4,), 0.1), torch.full((4,), 5.0)])
    optimizer = StackedAdamW(weights, slots=2, max_grad_norm=1.0)
    assert optimizer.clip_coefficients([w.grad for w in weights]).tolist() == pytest.approx(
        [0.1, 1.0], rel=1e-5
    )  # norms 10, 0.28

    # The coefficient scales what the update sees: with one step, Adam moves each weight by lr
    # times (nearly) the sign of its gradient, so compare the first moments instead.
    optimizer.step([1e-3, 1e-3, 1e-3])
    torch.testing.assert_close(optimizer.exp_avg[0][0], torch.full((2, 2), 0.1 * 0.3))  # (1 - beta1) * 0.1 * 3
    torch.testing.assert_close(optimizer.exp_avg[1][0], torch.full((4,), 0.1 * 0.4))
    torch.testing.assert_close(optimizer.exp_avg[0][1], torch.full((2, 2), 0.1 * 0.1))  # under the limit
    assert weights[0][2].abs().sum() == 0  # beyond its slots: untouched
