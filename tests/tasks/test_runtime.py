"""What a worker process keeps between tasks, and what it gives back."""

import sys

import psutil
import pytest
import torch

from tasks.runtime import release_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_tensor_memory_goes_back_to_the_os():
    process = psutil.Process()
    baseline = process.memory_info().rss
    # Many small tensors, as an inner loop's activations are: they live on the heap. A small tensor
    # kept alive every so often pins the heap, as a model's long-lived objects do, so glibc cannot
    # give the freed space back by itself (it only trims the heap's top).
    tensors, pins = [], []
    for i in range(6_000):  # ~380 MB
        tensors.append(torch.ones(16_000))
        if i % 50 == 0:
            pins.append(torch.ones(16))
    grown = process.memory_info().rss - baseline
    del tensors
    release_freed_memory()
    kept = process.memory_info().rss - baseline
    assert grown > 300 * 2**20
    assert kept < 64 * 2**20, f"{kept / 2**20:.0f} MB of {grown / 2**20:.0f} MB kept"


def test_a_new_policy_frees_the_previous_model_and_its_adapters(tmp_path, monkeypatch):
    """One model at a time: switching policy frees the last one, LoRA layers and all, before
    the new one loads (their reference cycles would otherwise keep both resident)."""
    import gc
    import weakref

    from models.base_model import resolve_model
    from models.config import LoraConfig, ModelConfig
    from tasks import runtime
    from tasks.records import PolicyRef

    monkeypatch.setattr(runtime, "_models", type(runtime._models)())
    monkeypatch.setattr(runtime, "_slots", {})
    resolved = resolve_model("tiny-random", tmp_path)
    config = ModelConfig(name="tiny-random", device="cpu", dtype="float32")
    first = PolicyRef(name="base", path=str(resolved.path), digest=resolved.digest)
    second = PolicyRef(name="iteration-1", path=str(resolved.path), digest="another")
    gc.disable()  # only the eviction may collect
    try:
        with runtime.use_model(first, config) as loaded:
            runtime.adapter_lanes(loaded, LoraConfig(rank=2, alpha=4), slots=2, lanes=2)
            old = weakref.ref(loaded.model)
            del loaded
        with runtime.use_model(second, config):
            assert old() is None
            assert list(runtime._models) == [(second.path, "another", "cpu", "float32")]
    finally:
        gc.enable()
