"""Smoke tests of the scripts in examples/, shrunk so that each runs in seconds.

Each script is loaded as a module and its ``main(argv)`` called with tiny sizes;
the checks are on what the script reports (its ``Summary``) and prints.
"""

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(f"lorax_fn_example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    # dataclasses resolves the module through sys.modules while the file executes
    sys.modules[spec.name] = mod
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.modules.pop(spec.name, None)
    return mod


@pytest.fixture(scope="module")
def text_lm():
    return load("text_lm")


@pytest.fixture(scope="module")
def image_classifier():
    return load("image_classifier")


@pytest.fixture(scope="module")
def nnx_mlp():
    return load("nnx_mlp")


def help_text(mod, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        mod.parse_args(["--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


# ----------------------------------------------------------------- text_lm (make demo)
TEXT_TINY = ["--steps-base", "20", "--steps-lora", "20", "--d-model", "32", "--layers", "1",
             "--heads", "2", "--seq-len", "32", "--batch", "8", "--eval-windows", "8", "--quiet"]


def test_text_lm_help_lists_the_size_flags(text_lm, capsys):
    out = help_text(text_lm, capsys)
    for flag in ("--steps-base", "--steps-lora", "--d-model", "--rank", "--seed", "--plot",
                 "--adapter-dir"):
        assert flag in out


def test_tiny_text_lm_adapts_merges_saves_and_plots(text_lm, capsys, tmp_path):
    png, ad = tmp_path / "curves" / "loss.png", tmp_path / "adapter"
    s = text_lm.main(TEXT_TINY + ["--plot", str(png), "--adapter-dir", str(ad)])
    out = capsys.readouterr().out

    for line in ("summary", "trainable share", "held-out code loss", "merge max |diff|", "explain",
                 "adapters on disk", "loss curve"):
        assert line in out
    assert "0 materialised" in out
    assert s.explain_uses > 0 and s.explain_materialised == 0
    assert 0 < s.trainable < s.total
    assert s.code_loss_after < s.code_loss_before
    assert s.merge_max_diff < 1e-3
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the size printed is what lies in the directory (the script itself checked the reload)
    assert 0 < s.adapter_bytes == sum(f.stat().st_size for f in ad.rglob("*") if f.is_file())
    assert s.base_bytes == 4 * (s.total - s.trainable)


def test_smooth_is_a_trailing_mean(text_lm):
    x = np.array([1.0, 3.0, 5.0, 7.0])
    np.testing.assert_array_equal(text_lm.smooth(x, 2), [1.0, 2.0, 4.0, 6.0])
    np.testing.assert_array_equal(text_lm.smooth(x, 1), x)


# ----------------------------------------------------------------- image_classifier (Linen)
def test_image_classifier_help(image_classifier, capsys):
    out = help_text(image_classifier, capsys)
    for flag in ("--size", "--width", "--steps-base", "--steps-lora", "--rank", "--seed"):
        assert flag in out


def test_drawn_digits_shifted_are_rotated_and_inverted(image_classifier):
    x, y = image_classifier.draw(np.random.default_rng(0), 64, 16, shifted=False)
    assert x.shape == (64, 16, 16, 1) and y.shape == (64,) and y.dtype == np.int32
    assert x.min() >= 0.0 and x.max() <= 1.0
    # the same random stream, new domain: same labels, each image rotated and inverted
    xs, ys = image_classifier.draw(np.random.default_rng(0), 64, 16, shifted=True)
    np.testing.assert_array_equal(ys, y)
    np.testing.assert_allclose(1.0 - np.rot90(xs, k=-1, axes=(1, 2)), x, rtol=0, atol=1e-6)


def test_glyphs_are_distinct(image_classifier):
    g = image_classifier.glyph_bitmaps().reshape(image_classifier.CLASSES, -1)
    assert len({row.tobytes() for row in g}) == image_classifier.CLASSES


@pytest.mark.slow
def test_tiny_image_classifier_adapts_and_merges(image_classifier, capsys):
    s = image_classifier.main(["--size", "12", "--width", "4", "--batch", "32", "--steps-base", "60",
                               "--steps-lora", "60", "--eval-size", "256", "--quiet"])
    out = capsys.readouterr().out
    for line in ("summary", "trainable share", "rotated accuracy", "merge max |diff|", "explain"):
        assert line in out
    assert s.explain_uses == 4 and s.explain_materialised == 0   # two convs, two dense kernels
    assert 0 < s.trainable < s.total
    assert s.new_acc_after > s.new_acc_before
    assert s.merge_max_diff < 1e-4


def test_image_classifier_rejects_a_too_small_image(image_classifier, capsys):
    with pytest.raises(SystemExit):
        image_classifier.parse_args(["--size", "8"])
    assert "--size" in capsys.readouterr().err


# ----------------------------------------------------------------- nnx_mlp (Flax NNX)
def test_nnx_mlp_help(nnx_mlp, capsys):
    out = help_text(nnx_mlp, capsys)
    for flag in ("--hidden", "--steps-base", "--steps-lora", "--rank", "--shift-rank", "--seed"):
        assert flag in out


def test_shifted_teacher_moves_only_the_middle_kernel_by_a_low_rank_step(nnx_mlp):
    import jax
    from flax import nnx

    teacher = nnx_mlp.MLP(6, 10, 3, rngs=nnx.Rngs(0))
    moved = nnx_mlp.shifted_teacher(teacher, 2, jax.random.key(1))
    a, b = nnx.state(teacher), nnx.state(moved)
    for name in ("inp", "out"):
        np.testing.assert_array_equal(a[name]["kernel"][...], b[name]["kernel"][...])
    delta = np.asarray(b["mid"]["kernel"][...] - a["mid"]["kernel"][...])
    assert np.linalg.matrix_rank(delta, tol=1e-4 * np.abs(delta).max()) == 2


def test_tiny_nnx_mlp_adapts_and_merges_back_into_the_module(nnx_mlp, capsys):
    s = nnx_mlp.main(["--din", "8", "--hidden", "32", "--dout", "4", "--batch", "32",
                      "--steps-base", "60", "--steps-lora", "60", "--eval-size", "128", "--quiet"])
    out = capsys.readouterr().out
    for line in ("summary", "trainable share", "changed teacher, MSE", "merge max |diff|", "explain"):
        assert line in out
    assert s.explain_uses == 3 and s.explain_materialised == 0   # three Linear kernels
    assert 0 < s.trainable < s.total
    assert s.new_loss_after < s.new_loss_before
    assert s.merge_max_diff < 1e-4


# ----------------------------------------------------------------- optional dependencies
NO_MATPLOTLIB = "raise ImportError('matplotlib is made unimportable by the test')\n"


def test_text_lm_without_matplotlib_stops_at_start_up_naming_the_extra(tmp_path):
    """Under a plain `pip install .` the demo must not train for minutes and then fail on the plot."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "matplotlib.py").write_text(NO_MATPLOTLIB)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    # tiny sizes, so that a script that only fails at the plot fails this test in seconds too
    done = subprocess.run([sys.executable, str(EXAMPLES / "text_lm.py"), *TEXT_TINY,
                           "--plot", str(tmp_path / "p.png"), "--adapter-dir", str(tmp_path / "ad")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    elapsed = time.perf_counter() - t0
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and 'pip install -e ".[examples]"' in lines[0] and "--plot ''" in lines[0], done.stderr
    assert done.stdout == ""      # stopped before loading data or training anything
    assert elapsed < 60, elapsed


def test_text_lm_checks_for_matplotlib_only_when_it_plots(text_lm, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # `import matplotlib` raises ImportError
    with pytest.raises(SystemExit, match=r'pip install -e "\.\[examples\]"'):
        text_lm.parse_args(["--plot", str(tmp_path / "p.png")])
    assert text_lm.parse_args(["--plot", ""]).plot == ""   # main() then skips plot_losses


@pytest.mark.parametrize("name", sorted(p.stem for p in EXAMPLES.glob("*.py")))
def test_every_example_loads_and_parses_its_flags_without_matplotlib(name, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    mod = load(name)
    args = mod.parse_args(["--plot", ""] if name == "text_lm" else [])
    assert args is not None


# ----------------------------------------------------------------- mora_memorize (MoRA vs LoRA)
def test_tiny_mora_memorize_compares_three_methods_at_their_counts(capsys, tmp_path):
    mod = load("mora_memorize")
    s = mod.main(["--pairs", "64", "--values", "32", "--d-model", "16", "--hidden", "32", "--rank", "2",
                  "--steps", "30", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert set(s.results) == {"LoRA r=2", "MoRA (type 6)", "full fine-tuning"}
    lora, mora, full = (s.results[k] for k in ("LoRA r=2", "MoRA (type 6)", "full fine-tuning"))
    assert lora.trainable == (16 + 32) * 2 + (32 + 32) * 2
    assert abs(mora.trainable - lora.trainable) <= 0.15 * lora.trainable  # tiny kernels: a square is coarse
    assert full.trainable == 16 * 32 + 32 * 32
    for r in s.results.values():
        assert len(r.losses) == 30 and r.losses[-1] < r.losses[0] and 0 <= r.accuracy <= 1
    assert "final loss" in out and (tmp_path / "mora_memorize.png").exists()
