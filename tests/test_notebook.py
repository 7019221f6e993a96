"""docs/notebooks/quickstart.ipynb runs top to bottom on CPU (nbclient), outputs checked.

Why a private kernelspec: the notebook names the "python3" kernel, which on a fresh
machine may be missing or may point at another interpreter (a system Python without
attnlab). The test writes a "python3" kernelspec for *this* interpreter into a temporary
directory and puts it first on JUPYTER_PATH, so the kernel is always ``sys.executable``
with this venv's packages, whatever else is installed.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "docs" / "notebooks" / "quickstart.ipynb"


def _kernel_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    """A Jupyter data dir holding kernels/python3 that starts sys.executable."""
    data_dir = tmp_path / "jupyter"
    spec_dir = data_dir / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (attnlab test)",
        "language": "python",
        # The kernel is a fresh process: CPU only, and a single host device (the test
        # session's 8 forced devices would only slow the notebook's training down).
        "env": {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return data_dir


def _committed_outputs_cleared(nb) -> None:
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, (
                f"cell {i} of {NOTEBOOK.name} has committed outputs; clear them before committing")


@pytest.mark.slow
def test_quickstart_runs(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    _committed_outputs_cleared(nb)

    data_dir = _kernel_dir(tmp_path)
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join([str(data_dir), os.environ.get("JUPYTER_PATH", "")]))
    # A private runtime dir: connection files never collide with another session's.
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    from jupyter_client.kernelspec import KernelSpecManager

    assert KernelSpecManager().get_kernel_spec("python3").argv[0] == sys.executable

    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()

    text = "\n".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                     for out in cell.outputs if out.output_type == "stream")
    # 1. the op matches jax.nn.dot_product_attention to float32 rounding
    diff = float(text.split("jax.nn.dot_product_attention| =")[1].split()[0])
    assert diff < 1e-4, text
    # 2. both mechanisms were built and reported their KV bytes
    assert "gqa:" in text and "mla:" in text and "bytes/token" in text
    # 3. training ran and the loss fell; the plot was shown inline as a PNG
    first, last = (float(x) for x in text.split("loss ")[-1].split(" -> "))
    assert last < first, text
    images = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
              if "image/png" in out.get("data", {})]
    assert images, "the loss curve was not displayed"
