"""Every public function and class documents itself with an example, and the example runs."""

import contextlib
import doctest
import inspect
import io
import re
import sys
import tomllib
from pathlib import Path

import pytest

import lorax_fn

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = sorted(n for n in lorax_fn.__all__
                if inspect.isfunction(getattr(lorax_fn, n)) or inspect.isclass(getattr(lorax_fn, n)))


def test_there_are_public_names_to_check():
    assert {"lorafy", "lora", "merge", "LoraWeight"} <= set(PUBLIC)


@pytest.mark.parametrize("name", PUBLIC)
def test_public_name_has_a_docstring_example_that_runs(name):
    obj = getattr(lorax_fn, name)
    # the object's own docstring: a class without one would otherwise show nothing here,
    # and an inherited Exception docstring is no example
    doc = obj.__doc__ or ""
    assert ">>>" in doc, f"lorax_fn.{name} has no '>>>' example in its docstring"
    tests = doctest.DocTestFinder(recurse=False).find(
        obj, f"lorax_fn.{name}", module=sys.modules[obj.__module__], globs={})
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for t in tests:
        runner.run(t, out=lambda s: None)
    assert runner.tries > 0
    assert runner.failures == 0, f"the docstring example of lorax_fn.{name} fails; run pytest on " \
                                 f"{sys.modules[obj.__module__].__file__} for the details"


@pytest.mark.parametrize("name", PUBLIC)
def test_public_name_is_collected_by_pytest_doctests(name):
    """The suite also runs these examples as doctests: the object lives in a module under
    lorax_fn/, which is a testpath, and --doctest-modules is on."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "--doctest-modules" in config["addopts"].split()
    assert "lorax_fn" in config["testpaths"]
    module_file = Path(sys.modules[getattr(lorax_fn, name).__module__].__file__).resolve()
    assert module_file.is_relative_to(ROOT / "lorax_fn")


def readme_blocks():
    """``(language, code, text before the block)`` for every fenced block of README.md."""
    text = (ROOT / "README.md").read_text()
    out, pos = [], 0
    for m in re.finditer(r"^```(\w*)\n(.*?)^```$", text, flags=re.S | re.M):
        out.append((m.group(1), m.group(2), text[pos:m.start()]))
        pos = m.end()
    return out


@pytest.mark.slow
def test_readme_python_blocks_run_and_print_what_the_readme_shows(tmp_path, monkeypatch):
    """Run every ```python block of the README in order, in one namespace (later blocks build
    on earlier ones, as a reader would); where the README says a block "prints" a ```text
    block, the output must be that text."""
    monkeypatch.chdir(tmp_path)   # the quickstart saves an adapter to the working directory
    blocks = readme_blocks()
    namespace: dict = {}
    ran = compared = 0
    for i, (lang, code, _) in enumerate(blocks):
        if lang != "python":
            continue
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, f"README.md python block {ran + 1}", "exec"), namespace)
        ran += 1
        if i + 1 < len(blocks) and blocks[i + 1][0] == "text" and blocks[i + 1][2].strip() == "prints":
            assert out.getvalue().strip() == blocks[i + 1][1].strip()
            compared += 1
    assert ran >= 4 and compared >= 1
    assert (tmp_path / "my_adapter").is_dir()
