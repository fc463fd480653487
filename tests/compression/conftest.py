import pytest


@pytest.fixture(params=["buckets", "flex"])
def kernel(request, monkeypatch):
    """Both prompt-part kernels of the decode attention (flex runs eagerly on CPU: the mask and score mods the
    compiled CUDA kernel runs, over every entry)."""
    monkeypatch.setenv("HEADSCORE_DECODE_KERNEL", request.param)
    return request.param
