"""The notebooks run top to bottom from a clean kernel on the shipped tiny model, and what is committed
is what `python notebooks/execute.py` wrote.

Each notebook is executed as notebooks/execute.py executes it (a fresh `python3` kernel, working
directory notebooks/), into a temporary copy: the committed files are never modified. A cell that
raises fails the test with the cell and its traceback. On a 2-core CPU the six take about two
minutes together.
"""

import importlib.util
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebooks extra: pip install -e '.[notebooks]'")
pytest.importorskip("nbclient", reason="the notebooks extra: pip install -e '.[notebooks]'")
pytest.importorskip("ipykernel", reason="the notebooks extra: pip install -e '.[notebooks]'")
pytest.importorskip("matplotlib", reason="the notebooks extra: pip install -e '.[notebooks]'")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS_DIR = ROOT / "notebooks"
NAMES = ["01_step_by_step", "02_samplers_and_guidance", "03_forward_and_reverse", "04_prompts", "05_inpainting",
         "06_lora"]
TINY_MODEL = ROOT / "weights" / "tiny_sd.safetensors"
MAX_NOTEBOOK_BYTES = 2_000_000


def load_executor():
    spec = importlib.util.spec_from_file_location("notebooks_execute", NOTEBOOKS_DIR / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def test_the_notebooks_are_the_ones_execute_runs():
    assert [path.stem for path in load_executor().notebooks()] == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_the_first_code_cell_chooses_the_tiny_model(name):
    notebook = nbformat.read(NOTEBOOKS_DIR / f"{name}.ipynb", as_version=4)
    cells = code_cells(notebook)
    first = cells[0].source
    active = [line for line in first.splitlines() if "load_checkpoint(" in line and not line.lstrip().startswith("#")]
    assert active == ["model = load_checkpoint(device=DEVICE)  # the shipped tiny model: weights/tiny_sd.safetensors, 64x64 shapes"]
    assert "# model = load_checkpoint(ROOT / " in first  # the commented alternatives: SD 1.5 file, diffusers folder
    for cell in cells[1:]:
        assert "load_checkpoint(" not in cell.source, "only the first cell chooses the checkpoint"


needs_tiny_model = pytest.mark.skipif(not TINY_MODEL.exists(), reason="weights/tiny_sd.safetensors is not there yet")


@needs_tiny_model
@pytest.mark.parametrize("name", NAMES)
def test_committed_outputs_come_from_one_clean_run(name):
    path = NOTEBOOKS_DIR / f"{name}.ipynb"
    assert path.stat().st_size < MAX_NOTEBOOK_BYTES
    cells = code_cells(nbformat.read(path, as_version=4))
    # execute.py runs every cell once, in order, in a new kernel: execution counts 1, 2, 3, ...
    assert [cell.execution_count for cell in cells] == list(range(1, len(cells) + 1))
    for cell in cells:
        assert not any(output.output_type == "error" for output in cell.outputs), cell.source[:80]


@needs_tiny_model
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_from_a_clean_kernel(name, tmp_path):
    executor = load_executor()
    # Raises nbclient's CellExecutionError, naming the cell and its traceback, if any cell fails.
    notebook = executor.execute(NOTEBOOKS_DIR / f"{name}.ipynb")
    nbformat.write(notebook, tmp_path / f"{name}.ipynb")
    for cell in code_cells(notebook):
        assert not any(output.output_type == "error" for output in cell.outputs), cell.source[:80]
