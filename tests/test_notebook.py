"""notebooks/explore.ipynb runs top to bottom against the demo output (nbclient); a failing cell fails the test."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO
from curate.query import columns, connect

NOTEBOOK = REPO / "notebooks" / "explore.ipynb"


def ensure_kernel() -> str:
    """The python3 kernel spec of this interpreter; installed into the venv (--sys-prefix) when missing."""
    from jupyter_client.kernelspec import KernelSpecManager

    if "python3" not in KernelSpecManager().find_kernel_specs():
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--sys-prefix"], check=True,
                       capture_output=True, timeout=120)
    return "python3"


@pytest.mark.slow
def test_explore_notebook_runs_on_the_demo_output(demo_run_local, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    refiltered = tmp_path / "refiltered"
    monkeypatch.setenv("CURATE_OUTPUT", str(demo_run_local.output))  # the notebook's parameter cell reads these
    monkeypatch.setenv("CURATE_REFILTERED", str(refiltered))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert "parameters" in nb.cells[1].metadata.get("tags", [])
    NotebookClient(nb, timeout=180, kernel_name=ensure_kernel(),
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()  # raises on a failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert "rows in:" in text and "kept rows; report:" in text
    assert "recall@10" in text and "rows like " in text  # the search section (index + search of the subset)
    assert (refiltered / "index" / "kept.image.faiss").exists()
    assert html.count("<svg") >= 2 and "data:image/jpeg;base64," in html  # distributions and sample pages
    assert (refiltered / "report.html").exists() and list((refiltered / "data").glob("*.parquet"))
    # the stored model columns decide which threshold cells ran
    con = connect(demo_run_local.output)
    cols = set(columns(con))
    con.close()
    assert ("clip_score >=" in text) == ("clip_score" in cols)
    assert ("caption_perplexity <=" in text) == ("caption_perplexity" in cols)
