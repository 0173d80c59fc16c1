"""Execute the notebooks from a clean kernel and write them back with their outputs.

    python notebooks/execute.py                        # every notebook in notebooks/
    python notebooks/execute.py 02_samplers_and_guidance.ipynb

Each notebook runs top to bottom in a fresh `python3` kernel whose working directory is notebooks/,
as in Jupyter, so the outputs committed with a notebook are exactly what this execution printed
and drew. A cell that raises stops the run and the notebook on disk is left as it was.
tests/test_notebooks.py runs the same `execute` into a temporary copy.

The kernel runs PyTorch on one thread (OMP_NUM_THREADS=1, unless it is set already): the tiny
model's tensors are so small that splitting each operation between threads costs more than it
saves, and on a machine shared with other jobs two spinning threads can be ten times slower than one.

The one thing done to the outputs is what a Jupyter front end does when it shows them: consecutive
pieces of the same stream are joined, and a line rewritten with carriage returns (a progress bar)
keeps its last version, so a progress bar is stored as one line rather than one output per update.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOKS_DIR = Path(__file__).resolve().parent
CELL_TIMEOUT_S = 600


def notebooks() -> list[Path]:
    return sorted(NOTEBOOKS_DIR.glob("[0-9]*.ipynb"))


def execute(path: Path) -> nbformat.NotebookNode:
    """Run the notebook at `path` in a new kernel; return it with its outputs (the file is not touched)."""
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(NOTEBOOKS_DIR)}},  # the kernel's working directory
        record_timing=False,  # no timestamps in the saved cells: a re-run changes only what it printed
    )
    # execute() starts and shuts down its own kernel; it raises CellExecutionError on the first error
    client.execute(env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = coalesce_streams(cell.outputs)
    return notebook


def coalesce_streams(outputs: list) -> list:
    """Join consecutive stdout (or stderr) outputs; keep what follows the last carriage return of each line."""
    joined = []
    for output in outputs:
        previous = joined[-1] if joined else None
        if output.output_type == "stream" and previous is not None and previous.output_type == "stream" \
                and previous.name == output.name:
            previous.text += output.text
        else:
            joined.append(output)
    for output in joined:
        if output.output_type == "stream":
            output.text = "\n".join(line.rstrip("\r").rsplit("\r", 1)[-1] for line in output.text.split("\n"))
    return joined


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebooks in notebooks/ to run (default: all)")
    args = parser.parse_args(argv)
    paths = [NOTEBOOKS_DIR / Path(name).name for name in args.names] or notebooks()
    for path in paths:
        start = time.perf_counter()
        notebook = execute(path)
        nbformat.write(notebook, path)
        size_kb = path.stat().st_size / 1024
        print(f"{path.name}: {time.perf_counter() - start:.1f} s, {size_kb:.0f} KB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
