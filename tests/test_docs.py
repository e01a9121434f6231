"""The documentation's code runs: the quickstart notebook (shortened) and the coupling page's example (the
interventions page's example is run by test_interventions)."""

import json
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


def code_of_notebook(path: Path) -> str:
    nb = json.loads(path.read_text())
    return "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path):
    """The notebook runs top to bottom in a Jupyter kernel (its training shortened in memory to 60 steps)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(DOCS / "quickstart.ipynb", as_version=4)
    train = [c for c in nb.cells if c.cell_type == "code" and "steps=3000" in c.source]
    assert len(train) == 1  # the shortening below must take effect
    train[0].source = train[0].source.replace("steps=3000", "steps=60")
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert any(o.get("output_type") in ("display_data", "execute_result") and "image/png" in o.get("data", {})
               for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_committed_quickstart_notebook_has_outputs_figures_and_a_grokked_model():
    nb = json.loads((DOCS / "quickstart.ipynb").read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c.get("execution_count") and c.get("outputs") for c in code), "commit the notebook executed"
    outputs = [o for c in code for o in c["outputs"]]
    assert not [o for o in outputs if o["output_type"] == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3
    stderr = "".join("".join(o.get("text", "")) for o in outputs if o.get("name") == "stderr")
    assert "TqdmWarning" not in stderr and "IProgress" not in stderr
    last = "".join("".join(o.get("text", "")) for o in code[-1]["outputs"])
    acc = float(re.search(r"test accuracy: ([0-9.]+)", last).group(1))
    assert acc >= 0.98 and "✓" in last and "✗" not in last


def test_coupling_page_example_runs():
    text = (DOCS / "coupling.md").read_text()
    block = re.search(r"## On your own model\n\n```python\n(.*?)```", text, re.S)
    assert block is not None
    exec(compile(block.group(1), "coupling.md", "exec"), {})

