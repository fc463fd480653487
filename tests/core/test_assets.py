"""Default assets: the GGUF is converted once and cached; model specs resolve or fail clearly."""

from __future__ import annotations

import pytest
import torch

from headscore.core.assets import cache_dir, default_haystack_dir, resolve_model
from headscore.core.errors import HeadscoreError
from headscore.core.model import Geometry, load_geometry, resolve_device, resolve_dtype


def test_cache_dir_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HEADSCORE_CACHE", str(tmp_path / "hs"))
    assert cache_dir() == tmp_path / "hs"
    monkeypatch.delenv("HEADSCORE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "headscore"


@pytest.mark.slow
def test_alias_converts_once_and_reuses_the_cache():
    first = resolve_model("smollm2-135m")
    marker = (cache_dir() / "models")
    stamp = (marker / first.split("/")[-1] / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("smollm2-135m") == first
    assert (marker / first.split("/")[-1] / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in marker.iterdir() if p.name.startswith(".")]  # no leftover temp folders


def test_default_model_geometry():
    assert load_geometry("smollm2-135m") == Geometry(layers=30, query_heads=9, kv_heads=3, head_dim=64,
                                                     max_context=8192)
    assert Geometry(30, 9, 3, 64).group_size == 3


def test_model_specs(tmp_path):
    assert resolve_model("meta-llama/Meta-Llama-3-8B-Instruct") == "meta-llama/Meta-Llama-3-8B-Instruct"
    with pytest.raises(HeadscoreError, match="no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(HeadscoreError, match="not found"):
        resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(HeadscoreError, match="unknown model"):
        resolve_model("./not/a/model")


def test_default_haystack_is_installed():
    assert len(list(default_haystack_dir().glob("*.txt"))) >= 40


def test_device_auto_resolves_to_cuda_when_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device(None) == "cpu"
    assert resolve_dtype(None, "auto") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda" and resolve_dtype(None, "auto") == torch.bfloat16
    assert resolve_device("cuda:1") == "cuda:1" and resolve_device("cpu") == "cpu"
