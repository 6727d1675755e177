"""notebooks/*.ipynb run top to bottom offline (nbclient, a fresh kernel each) without an error: a cell that raises
fails the test with its traceback. The committed notebooks keep the outputs of a run made here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the test extra installs nbformat / nbclient / ipykernel")
from nbclient import NotebookClient  # noqa: E402

pytestmark = pytest.mark.notebook  # after the default run, one at a time: the README's test command
NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


def test_the_three_notebooks_exist():
    assert {p.stem for p in NOTEBOOKS} >= {"quickstart", "finetune", "sharding"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    book = nbformat.read(path, as_version=4)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # sharding.ipynb sets its own device count
    client = NotebookClient(book, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env)  # raises CellExecutionError naming the cell
    errors = [o for c in book.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors
