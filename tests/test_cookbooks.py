"""Every notebook in ``cookbooks/`` executes top to bottom, and is stored without outputs.

Generic over the folder: a new ``cookbooks/*.ipynb`` is picked up with no change here.
Each notebook runs in a fresh kernel with ``cookbooks/`` as its working directory and
``HF_HUB_OFFLINE=1``. The whole run has a deadline: ``DEFAULT_TIMEOUT_S``, or the
notebook's own ``metadata["persona_judge"]["timeout_s"]`` (set it when adding a notebook that
needs longer; keep notebooks small, CI runs them on 2 cores).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

COOKBOOKS = Path(__file__).resolve().parents[1] / "cookbooks"
NOTEBOOKS = sorted(COOKBOOKS.glob("*.ipynb"))
DEFAULT_TIMEOUT_S = 300


def _ids(path: Path) -> str:
    return path.name


def test_cookbooks_folder_has_notebooks() -> None:
    assert NOTEBOOKS, f"no notebooks found in {COOKBOOKS}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_notebook_is_stored_without_outputs(path: Path) -> None:
    notebook = json.loads(path.read_text(encoding="utf-8"))
    dirty = [
        index
        for index, cell in enumerate(notebook["cells"])
        if cell["cell_type"] == "code" and (cell.get("outputs") or cell.get("execution_count"))
    ]
    assert not dirty, (
        f"{path.name}: code cells {dirty} hold outputs; clear them before committing "
        f"(jupyter nbconvert --clear-output --inplace {path.name})"
    )


@pytest.mark.real_model
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_notebook_executes(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the kernel inherits the environment
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    notebook = nbformat.read(path, as_version=4)
    settings = notebook.metadata.get("persona_judge", {})
    deadline = float(settings.get("timeout_s", DEFAULT_TIMEOUT_S))
    client = nbclient.NotebookClient(
        notebook,
        timeout=int(deadline),  # per cell; the whole notebook has the same deadline below
        kernel_name="python3",
        resources={"metadata": {"path": str(COOKBOOKS)}},
    )

    async def run() -> None:
        await asyncio.wait_for(client.async_execute(), timeout=deadline)

    try:
        asyncio.run(run())
    except (TimeoutError, asyncio.TimeoutError):
        pytest.fail(
            f"{path.name} did not finish within {deadline:.0f} s; shrink its token budgets or "
            "raise metadata.persona_judge.timeout_s"
        )
    except nbclient.exceptions.CellExecutionError as exc:
        pytest.fail(f"{path.name} failed:\n{exc}")
