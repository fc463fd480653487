"""Figures: written atomically, deterministic bytes, no timestamps, clear errors."""

from __future__ import annotations

import pytest
import torch

from headscore.core.errors import HeadscoreError
from headscore.core.plots import figure_format, head_heatmap


def test_heatmap_png_is_deterministic(tmp_path):
    matrix = torch.arange(30 * 9, dtype=torch.float64).reshape(30, 9) / 270
    head_heatmap(matrix, tmp_path / "a.png", title="scores", cbar_label="share")
    head_heatmap(matrix, tmp_path / "b.png", title="scores", cbar_label="share")
    data = (tmp_path / "a.png").read_bytes()
    assert data.startswith(b"\x89PNG") and data == (tmp_path / "b.png").read_bytes()
    assert b"Software" not in data  # no matplotlib version stamp
    head_heatmap(matrix.flip(0), tmp_path / "c.png", title="scores")
    assert (tmp_path / "c.png").read_bytes() != data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "c.png"]  # no temp files left


def test_heatmap_svg_and_int_matrix(tmp_path):
    matrix = torch.tensor([[1, 2, 3], [4, 5, 6]], dtype=torch.int64)
    head_heatmap(matrix, tmp_path / "a.svg", title="budgets", xlabel="KV head")
    head_heatmap(matrix, tmp_path / "b.svg", title="budgets", xlabel="KV head")
    text = (tmp_path / "a.svg").read_text()
    assert "<svg" in text and "<dc:date>" not in text
    assert (tmp_path / "a.svg").read_bytes() == (tmp_path / "b.svg").read_bytes()


def test_bad_figures(tmp_path):
    with pytest.raises(HeadscoreError, match="use a .png, .svg or .pdf"):
        figure_format(tmp_path / "a.jpg")
    with pytest.raises(HeadscoreError, match="use a .png"):
        head_heatmap(torch.ones(2, 2), tmp_path / "a.txt", title="x")
    with pytest.raises(HeadscoreError, match="non-empty 2-D matrix"):
        head_heatmap(torch.ones(3), tmp_path / "a.png", title="x")
    assert list(tmp_path.iterdir()) == []
