"""Every public function and class documents itself with an example, and the example runs."""

import contextlib
import doctest
import inspect
import io
import re
import subprocess
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


NUMBER = re.compile(r"[-+]?\d+\.\d+(?:e[-+]?\d+)?")


def same_output(got: str, want: str, approximate: bool) -> bool:
    """``got`` is ``want``; with ``approximate``, decimals may differ by 10% (XLA's CPU kernels
    round differently from one CPU to the next) while every other character, integers
    included, must match."""
    got, want = got.strip(), want.strip()
    if not approximate:
        return got == want
    if NUMBER.sub("#", got) != NUMBER.sub("#", want):
        return False
    pairs = zip(map(float, NUMBER.findall(got)), map(float, NUMBER.findall(want)))
    return all(abs(g - w) <= 0.1 * abs(w) + 1e-4 for g, w in pairs)


def test_same_output_compares_text_exactly_and_decimals_loosely_only_when_asked():
    assert same_output("loss 1.0000\n", "loss 1.0000", approximate=False)
    assert not same_output("loss 1.0500", "loss 1.0000", approximate=False)
    assert same_output("loss 1.0500", "loss 1.0000", approximate=True)
    assert not same_output("loss 1.2000", "loss 1.0000", approximate=True)
    assert not same_output("3 uses, 1.0", "4 uses, 1.0", approximate=True)


def python_blocks():
    """``(number, code, text block that follows, approximate)`` for every ```python block; the
    text block counts only where the README introduces it with "prints" ("prints, up to the
    last digits" for approximate output)."""
    blocks = readme_blocks()
    out = []
    for i, (lang, code, _) in enumerate(blocks):
        if lang != "python":
            continue
        want, approximate = None, False
        if i + 1 < len(blocks) and blocks[i + 1][0] == "text":
            intro = blocks[i + 1][2].strip()
            if intro.startswith("prints"):
                want, approximate = blocks[i + 1][1], "last digits" in intro
        out.append((len(out) + 1, code, want, approximate))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("number,code,want,approximate",
                         [pytest.param(*b, id=f"block{b[0]}") for b in python_blocks()])
def test_readme_python_block_runs_on_its_own_twice_and_prints_what_the_readme_shows(
        number, code, want, approximate, tmp_path, monkeypatch):
    """A reader pastes any one block into a fresh interpreter, maybe twice: each runs in a
    namespace of its own, and a second run (files of the first one in place) works too.
    Where the README says a block "prints" a ```text block, the output is that text."""
    monkeypatch.chdir(tmp_path)   # blocks save adapters to the working directory
    for run in (1, 2):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, f"README.md python block {number} (run {run})", "exec"), {"__name__": "__main__"})
        if want is not None and run == 1:
            assert same_output(out.getvalue(), want, approximate), out.getvalue()


def test_readme_has_python_blocks_and_compares_their_output():
    blocks = python_blocks()
    assert len(blocks) >= 6
    assert sum(want is not None for _, _, want, _ in blocks) >= 3
    quickstart = blocks[0]
    assert quickstart[3] and "loss before" in quickstart[2] and "loss after" in quickstart[2]


# ----------------------------------------------------------------- what the README claims
def comparison_table() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## How it compares"):]
    section = section[:section.index("\n## ", 1)]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[c.strip() for c in row.strip().strip("|").split("|")] for row in rows]


def test_comparison_table_has_no_unchecked_cell():
    rows = comparison_table()
    assert len(rows) >= 10
    width = len(rows[0])
    for row in rows:
        assert len(row) == width, row
        # every cell was checked against the other project's source or docs: no "?" left
        assert not any("?" in cell for cell in row), row
        assert all(cell for cell in row[1:]), row


def test_readme_make_targets_exist():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, flags=re.M))
    named = set(re.findall(r"\bmake ([\w-]+)", (ROOT / "README.md").read_text()))
    assert {"demo", "test", "test-fast"} <= named
    assert named <= targets, named - targets


def repository_text_files() -> list[Path]:
    """Tracked and new (not ignored) files; every text file under ROOT if git is not there."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                                cwd=ROOT, capture_output=True, text=True, check=True).stdout.split("\n")
        files = [ROOT / f for f in listed if f]
    except (OSError, subprocess.CalledProcessError):
        files = [p for p in ROOT.rglob("*") if not any(part.startswith(".") for part in p.relative_to(ROOT).parts)]
    out = []
    for f in files:
        if f.is_file() and f.suffix not in {".png", ".jpg", ".gif", ".pdf", ".npz", ".safetensors"}:
            out.append(f)
    return out


# hosts of links that were checked to lead where the text says; add one only after checking
CHECKED_HOSTS = {"docs.jax.dev", "orbax.readthedocs.io", "huggingface.co",
                 "www.apache.org"}  # the last in LICENSE, the standard Apache-2.0 text
URL = re.compile(r"https?://([A-Za-z0-9.-]+)[^\s\"'`)>\]]*")


def test_no_placeholder_or_unchecked_url_in_the_repository():
    """A guessed URL is worse than none: a reader follows it. Every http(s) link points to a
    host on CHECKED_HOSTS, and none is marked as a placeholder."""
    files = repository_text_files()
    assert ROOT / "README.md" in files and ROOT / "pyproject.toml" in files
    bad = []
    for f in files:
        try:
            text = f.read_text()
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            for m in URL.finditer(line):
                # and the project has no public home yet: a link into one is a guess
                guessed = re.search(r"lorax[-_]fn", m.group(0), flags=re.I) is not None
                if m.group(1).lower() not in CHECKED_HOSTS or guessed or "placeholder" in line.lower():
                    bad.append(f"{f.relative_to(ROOT)}:{number}: {m.group(0)}")
    assert not bad, "links to unchecked hosts or placeholders:\n" + "\n".join(bad)


def test_package_metadata():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    meta, build = project["project"], project["build-system"]
    assert meta["license"] == "Apache-2.0"   # an SPDX expression, not the deprecated table
    # setuptools refuses a license classifier next to an SPDX expression; 77 reads the expression
    assert not any(c.startswith("License ::") for c in meta["classifiers"])
    assert build["requires"] == ["setuptools>=77"]
    assert meta["authors"] == [{"name": "lorax_fn developers"}]
    assert "urls" not in meta                # there is no public URL to give yet
    # the license the metadata names ships with the source (setuptools adds LICENSE* to the wheel)
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    for dep in meta["dependencies"]:
        assert re.search(r"(>=|==|~=)", dep), f"{dep} has no lower bound"
    assert (ROOT / "lorax_fn" / "py.typed").is_file()
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["lorax_fn"]
