"""AdapterCheckpointManager and the resumable example: a run killed mid-save resumes to the same losses."""

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorax_fn as lf
from lorax_fn import ckpt_format as fmt
from lorax_fn.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "train_with_checkpoints.py"
STALL = Path(__file__).resolve().parent / "scripts" / "stall_commit.py"
TINY = ["--width", "32", "--d-in", "8", "--batch", "16", "--classes", "5", "--rank", "2", "--quiet"]


# ------------------------------------------------------------------ the manager in-process
def _setup(d_in=6, width=8, rank=2):
    rng = np.random.default_rng(0)
    params = {"l1": {"kernel": jnp.asarray(rng.standard_normal((d_in, width)), jnp.float32),
                     "bias": jnp.zeros(width)},
              "l2": {"kernel": jnp.asarray(rng.standard_normal((width, 3)), jnp.float32)}}
    lp = lf.lorafy(params, rank=rank)
    tx = lf.optimizer(optax.adam(1e-2), lp, trainable=".*bias")

    @jax.jit
    def step(lp, opt_state, rng, i):
        rng, sub = jax.random.split(rng)
        x = jax.random.normal(jax.random.fold_in(jax.random.key(1), i), (4, d_in))
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


# ------------------------------------------------------------------ integrity of the train item (issue 17)
# OCDBT's b-tree and version nodes start with this magic and carry their own CRC-32C; the other files of a
# `d/` folder hold array payloads (values over about 1 KiB; smaller ones are inlined in the nodes)
OCDBT_NODE = bytes.fromhex("0cdb20de")


def _trained(steps=2, **size):
    """The params, a LoRA tree and a real Adam state after ``steps`` updates, the optimizer and the next key."""
    params, lp, tx, step = _setup(**size)
    s, r = tx.init(lp), jax.random.key(3)
    for i in range(steps):
        lp, s, r, _ = step(lp, s, r, i)
    return params, lp, tx, s, r


def _host(tree, opt_state, rng, step):
    return jax.tree.map(np.asarray, (tree, opt_state, jax.random.key_data(rng), step))


def _same(a, b):
    (fa, ta), (fb, tb) = jax.tree.flatten(a), jax.tree.flatten(b)
    return ta == tb and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(fa, fb))


def _restore(directory, params, tx, lp, template=None, step=None):
    with lf.AdapterCheckpointManager(directory, async_save=False, trainable=".*bias") as ckpt:
        got = ckpt.restore(lf.lorafy(params, rank=lp["l1"]["kernel"].rank),
                           tx.init(lp) if template is None else template, jax.random.key(0), step=step)
    return _host(got.tree, got.opt_state, got.rng, got.step)


def _spread(files, n):
    """``n`` (file, offset) pairs: the middles of n equal slices of the files' bytes laid end to end."""
    sizes = [f.stat().st_size for f in files]
    out = []
    for k in range(n):
        at, i = (2 * k + 1) * sum(sizes) // (2 * n), 0
        while at >= sizes[i]:
            at, i = at - sizes[i], i + 1
        out.append((files[i], at))
    return out


# a file that fails to decode leaves Orbax coroutines behind that pytest reports when they are collected
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_bit_flips_in_the_train_item_are_refused_or_harmless(tmp_path):
    """A flipped bit in the optimizer state restored wrong Adam moments with no error (issue 17: 12 of 12)."""
    params, lp, tx, s, r = _trained(d_in=256, width=256)  # 2 KiB factors and moments: stored out of line
    want = _host(lp, s, r, 2)
    orig = tmp_path / "orig"
    with lf.AdapterCheckpointManager(orig, async_save=True, trainable=".*bias") as ckpt:
        ckpt.save(2, lp, s, r)
    files = sorted(p for p in (orig / "2" / "train").rglob("*") if p.is_file() and p.parent.name == "d")
    data = [p for p in files if p.read_bytes()[:4] != OCDBT_NODE]
    nodes = [p for p in files if p not in data]
    assert data and nodes, f"Orbax/TensorStore changed how they lay out the train item: {files}"
    silent, ours = [], []
    # 12 flips in the payloads (the moments), 4 in the nodes (which hold the small step, count and key)
    for k, (file, pos) in enumerate(_spread(data, 12) + _spread(nodes, 4)):
        run = tmp_path / f"flip{k}"
        shutil.copytree(orig, run)
        target = run / file.relative_to(orig)
        damaged = bytearray(target.read_bytes())
        damaged[pos] ^= 1 << (k % 8)
        target.write_bytes(bytes(damaged))
        try:
            got = _restore(run, params, tx, lp)
        except CheckpointError as err:
            msg = str(err)  # names the item's directory, or TensorStore's message names the file in it
            assert str(run / "2" / "train") in msg, msg[:500]
            if "fails its checksum" in msg:
                assert f"{run / '2' / 'train'}: 'opt_state/" in msg, msg
                ours.append(k)
            continue
        if not _same(got, want):
            silent.append((file.relative_to(orig).as_posix(), pos))
    assert not silent, f"flipped bits restored different values with no error: {silent}"
    assert ours, "no flip reached the checksums of the optimizer state"


def test_a_train_item_from_another_step_or_run_is_refused(tmp_path):
    """Intact files in the wrong place: another step's, or the same step of another run (other key, other moments)."""
    params, lp, tx, s, r = _trained()
    _, _, _, s4, r4 = _trained(steps=4)
    runs = {"a": [(2, s, r), (4, s4, r4)], "key": [(2, s, jax.random.key(4))], "moments": [(2, s4, r)]}
    for name, saves in runs.items():
        with lf.AdapterCheckpointManager(tmp_path / name, async_save=False, trainable=".*bias") as ckpt:
            for step, state, key in saves:
                ckpt.save(step, lp, state, key)
    assert _same(_restore(tmp_path / "a", params, tx, lp, step=2), _host(lp, s, r, 2))
    for src, why in (("a/4", "the train item holds step 4 and the step's config records step 2, but this is the "
                             "directory of step 2"),
                     ("key/2", "'rng' fails its checksum"),
                     ("moments/2", "'opt_state/inner_states/train/inner_state/0/count' fails its checksum")):
        run = tmp_path / ("mixed-" + src.replace("/", "-"))
        shutil.copytree(tmp_path / "a", run)
        shutil.rmtree(run / "2" / "train")
        shutil.copytree(tmp_path / src / "train", run / "2" / "train")
        with pytest.raises(CheckpointError, match=re.escape(f"{run / '2' / 'train'}: {why}")):
            _restore(run, params, tx, lp, step=2)


def test_async_save_records_the_given_values_even_if_their_buffers_are_donated(tmp_path):
    params, lp, tx, s, r = _trained()
    want = _host(lp, s, r, 2)
    overwrite = jax.jit(lambda t: jax.tree.map(lambda x: jnp.full_like(x, 7), t), donate_argnums=0)
    with lf.AdapterCheckpointManager(tmp_path, async_save=True, trainable=".*bias") as ckpt:
        ckpt.save(2, lp, s, r)
        lp, s, _ = overwrite((lp, s, jax.random.key_data(r)))  # reuses the saved buffers where it can
        ckpt.wait_until_finished()
    record = lf.read_adapter_config(tmp_path / "2")["train"]
    flat = jax.tree_util.tree_flatten_with_path({"opt_state": want[1], "rng": want[2]})[0]
    assert record["step"] == 2 and len(record["arrays"]) == len(flat)
    assert [(e["shape"], e["dtype"], e["crc32"]) for e in record["arrays"]] == [
        (list(x.shape), x.dtype.name, zlib.crc32(np.ascontiguousarray(x).tobytes())) for _, x in flat]
    paths = [e["path"] for e in record["arrays"]]
    assert "opt_state/inner_states/train/inner_state/0/mu/l1/kernel/a" in paths and paths[-1] == "rng"
    assert _same(_restore(tmp_path, params, tx, lp), want)


def test_steps_saved_without_a_train_record_still_restore(tmp_path):
    params, lp, tx, s, r = _trained()
    with lf.AdapterCheckpointManager(tmp_path, async_save=False, trainable=".*bias") as ckpt:
        ckpt.save(2, lp, s, r)
    path = tmp_path / "2" / "config" / "metadata"
    config = json.loads(path.read_text())
    del config["train"]  # what a step saved before the record looks like
    config[fmt.CONFIG_CRC] = fmt.config_crc32(config)
    path.write_text(json.dumps(config))
    assert _same(_restore(tmp_path, params, tx, lp), _host(lp, s, r, 2))


def test_restore_onto_templates_of_other_dtypes_checks_then_casts(tmp_path):
    """The checksums are of the saved dtypes: the arrays are read as saved, checked, then cast like the template."""
    params, lp, tx, s, r = _trained()
    with lf.AdapterCheckpointManager(tmp_path, async_save=False, trainable=".*bias") as ckpt:
        ckpt.save(2, lp, s, r)

    def half(tree):
        return jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x, tree)

    got = _restore(tmp_path, params, tx, lp, template=half(tx.init(lp)))
    assert _same(got[1], jax.tree.map(np.asarray, half(s)))


@pytest.mark.parametrize("field, value, why", [
    ("step", -1, "'train.step' is -1"),
    ("step", "2", "'train.step' is missing or malformed"),
    ("arrays", {"rng": {}}, "'train.arrays' is missing or malformed"),
    ("shape", [2.5], "'train.arrays['rng'].shape' is [2.5]"),
    ("dtype", "float33", "'train.arrays['rng'].dtype' is 'float33'"),
    ("crc32", "0x1", "'train.arrays['rng'].crc32' is missing or malformed"),
])
def test_a_malformed_train_record_is_refused(field, value, why):
    _, config = fmt.describe(lf.lorafy({"w": jnp.ones((4, 3))}, rank=1),
                             train={"step": 2, "arrays": [{"path": "rng", "shape": [2], "dtype": "uint32",
                                                           "crc32": 5}]})
    assert fmt.validate(config, "ckpt")["train"]["step"] == 2
    (config["train"] if field in ("step", "arrays") else config["train"]["arrays"][0])[field] = value
    config[fmt.CONFIG_CRC] = fmt.config_crc32(config)  # a consistent config, written by a faulty writer
    with pytest.raises(CheckpointError, match=re.escape(f"ckpt: config field {why}")):
        fmt.validate(config, "ckpt")


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


@pytest.mark.parametrize("name", ["2", "2.orbax-checkpoint-tmp", "1"])
def test_save_refuses_a_link_under_a_step_name(tmp_path, name):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    lp = lf.lorafy({"w": jnp.ones((4, 3))}, rank=2)
    with lf.AdapterCheckpointManager(tmp_path / "run", async_save=False, max_to_keep=1) as ckpt:
        if name != "1":
            ckpt.save(1, lp)
        (tmp_path / "run" / name).symlink_to(outside, target_is_directory=True)
        with pytest.raises(lf.CheckpointError, match="symbolic link"):  # today: a raw OSError from rmtree
            ckpt.save(2, lp)
    assert [p.name for p in outside.iterdir()] == ["keep.txt"] and (tmp_path / "run" / name).is_symlink()


def test_an_optimizer_state_holding_a_typed_key_saves_checks_and_restores(tmp_path):
    lp = lf.lorafy({"w": jnp.ones((4, 3))}, rank=2)
    tx = lf.optimizer(optax.add_noise(0.01, 0.55, 0), lp)  # its state holds a typed PRNG key
    state = tx.init(lp)
    with lf.AdapterCheckpointManager(tmp_path / "run", async_save=False) as ckpt:
        ckpt.save(1, lp, state)
        got = ckpt.restore(lp, tx.init(lp)).opt_state
        config = lf.read_adapter_config(ckpt.step_directory(1))
    key = lambda s: s.inner_states["train"].inner_state.rng_key  # noqa: E731
    assert jax.dtypes.issubdtype(key(got).dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(key(got)), jax.random.key_data(key(state)))
    rec = {e["path"]: e for e in config["train"]["arrays"]}
    kd = np.asarray(jax.random.key_data(key(state)))
    assert rec["opt_state/inner_states/train/inner_state/rng_key"]["crc32"] == zlib.crc32(kd.tobytes())


def test_user_files_next_to_the_steps_do_not_stop_a_save(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "1.log").write_text("mine")
    lp = lf.lorafy({"w": jnp.ones((4, 3))}, rank=2)
    with lf.AdapterCheckpointManager(tmp_path / "run", async_save=False) as ckpt:
        assert ckpt.save(1, lp)
    assert (tmp_path / "run" / "1.log").read_text() == "mine"


def test_a_run_directory_under_a_file_is_a_checkpoint_error(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(lf.CheckpointError, match="'.*a_file' is a file, not a directory"):
        lf.AdapterCheckpointManager(tmp_path / "a_file" / "run")
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    with pytest.raises(lf.CheckpointError, match="symbolic link to nothing"):
        lf.AdapterCheckpointManager(tmp_path / "gone" / "run")
