"""Every notebook in notebooks/ runs top to bottom (at toy size) and is stored without outputs."""

import importlib.util
import subprocess
from pathlib import Path

import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_the_notebooks_are_there():
    assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "nnx.ipynb", "plain_jax.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell {i} of {path.name} has outputs"
            assert cell.execution_count is None, f"cell {i} of {path.name} has an execution count"


def code_cells(path):
    return [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_has_the_setup_cell_and_reports_the_backend(path):
    code = code_cells(path)
    # one setup cell for all notebooks, so that a fix reaches every one of them
    assert code[0] == code_cells(NOTEBOOKS[0])[0]
    assert 'LORAX_FN_SOURCE = os.environ.get("LORAX_FN_SOURCE", "")' in code[0]
    assert "jax.default_backend()" in code[1] and "jax.devices()" in code[1]
    assert "LORAX_FN_SMOKE" in code[1]


# ----------------------------------------------------------------- the setup cell's choices
class Pip:
    """Stands in for subprocess.run: records the pip command instead of installing."""

    def __init__(self):
        self.calls = []

    def __call__(self, cmd, check=False, **kwargs):
        assert check, "a failed install must stop the notebook"
        self.calls.append(cmd)


def run_setup_cell(monkeypatch, cwd, installed, source=None):
    """Run the first code cell as a kernel would, with pip and the import system stubbed."""
    pip = Pip()
    monkeypatch.setattr(subprocess, "run", pip)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (real_find_spec(name, *a) if installed or name != "lorax_fn" else None))
    if source is None:
        monkeypatch.delenv("LORAX_FN_SOURCE", raising=False)
    else:
        monkeypatch.setenv("LORAX_FN_SOURCE", source)
    monkeypatch.chdir(cwd)
    exec(compile(code_cells(NOTEBOOKS[0])[0], "setup cell", "exec"), {"__name__": "__main__"})
    return [cmd[-1] for cmd in pip.calls]


def test_setup_cell_does_nothing_where_lorax_fn_is_installed(monkeypatch, tmp_path):
    assert run_setup_cell(monkeypatch, tmp_path, installed=True) == []
    assert run_setup_cell(monkeypatch, tmp_path, installed=True, source="anything") == []


def test_setup_cell_installs_from_the_checkout_it_sits_in(monkeypatch):
    got = run_setup_cell(monkeypatch, ROOT / "notebooks", installed=False)
    assert got == [f"lorax_fn[examples] @ {ROOT.as_uri()}"]


def test_setup_cell_installs_from_lorax_fn_source(monkeypatch, tmp_path):
    checkout = tmp_path / "elsewhere"
    checkout.mkdir()
    assert run_setup_cell(monkeypatch, tmp_path, installed=False, source=str(checkout)) == \
        [f"lorax_fn[examples] @ {checkout.as_uri()}"]
    # anything that is not a path goes to pip as it is (a git URL with pip's git+ prefix)
    url = "git+ssh://git@host.invalid/lorax_fn.git"
    assert run_setup_cell(monkeypatch, tmp_path, installed=False, source=url) == [f"lorax_fn[examples] @ {url}"]


def test_setup_cell_outside_a_checkout_without_a_source_says_what_to_set(monkeypatch, tmp_path):
    with pytest.raises(RuntimeError, match="set LORAX_FN_SOURCE") as info:
        run_setup_cell(monkeypatch, tmp_path, installed=False)
    assert "git URL" in str(info.value) and "path of a checkout" in str(info.value)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
    # the kernel inherits this environment: toy sizes, and no display for matplotlib
    monkeypatch.setenv("LORAX_FN_SMOKE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                                     resources={"metadata": {"path": str(tmp_path)}})
    # raises CellExecutionError, naming the cell and the traceback, on the first failing cell
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors
