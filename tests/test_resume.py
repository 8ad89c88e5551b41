"""AdapterCheckpointManager and the resumable example: a run killed mid-save resumes to the same losses."""

import importlib.util
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorax_fn as lf
from lorax_fn.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "train_with_checkpoints.py"
STALL = Path(__file__).resolve().parent / "scripts" / "stall_commit.py"
TINY = ["--width", "32", "--d-in", "8", "--batch", "16", "--classes", "5", "--rank", "2", "--quiet"]


# ------------------------------------------------------------------ the manager in-process
def _setup():
    rng = np.random.default_rng(0)
    params = {"l1": {"kernel": jnp.asarray(rng.standard_normal((6, 8)), jnp.float32),
                     "bias": jnp.zeros(8)},
              "l2": {"kernel": jnp.asarray(rng.standard_normal((8, 3)), jnp.float32)}}
    lp = lf.lorafy(params, rank=2)
    tx = lf.optimizer(optax.adam(1e-2), lp, trainable=".*bias")

    @jax.jit
    def step(lp, opt_state, rng, i):
        rng, sub = jax.random.split(rng)
        x = jax.random.normal(jax.random.fold_in(jax.random.key(1), i), (4, 6))
        x = x + 0.1 * jax.random.normal(sub, x.shape)

        def loss(lp):
            h = jnp.tanh(x @ lf.merge(lp)["l1"]["kernel"] + lp["l1"]["bias"])
            return jnp.mean((h @ lf.merge(lp)["l2"]["kernel"]) ** 2)

        value, g = jax.value_and_grad(loss)(lp)
        updates, opt_state = tx.update(g, opt_state, lp)
        return optax.apply_updates(lp, updates), opt_state, rng, value

    return params, lp, tx, step


def test_manager_resumes_to_the_same_state(tmp_path):
    params, lp0, tx, step = _setup()
    lp, s, r = lp0, tx.init(lp0), jax.random.key(3)
    losses = []
    with lf.AdapterCheckpointManager(tmp_path, max_to_keep=2, save_interval_steps=2, trainable=".*bias") as ckpt:
        for i in range(6):
            lp, s, r, loss = step(lp, s, r, i)
            losses.append(loss)
            ckpt.save(i + 1, lp, s, r)
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [4, 6] and ckpt.latest_step() == 6
        assert ckpt.should_save(8) and not ckpt.should_save(7)
        final = (lp, s, r)

        fresh = lf.lorafy(params, rank=2, key=jax.random.key(9))  # other adapters: all must be replaced
        got = ckpt.restore(fresh, tx.init(fresh), jax.random.key(0), step=4)
    assert got.step == 4
    # continue from step 4 and land exactly where the uninterrupted run did
    lp, s, r = got.tree, got.opt_state, got.rng
    for i in range(4, 6):
        lp, s, r, loss = step(lp, s, r, i)
        chex.assert_trees_all_equal(loss, losses[i])
    chex.assert_trees_all_equal((lp, s, jax.random.key_data(r)), (final[0], final[1], jax.random.key_data(final[2])))
    assert not np.array_equal(lp["l1"]["bias"], params["l1"]["bias"])  # the trained bias came back too
    assert lf.read_adapter_config(tmp_path / "6")["trainable"][0]["path"] == "l1/bias"


def test_manager_errors(tmp_path):
    params, lp, tx, _ = _setup()
    with lf.AdapterCheckpointManager(tmp_path / "run", async_save=False) as ckpt:
        with pytest.raises(CheckpointError, match="no committed checkpoint"):
            ckpt.restore(lp, tx.init(lp))
        assert ckpt.save(1, lp, tx.init(lp), jax.random.key(0))
        with pytest.raises(CheckpointError, match="did you pass the opt_state/rng it was saved with"):
            ckpt.restore(lp, optax.sgd(0.1).init(lp), jax.random.key(0))
        with pytest.raises(lf.StructureError, match="'l1/kernel' in the given tree has rank 3"):
            ckpt.restore(lf.lorafy(params, rank=3), None, None)
        with pytest.raises(lf.StructureError, match="nothing to save"):
            ckpt.save(2, params)


def test_save_refuses_to_drop_trained_leaves_without_trainable(tmp_path):
    params, lp, tx, step = _setup()  # tx trains l1/bias in full
    s, r = tx.init(lp), jax.random.key(0)
    lp, s, r, _ = step(lp, s, r, 0)
    with lf.AdapterCheckpointManager(tmp_path / "forgot", async_save=False) as ckpt:
        with pytest.raises(CheckpointError, match=r"opt_state holds optimizer state for 'l1/bias'.*trainable="):
            ckpt.save(1, lp, s, r)
        assert ckpt.all_steps() == []
    with lf.AdapterCheckpointManager(tmp_path / "given", async_save=False, trainable=".*bias") as ckpt:
        assert ckpt.save(1, lp, s, r)
    # an optimizer that freezes the bias holds nothing for it: nothing is lost, nothing to complain about
    frozen_tx = lf.optimizer(optax.adam(1e-2), lp)
    with lf.AdapterCheckpointManager(tmp_path / "frozen", async_save=False) as ckpt:
        assert ckpt.save(1, lp, frozen_tx.init(lp), r)


def test_save_after_rolling_back_is_an_error_not_a_skip(tmp_path):
    params = {"w": jnp.ones((4, 3))}
    lp = lf.lorafy(params, rank=1)
    with lf.AdapterCheckpointManager(tmp_path, async_save=False, max_to_keep=None, save_interval_steps=2) as ckpt:
        for i in (2, 4, 6):
            assert ckpt.save(i, lp)
        back = ckpt.restore(lp, step=2).tree
        branch = {"w": back["w"].replace(b=jnp.full((1, 3), 7.0))}
        for force in (False, True):
            with pytest.raises(CheckpointError, match=r"cannot save step 4 .* latest saved step is 6 "
                                                      r"\(steps \[2, 4, 6\]\)"):
                ckpt.save(4, branch, force=force)
        assert ckpt.all_steps() == [2, 4, 6]
        assert float(ckpt.restore(lp, step=4).tree["w"].b[0, 0]) == 0.0  # step 4 was not touched
        assert not ckpt.save(7, branch) and ckpt.save(8, branch)        # after the latest: as before
        assert float(ckpt.restore(lp).tree["w"].b[0, 0]) == 7.0


# ------------------------------------------------------------------ the example
@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("lorax_fn_example_train_with_checkpoints", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses looks the module up while the file executes
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


def test_example_help(example, capsys):
    with pytest.raises(SystemExit) as exc:
        example.parse_args(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--steps", "--ckpt-dir", "--save-every", "--max-to-keep", "--fresh", "--width", "--seed"):
        assert flag in out


def test_example_tiny_run(example, tmp_path, capsys):
    """Smoke test at tiny size; resuming is what the subprocess test below is about."""
    args = TINY + ["--ckpt-dir", str(tmp_path / "ckpt"), "--save-every", "3", "--max-to-keep", "2"]
    s = example.main(args + ["--steps", "7"])
    out = capsys.readouterr().out
    for line in ("fresh run", "summary", "held-out accuracy", "one checkpoint", "is not written"):
        assert line in out
    assert (s.start_step, s.end_step, s.steps_on_disk) == (0, 7, [6, 7])  # 7 is off the interval: forced
    assert 0 < s.checkpoint_bytes and np.isfinite(s.final_loss) and 0 <= s.accuracy <= 1


def _losses(path: Path) -> dict[int, str]:
    return {int(k): v for k, v in (line.split() for line in path.read_text().splitlines())}


def _cmd(tmp_path, name, *extra):
    return [sys.executable, *extra, str(EXAMPLE), "--steps", "40", "--save-every", "10", "--max-to-keep", "3",
            "--ckpt-dir", str(tmp_path / name), "--loss-log", str(tmp_path / f"{name}.log"), *TINY]


def _start(tmp_path, name, *extra, stdout=None):
    # stderr to a file: a pipe nobody reads could fill up and block the child
    err = open(tmp_path / f"{name}.err", "w")
    return subprocess.Popen(_cmd(tmp_path, name, *extra), stdout=stdout or err, stderr=err, text=True, cwd=ROOT)


@pytest.mark.slow
def test_killed_during_a_save_resumes_bit_identically(tmp_path):
    """40 uninterrupted steps == 20 steps, then SIGKILL while step 30 is being saved, then resumed.

    Both runs checkpoint every 10 steps. In the killed one, Orbax's commit of
    step 30 (the rename of ``30.orbax-checkpoint-tmp``) is held back and the
    process is killed there: step 20 is the last committed checkpoint, 30 a
    half-written one, and the rerun must continue from 20.
    """
    reference = _start(tmp_path, "ref")
    killed = _start(tmp_path, "run", str(STALL), "30", stdout=subprocess.PIPE)
    watchdog = threading.Timer(240, killed.kill)  # never hang the suite if the marker does not come
    watchdog.start()
    try:
        for line in killed.stdout:
            if line.startswith("STALLED 30"):
                break
        else:
            pytest.fail("the run ended before the save of step 30: "
                        + (tmp_path / "run.err").read_text()[-3000:])
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait(timeout=60)
    finally:
        watchdog.cancel()
        if killed.poll() is None:
            killed.kill()
    assert killed.returncode == -signal.SIGKILL
    assert reference.wait(timeout=240) == 0, (tmp_path / "ref.err").read_text()[-3000:]

    ckpt = tmp_path / "run"
    assert sorted(p.name for p in ckpt.iterdir() if p.name.isdigit()) == ["10", "20"]
    assert any(p.name.startswith("30.orbax-checkpoint-tmp") for p in ckpt.iterdir())  # died mid-save
    with pytest.raises(CheckpointError, match="never finished"):
        lf.read_adapter_config(ckpt / "30")
    assert lf.read_adapter_config(ckpt / "20")["adapters"]  # the previous checkpoint is intact

    before = _losses(tmp_path / "run.log")
    assert max(before) >= 30

    resumed = subprocess.run(_cmd(tmp_path, "run"), capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 20" in resumed.stdout

    ref = _losses(tmp_path / "ref.log")
    after = _losses(tmp_path / "run.log")  # the resumed run appended steps 21..40
    assert sorted(ref) == list(range(1, 41))
    assert {k: after[k] for k in range(1, 21)} == {k: ref[k] for k in range(1, 21)}
    resumed_part = dict(line.split() for line in (tmp_path / "run.log").read_text().splitlines()[len(before):])
    assert {int(k): v for k, v in resumed_part.items()} == {k: ref[k] for k in range(21, 41)}
    # what the killed run computed past step 20 agrees too: same data, same key stream
    assert all(before[k] == ref[k] for k in before)
