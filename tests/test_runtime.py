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
