"""Results in a real Jupyter kernel: figures and views show without any setup cell."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_plot_shows_an_image_in_a_fresh_kernel(monkeypatch) -> None:
    # Every plot() returns a bare Figure (no pyplot); a fresh kernel displayed it as the text
    # "<Figure size 1350x218 with 2 Axes>" until %matplotlib inline or a pyplot figure ran.
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's own default, as a user has
    cells = [
        "import mechprobe as mp\n"
        "model = mp.tiny_model()\n"
        "lens = mp.logit_lens(model, 'Hi there', positions='all', progress=False)",
        "lens.plot()",
        "lens",
    ]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute()
    figure, view = (
        {k for o in cell.outputs for k in o.get("data", {})} for cell in notebook.cells[1:]
    )
    assert "image/png" in figure, notebook.cells[1].outputs
    assert "text/html" in view
