"""Smoke test of the demo behind `make demo`, shrunk so that it runs in seconds."""

import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "text_lm.py"
TINY = ["--steps-base", "20", "--steps-lora", "20", "--d-model", "32", "--layers", "1",
        "--heads", "2", "--seq-len", "32", "--batch", "8", "--eval-windows", "8", "--quiet"]


@pytest.fixture(scope="module")
def text_lm():
    spec = importlib.util.spec_from_file_location("lorax_fn_example_text_lm", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    # dataclasses resolves the module through sys.modules while the file executes
    sys.modules[spec.name] = mod
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


def test_help_lists_the_size_flags(text_lm, capsys):
    with pytest.raises(SystemExit) as exc:
        text_lm.parse_args(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--steps-base", "--steps-lora", "--d-model", "--rank", "--seed"):
        assert flag in out


def test_tiny_demo_adapts_and_merges(text_lm, capsys):
    s = text_lm.main(TINY)
    out = capsys.readouterr().out

    for line in ("summary", "trainable share", "held-out code loss", "merge max |diff|", "explain"):
        assert line in out
    assert "0 materialised" in out
    assert s.explain_uses > 0 and s.explain_materialised == 0
    assert 0 < s.trainable < s.total
    assert s.code_loss_after < s.code_loss_before
    assert s.merge_max_diff < 1e-3
