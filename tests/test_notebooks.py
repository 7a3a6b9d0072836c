"""The colab/ notebooks: committed clean (default run), and executed top to bottom (`notebook`).

    python -m pytest -m notebook tests/test_notebooks.py -q    # needs pip install -e ".[notebook]"

Execution runs every notebook in colab/ with TOKENIZERS_JAX_TINY=1 (the notebooks' first cell
reads it) in a fresh kernel, in a temporary directory; the executed copy is written there, never
into colab/. The default run deselects these tests (pyproject addopts); .ci/run runs them as a
separate step after the default suite.
"""

import glob
import json
import os
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colab", "*.ipynb")))
NOTEBOOK_IDS = [os.path.basename(path) for path in NOTEBOOKS]
CELL_TIMEOUT_SECONDS = 900


def _code_cells(path):
    with open(path) as f:
        notebook = json.load(f)
    return [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]


def test_the_notebooks_are_there():
    assert {"flowmo_reconstruct.ipynb", "detailflow_coarse_to_fine.ipynb",
            "generate.ipynb"} <= set(NOTEBOOK_IDS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NOTEBOOK_IDS)
def test_committed_without_outputs_and_with_a_tiny_flag_first(path):
    cells = _code_cells(path)
    for index, cell in enumerate(cells):
        assert cell["outputs"] == [] and cell["execution_count"] is None, (
            f"code cell {index} of {os.path.basename(path)} holds outputs: clear them before "
            "committing (jupyter nbconvert --clear-output --inplace NOTEBOOK)")
    flags = "".join(cells[0]["source"])
    assert "TINY = True" in flags and 'os.environ["TOKENIZERS_JAX_TINY"]' in flags, (
        "the first code cell must be the settings cell: TINY = True, overridden by "
        "$TOKENIZERS_JAX_TINY (CI sets it)")


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=NOTEBOOK_IDS)
def test_notebook_runs_top_to_bottom_with_tiny_settings(path, tmp_path, monkeypatch):
    try:
        import nbclient
        import nbformat
    except ImportError as error:  # a failure, not a skip: this is the test's whole point
        pytest.fail(f"{error}: install the notebook extra, pip install -e '.[notebook]'")
    monkeypatch.setenv("TOKENIZERS_JAX_TINY", "1")
    monkeypatch.setenv("TOKENIZERS_JAX_RUN_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # The kernel imports this checkout (as the test process does) and no user release.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    for name in ("TOKENIZERS_JAX_FLOWMO_RELEASE", "TOKENIZERS_JAX_DETAILFLOW_RELEASE",
                 "TOKENIZERS_JAX_DETAILFLOW_GPT_RELEASE"):
        monkeypatch.delenv(name, raising=False)
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_SECONDS, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    try:
        client.execute()
    finally:
        nbformat.write(notebook, str(tmp_path / os.path.basename(path)))
    seconds = time.perf_counter() - start
    print(f"{os.path.basename(path)} executed in {seconds:.0f} s")
    errors = [output for cell in notebook.cells if cell.cell_type == "code"
              for output in cell.get("outputs", []) if output.get("output_type") == "error"]
    assert not errors, errors
    images = [output for cell in notebook.cells if cell.cell_type == "code"
              for output in cell.get("outputs", []) if "image/png" in output.get("data", {})]
    assert images, "the notebook showed no figures"
