"""The code of docs/guides/migrating.md runs: every file in docs/snippets/.

The guide shows these files next to the code they replace (Coix, NumPyro SVI,
Pyro, PyTorch); Pyro and PyTorch are not dependencies, so only their
combinators (and NumPyro) counterparts are files here and run.
"""

import pathlib
import runpy

import pytest

SNIPPETS = sorted(
    (pathlib.Path(__file__).resolve().parent.parent / "docs" / "snippets").glob("*.py")
)


def test_there_are_snippets():
    assert len(SNIPPETS) >= 4


@pytest.mark.parametrize("path", SNIPPETS, ids=lambda p: p.stem)
def test_snippet_runs(path, capsys):
    runpy.run_path(str(path), run_name="__main__")
    assert capsys.readouterr().out.strip(), f"{path.name} printed nothing"
