"""notebooks/quickstart.ipynb runs top to bottom through the Python API and shows the plot."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

HERE = os.path.dirname(__file__)


@pytest.mark.slow  # ~2 min: the notebook trains the three steps through the Python API
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    notebook = nbformat.read(os.path.join(HERE, "..", "notebooks", "quickstart.ipynb"), as_version=4)
    monkeypatch.setenv("JAXRLHF_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # one device, as on a laptop
    monkeypatch.setenv("PYTHONPATH", os.path.abspath(os.path.join(HERE, "..")))
    NotebookClient(
        notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the plot is shown
    assert os.path.exists(tmp_path / "runs" / "quickstart" / "ppo" / "actor" / "model.safetensors")
