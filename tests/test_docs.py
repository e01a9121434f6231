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
def test_quickstart_notebook_runs():
    code = code_of_notebook(DOCS / "quickstart.ipynb")
    assert "steps=1500" in code  # the shortening below must take effect
    code = code.replace("steps=1500", "steps=100")
    exec(compile(code, "quickstart.ipynb", "exec"), {})


def test_coupling_page_example_runs():
    text = (DOCS / "coupling.md").read_text()
    block = re.search(r"## On your own model\n\n```python\n(.*?)```", text, re.S)
    assert block is not None
    exec(compile(block.group(1), "coupling.md", "exec"), {})

