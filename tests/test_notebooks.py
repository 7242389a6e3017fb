"""Every notebook runs top to bottom against a tiny pipeline workdir (so they never rot)."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

from tests.helpers import REPO

NOTEBOOKS = sorted(f for f in os.listdir(os.path.join(REPO, "notebooks")) if f.endswith(".ipynb"))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tiny_pipeline_dir, monkeypatch):
  monkeypatch.setenv("GPT_JAX_WORKDIR", tiny_pipeline_dir)
  nb = nbformat.read(os.path.join(REPO, "notebooks", name), as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": REPO}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  assert not [o for o in outputs if o.get("output_type") == "error"]
  assert any(o.get("output_type") == "stream" for o in outputs)
