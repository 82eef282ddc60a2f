import pytest
import torch

from models.self_edit import (
    SELF_EDIT_PROMPTS,
    SelfEdit,
    parse_self_edit,
    render_prompt,
    sample_self_edits,
    sample_self_edits_batch,
    self_edit_prompt,
    training_documents,
)

PARSE_CASES = [
    (
        "numbered",
        "1. The guild was founded in 1873.\n2) It had 412 members.",
        ("The guild was founded in 1873.", "It had 412 members."),
    ),
    (
        "bullets and blanks",
        "- First implication here.\n\n* Second implication here.\n• Third one, too.",
        ("First implication here.", "Second implication here.", "Third one, too."),
    ),
    (
        "lettered",
        "a. Kelthrop made clocks.\n(b) Sallowmere is a town.",
        ("Kelthrop made clocks.", "Sallowmere is a town."),
    ),
    ("year at line start is kept", "1873 was the founding year.", ("1873 was the founding year.",)),
    ("empty", "", ()),
    ("only whitespace", "   \n\t\n", ()),
    ("garbled", "!!!!\n----\n12345678\n\x00\x01\x02", ()),
    ("fragments dropped", "ok\nThis line is long enough.", ("This line is long enough.",)),
    ("duplicates once", "Same line again.\nSame line again.", ("Same line again.",)),
    ("control characters", "The lantern\x07 weighs 37 kg.", ("The lantern  weighs 37 kg.",)),
]


@pytest.mark.parametrize("name, text, expected", PARSE_CASES, ids=[c[0] for c in PARSE_CASES])
def test_parse_self_edit(name, text, expected):
    assert parse_self_edit(text) == expected


def test_parse_caps_the_number_of_documents():
    text = "\n".join(f"Implication number {i} is here." for i in range(30))
    assert len(parse_self_edit(text, max_documents=5)) == 5


def test_training_documents_prefix_the_title_and_append_the_passage():
    edit = SelfEdit("1. A fact.\n", ("A fact about it.",))
    assert training_documents(edit, "Title", "The passage.") == ["Title\nA fact about it.", "Title\nThe passage."]
    assert training_documents(None, "Title", "The passage.") == ["Title\nThe passage."]
    empty = SelfEdit("???", ())
    assert empty.is_empty and training_documents(empty, "T", "P") == ["T\nP"]


@pytest.mark.parametrize("kind", sorted(SELF_EDIT_PROMPTS))
def test_prompts_hold_the_passage(kind):
    prompt = self_edit_prompt(kind, "Kelthrop", "Orvanne Kelthrop made clocks.")
    assert "Kelthrop\nOrvanne Kelthrop made clocks." in prompt


def test_implications_prompt_is_the_papers():
    assert self_edit_prompt("implications", "T", "C") == (
        "Let's read the following passage and produce a list of implications derived directly "
        "or indirectly from the content.\n\nPassage:\nT\nC\n\nImplications:\n"
    )


def test_unknown_prompt():
    with pytest.raises(ValueError, match="unknown self-edit prompt 'poem'"):
        self_edit_prompt("poem", "T", "C")


def test_render_prompt_uses_the_chat_template_when_there_is_one(tiny):
    rendered = render_prompt(tiny.tokenizer, "Hello")
    assert rendered == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    template = tiny.tokenizer.chat_template
    tiny.tokenizer.chat_template = None
    try:
        assert render_prompt(tiny.tokenizer, "Hello") == "Hello"
    finally:
        tiny.tokenizer.chat_template = template


def test_k_samples_in_one_generate_call_deterministic_by_seed(tiny, monkeypatch):
    calls = []
    real = tiny.model.generate
    monkeypatch.setattr(tiny.model, "generate", lambda **kw: calls.append(kw) or real(**kw))
    kwargs = dict(title="T", context="Orvanne Kelthrop made clocks.", num_samples=4, max_new_tokens=12)
    first = sample_self_edits(tiny.model, tiny.tokenizer, seed=1, **kwargs)
    assert len(calls) == 1 and calls[0]["input_ids"].shape[0] == 4
    assert len(first) == 4 and all(isinstance(e, SelfEdit) for e in first)
    assert sample_self_edits(tiny.model, tiny.tokenizer, seed=1, **kwargs) == first
    assert sample_self_edits(tiny.model, tiny.tokenizer, seed=2, **kwargs) != first


def test_passages_sampled_together_get_what_each_gets_alone(tiny, monkeypatch):
    calls = []
    real = tiny.model.generate
    monkeypatch.setattr(tiny.model, "generate", lambda **kw: calls.append(kw) or real(**kw))
    passages = [
        ("T", "Orvanne Kelthrop made clocks."),
        ("Sallowmere", "The lantern weighs 37 kilograms and hangs high."),
    ]
    kwargs = dict(num_samples=3, max_new_tokens=12)
    together = sample_self_edits_batch(tiny.model, tiny.tokenizer, passages, [1, 2], **kwargs)
    assert len(calls) == 1 and calls[0]["input_ids"].shape[0] == 6
    assert [len(edits) for edits in together] == [3, 3]
    # Each passage's samples come from its own seed, whatever else is in the batch.
    for (title, context), seed, edits in zip(passages, [1, 2], together):
        assert sample_self_edits(tiny.model, tiny.tokenizer, title=title, context=context, seed=seed, **kwargs) == edits
    assert sample_self_edits_batch(tiny.model, tiny.tokenizer, passages[::-1], [2, 1], **kwargs) == together[::-1]
    # The K samples of a passage differ from each other, and a new seed draws new ones.
    assert len({e.text for e in together[0]}) == 3
    assert sample_self_edits_batch(tiny.model, tiny.tokenizer, passages, [3, 2], **kwargs)[0] != together[0]


def test_row_sampler_keeps_to_top_p():
    from models.self_edit import RowSampler

    # Probabilities 0.5, 0.3, 0.15, 0.05: top-p 0.7 keeps the first two tokens only.
    scores = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(2, 1)
    generators = [torch.Generator().manual_seed(s) for s in (0, 1)]
    drawn = set()
    for _ in range(200):
        out = RowSampler(generators, temperature=1.0, top_p=0.7)(torch.zeros(2, 1, dtype=torch.long), scores.clone())
        assert (out == 0).sum(1).tolist() == [1, 1]  # one token left per row
        drawn |= set(out.argmax(1).tolist())
    assert drawn == {0, 1}


def test_answer_lines_are_generates_first_lines_with_rows_leaving_as_they_end(tiny):
    """Greedy first lines, a row dropped once it has written a newline: the same lines as
    ``model.generate`` stopping at a newline, with the rows that answered early gone."""
    import copy

    from models.inner_loop import first_line
    from models.self_edit import answer_lines

    model, tokenizer = copy.deepcopy(tiny.model), tiny.tokenizer
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"][-1]
    with torch.no_grad():  # a newline wins on about half the hidden states: rows end at different steps
        head = model.get_output_embeddings().weight
        head[newline] += head.norm(dim=1).mean() * torch.randn(
            head.shape[1], generator=torch.Generator().manual_seed(0)
        )
    prompts = [render_prompt(tokenizer, f"Question {i}: {'why ' * i}is the river wide?") for i in range(8)]
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    tokenizer.padding_side = "right"
    output = model.generate(
        **batch,
        max_new_tokens=12,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        stop_strings=["\n"],
        tokenizer=tokenizer,
    )
    expected = [
        first_line(t)
        for t in tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    ]
    left = []
    got = answer_lines(model, tokenizer, prompts, max_new_tokens=12, on_rows=lambda rows: left.append(rows.tolist()))
    assert [first_line(t) for t in got] == expected
    assert left and all(set(b) < set(a) for a, b in zip([list(range(8)), *left], left))  # fewer each time
    lengths = {len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in got}
    assert len(lengths) > 2  # rows ended at different steps
    assert answer_lines(model, tokenizer, [], max_new_tokens=4) == []


PLANS = [
    # name, self_edit_epochs, documents, epochs trained
    ("the paper's", None, ["T\nA fact.", "T\nB fact.", "T\nThe passage."], 3),
    ("the self-edit once", 1, ["T\nA fact.", "T\nB fact."] + ["T\nThe passage."] * 3, 1),
    ("the self-edit twice", 2, ["T\nA fact.", "T\nB fact."] * 2 + ["T\nThe passage."] * 3, 1),
]


@pytest.mark.parametrize("name, self_edit_epochs, documents, epochs", PLANS, ids=[p[0] for p in PLANS])
def test_inner_loop_plan_gives_the_passage_its_epochs(name, self_edit_epochs, documents, epochs):
    from models.config import InnerLoopConfig
    from models.self_edit import SelfEdit, inner_loop_plan

    config = InnerLoopConfig(epochs=3, self_edit_epochs=self_edit_epochs)
    planned, plan = inner_loop_plan(SelfEdit("x", ("A fact.", "B fact.")), "T", "The passage.", config)
    assert (planned, plan.epochs) == (documents, epochs)
    # Passage only trains the same steps either way: the passage, once per epoch.
    alone, alone_plan = inner_loop_plan(None, "T", "The passage.", config)
    assert len(alone) * alone_plan.epochs == 3


def test_a_generation_cut_by_its_budget_loses_its_last_line():
    text = "1. The bridge opened in 1873.\n2. It was built by Orvanne Kelthrop in 18"
    assert parse_self_edit(text) == ("The bridge opened in 1873.", "It was built by Orvanne Kelthrop in 18")
    assert parse_self_edit(text, complete=False) == ("The bridge opened in 1873.",)
    assert parse_self_edit(text + "\n", complete=False) == parse_self_edit(text)  # the line had ended
    assert parse_self_edit("One unfinished line of text", complete=False) == ("One unfinished line of text",)
