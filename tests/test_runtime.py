"""What a worker process keeps between tasks, and what it gives back."""

import sys

import psutil
import pytest
import torch

from tasks.runtime import release_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_tensor_memory_goes_back_to_the_os():
    process = psutil.Process()
    # Many small tensors, as an inner loop's activations are: they live on the heap, which glibc
    # keeps after they are freed.
    tensors = [torch.ones(16_000) for _ in range(6_000)]  # ~380 MB
    del tensors
    before = process.memory_info().rss
    release_freed_memory()
    after = process.memory_info().rss
    assert before - after > 100 * 2**20, f"{(before - after) / 2**20:.0f} MB given back"
