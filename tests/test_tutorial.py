"""The tutorial (docs/tutorial.py, a jupytext script) runs as a notebook on the embedded SmolLM2."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.integration
def test_tutorial_executes_as_a_notebook_and_draws_its_figures(monkeypatch) -> None:
    jupytext = pytest.importorskip("jupytext")
    nbclient = pytest.importorskip("nbclient")
    notebook = jupytext.read(ROOT / "docs" / "tutorial.py")
    # The small setting (fewer items and iterations) keeps CI within minutes; the kernel inherits
    # the environment, progress bars included (off under the tests).
    monkeypatch.setenv("MECHPROBE_TUTORIAL_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    client = nbclient.NotebookClient(
        notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute()  # raises CellExecutionError naming the cell on any exception
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    plots = [cell for cell in code if ".plot(" in cell.source]
    assert plots, "the tutorial draws figures"
    for cell in plots:
        kinds = {kind for out in cell.outputs for kind in out.get("data", {})}
        assert "image/png" in kinds, f"no figure from:\n{cell.source}"
    # Notebook faces: the results display their summary tables, not their arrays.
    html = [out for cell in code for out in cell.outputs if "text/html" in out.get("data", {})]
    assert len(html) >= 5
    lens_out = next(cell for cell in code if cell.source.rstrip().endswith("\nlens"))
    assert "Paris" in str(lens_out.outputs)
