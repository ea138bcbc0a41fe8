"""notebooks/foodcap_demo.ipynb executes headless (nbclient, the venv's python3 kernel) on a tiny checkpoint."""
from __future__ import annotations

import nbformat
import pytest

from conftest import REPO

NOTEBOOK = REPO / "notebooks" / "foodcap_demo.ipynb"


def _outputs(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        parts.append(out.get("text", ""))
        parts += [str(v) for k, v in out.get("data", {}).items() if k.startswith("text/")]
    return "\n".join(parts)


def test_notebook_executes_on_a_tiny_checkpoint(tmp_path, monkeypatch, tiny_model_factory, artifacts_dir):
    nbclient = pytest.importorskip("nbclient")
    from foodcap.checkpoint import save_checkpoint

    checkpoint = save_checkpoint(tiny_model_factory("mlp"), tmp_path / "tiny_checkpoint")
    monkeypatch.setenv("FOODCAP_CHECKPOINT", str(checkpoint))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("FOODCAP_MAX_NEW_TOKENS", "16")  # an untrained model never stops early: keep it short
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError, with the failing cell's traceback, on any error
    nbformat.write(nb, artifacts_dir / "foodcap_demo.executed.ipynb")

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "tiny_checkpoint" in _outputs(code[1]) and "6 photos" in _outputs(code[1])
    grid = [o for o in code[2].outputs if "image/png" in o.get("data", {})]
    assert len(grid) == 1, "the caption grid is drawn"
    table = _outputs(code[3])
    for column in ("temperature 1.0", "temperature 0.1", "beam search", "greedy"):
        assert column in table
    for photo in ("inf1.jpg", "inf4.jpg", "scone.jpg"):
        assert photo in table
