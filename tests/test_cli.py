"""`python -m lorax_fn`: --help, inspect (lorax_fn and PEFT formats), merge into a base checkpoint."""

import json
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import lorax_fn as lf
from lorax_fn import cli

ROOT = Path(__file__).resolve().parents[1]


def cli_run(*args):
    return subprocess.run([sys.executable, "-m", "lorax_fn", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


@pytest.fixture()
def adapter(tmp_path):
    rng = np.random.default_rng(0)
    params = {"enc": {"kernel": jnp.asarray(rng.standard_normal((12, 4, 2)), jnp.float32),
                      "bias": jnp.asarray(rng.standard_normal(8), jnp.float32)},
              "head": {"kernel": jnp.asarray(rng.standard_normal((8, 5)), jnp.float32)}}
    lp = lf.lorafy(params, rank=2, alpha=6, targets=".*kernel", layout={"enc/kernel": ((), (0,), (1, 2))})
    lp = jax.tree.map(lambda x: x.replace(b=jnp.full(x.b.shape, 0.5)) if lf.is_lora(x) else x, lp,
                      is_leaf=lf.is_lora)
    return params, lp, lf.save_adapters(tmp_path / "adapter", lp, trainable="enc/bias", metadata={"task": "t"})


def test_help_explains_itself(capsys):
    res = cli_run("--help")
    assert res.returncode == 0
    for words in ("inspect", "merge", "size on disk", "standard Orbax pytree checkpoint", "PEFT", "examples:"):
        assert words in res.stdout
    with pytest.raises(SystemExit) as exc:
        cli.main(["merge", "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "--adapters" in out and "--base" in out and "--out" in out
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2 and "required" in capsys.readouterr().err


def test_inspect(adapter):
    params, lp, path = adapter
    res = cli_run("inspect", path)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert f"{size:,} bytes" in out
    assert f"lorax_fn {lf.__version__}" in out and '{"task": "t"}' in out
    assert "2 weights, rank 2, alpha 6" in out
    assert "66 in adapters (on 136 base weights) + 8 in 1 fully trained leaves" in out  # 24+16 + 16+10
    row = next(line for line in out.splitlines() if line.startswith("enc/kernel"))
    assert row.split()[:5] == ["enc/kernel", "(12,", "4,", "2)", "float32"]
    assert "()/(0,)/(1, 2)" in row and "(12, 2) float32" in row and "(2, 4, 2) float32" in row

    res = cli_run("inspect", path, "--json")
    got = json.loads(res.stdout)
    assert got["bytes_on_disk"] == size and got["config"] == lf.read_adapter_config(path)


def test_merge_into_a_base_checkpoint(adapter, tmp_path):
    params, lp, path = adapter
    with ocp.StandardCheckpointer() as ck:
        ck.save(tmp_path / "base", params)
    res = cli_run("merge", "--adapters", path, "--base", tmp_path / "base", "--out", tmp_path / "merged")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "merged 2 adapters" in res.stdout
    with ocp.StandardCheckpointer() as ck:
        merged = ck.restore(tmp_path / "merged", jax.eval_shape(lambda: params))
    want = lf.merge(lf.load_adapters(path, params))  # the trained bias is part of the result
    chex.assert_trees_all_equal(merged, want)
    assert not np.array_equal(merged["head"]["kernel"], params["head"]["kernel"])

    res = cli_run("merge", "--adapters", path, "--base", tmp_path / "base", "--out", tmp_path / "merged")
    assert res.returncode == 1 and "error: " in res.stderr and "already exists" in res.stderr


def test_inspect_in_process_peft_manager_and_errors(adapter, tmp_path, capsys):
    params, lp, path = adapter
    peft_dir = lf.save_peft(tmp_path / "peft", lp)
    assert cli.main(["inspect", str(peft_dir)]) == 0
    out = capsys.readouterr().out
    assert "PEFT adapter" in out and '"LORA"' in out and "base_model.model.enc.lora_A.weight" in out
    assert "(2, 12)" in out and "(8, 2)" in out  # torch orientation: (r, in), (out, r)

    with lf.AdapterCheckpointManager(tmp_path / "run", async_save=False) as ckpt:
        for step in (1, 2):
            ckpt.save(step, lp)
    assert cli.main(["inspect", str(tmp_path / "run")]) == 0
    assert "steps [1, 2]; showing step 2" in capsys.readouterr().out

    assert cli.main(["inspect", str(tmp_path / "missing")]) == 1
    assert "error: no checkpoint at" in capsys.readouterr().err
    with ocp.StandardCheckpointer() as ck:
        ck.save(tmp_path / "other", {"enc": {"kernel": np.zeros((3, 3), np.float32)}})
    assert cli.main(["merge", "--adapters", str(path), "--base", str(tmp_path / "other"),
                     "--out", str(tmp_path / "m")]) == 1
    assert "'enc/kernel'" in capsys.readouterr().err


def test_help_gives_the_rslora_scale():
    assert "alpha/sqrt(r)" in cli.parser().format_help()


def test_inspect_damaged_peft_directory_is_a_one_line_error(tmp_path, capsys):
    d = tmp_path / "peft"
    d.mkdir()
    (d / "adapter_config.json").write_text('{"peft_type": "LORA", ')
    assert cli.main(["inspect", str(d)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read") and "adapter_config.json" in err and "Traceback" not in err
    (d / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (d / "adapter_model.safetensors").write_bytes(b"garbage")
    assert cli.main(["inspect", str(d)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read") and "adapter_model.safetensors" in err


def test_merge_refuses_to_write_over_its_inputs(adapter, tmp_path, capsys):
    params, lp, path = adapter
    with ocp.StandardCheckpointer() as ck:
        ck.save(tmp_path / "base", params)
    for out in (tmp_path / "base", tmp_path / "base" / "sub", tmp_path, path):
        assert cli.main(["merge", "--adapters", str(path), "--base", str(tmp_path / "base"),
                         "--out", str(out), "--overwrite"]) == 1
        assert "overlaps --" in capsys.readouterr().err
    with ocp.StandardCheckpointer() as ck:  # the base is still there, unchanged
        chex.assert_trees_all_equal(ck.restore(tmp_path / "base", jax.eval_shape(lambda: params)), params)


# ------------------------------------------------------------------ hardening: destinations and dtypes
@pytest.fixture()
def base_ckpt(adapter, tmp_path):
    params, lp, path = adapter
    with ocp.StandardCheckpointer() as ck:
        ck.save(tmp_path / "base", params)
    return ["merge", "--adapters", str(path), "--base", str(tmp_path / "base")]


@pytest.mark.parametrize("dtype", ["int8", "int32", "bool", "not-a-dtype"])
def test_merge_refuses_a_non_float_dtype(base_ckpt, tmp_path, capsys, dtype):
    assert cli.main([*base_ckpt, "--out", str(tmp_path / "m"), "--dtype", dtype]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --dtype") and "floating-point" in err and err.count("\n") == 1
    assert not (tmp_path / "m").exists()


def test_merge_dtype_float32_keeps_the_update_of_a_bfloat16_base(tmp_path):
    rng = np.random.default_rng(1)
    params = {"w": jnp.asarray(rng.standard_normal((32, 16)), jnp.bfloat16)}
    lw = lf.lorafy(params, rank=2, dtype=jnp.float32)["w"]
    lw = lw.replace(b=jnp.asarray(1e-3 * rng.standard_normal(lw.b.shape), jnp.float32))
    ad = lf.save_adapters(tmp_path / "ad", {"w": lw})
    with ocp.StandardCheckpointer() as ck:
        ck.save(tmp_path / "base", params)
    assert cli.main(["merge", "--adapters", str(ad), "--base", str(tmp_path / "base"), "--out",
                     str(tmp_path / "m"), "--dtype", "float32"]) == 0
    with ocp.StandardCheckpointer() as ck:
        got = ck.restore(tmp_path / "m")["w"]
    want = np.asarray(params["w"], np.float64) + lw.scale * np.asarray(lw.a, np.float64) @ np.asarray(lw.b, np.float64)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_merge_refuses_to_overwrite_a_plain_file(base_ckpt, tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    assert cli.main([*base_ckpt, "--out", str(out), "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "is a file, not a checkpoint directory" in err and err.count("\n") == 1
    assert out.read_text() == "mine" and not Path(str(out) + ".lorax-old").exists()


def test_merge_refuses_to_overwrite_a_folder_of_user_files(base_ckpt, tmp_path, capsys):
    out = tmp_path / "project"
    (out / "data").mkdir(parents=True)
    (out / "train.py").write_text("print('hi')")
    (out / "data" / "x.csv").write_text("1,2")
    assert cli.main([*base_ckpt, "--out", str(out), "--overwrite"]) == 1
    assert "not a checkpoint written by lorax_fn" in capsys.readouterr().err
    assert (out / "train.py").read_text() == "print('hi')" and (out / "data" / "x.csv").read_text() == "1,2"


def test_merge_overwrite_replaces_its_own_output(base_ckpt, tmp_path, capsys):
    out = tmp_path / "m"
    assert cli.main([*base_ckpt, "--out", str(out)]) == 0
    assert cli.main([*base_ckpt, "--out", str(out)]) == 1
    assert "pass --overwrite to replace it" in capsys.readouterr().err  # the flag, not the Python argument
    assert cli.main([*base_ckpt, "--out", str(out), "--overwrite"]) == 0


def test_merge_under_a_regular_file_is_a_one_line_error_and_the_process_exits(base_ckpt, tmp_path):
    (tmp_path / "a_file").write_text("x")
    res = subprocess.run([sys.executable, "-m", "lorax_fn", *base_ckpt, "--out", str(tmp_path / "a_file" / "x")],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)  # today's main never exited
    assert res.returncode == 1
    assert res.stderr.startswith("error: cannot write") and "is a file, not a directory" in res.stderr
    assert res.stderr.count("\n") == 1


def test_output_into_a_closed_pipe_has_no_traceback(tmp_path):
    # enough rows that the output outgrows the pipe's buffer after `head` has left
    lp = lf.lorafy({f"layer{i}": {"kernel": jnp.ones((4, 4))} for i in range(300)}, rank=2)
    path = lf.save_adapters(tmp_path / "ad", lp)
    res = subprocess.run(f"{sys.executable} -m lorax_fn inspect {path} | head -n 1", shell=True,
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.stdout.startswith("lorax_fn adapter checkpoint")
    assert "Traceback" not in res.stderr and "BrokenPipeError" not in res.stderr


def test_inspect_peft_config_nested_too_deeply_is_a_one_line_error(tmp_path, capsys):
    d = tmp_path / "peft"
    d.mkdir()
    (d / "adapter_config.json").write_text("[" * 200_000 + "]" * 200_000)
    assert cli.main(["inspect", str(d)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read") and "nested too deeply" in err and err.count("\n") == 1


def test_merge_out_through_a_link_and_dotdot_cannot_reach_the_base(base_ckpt, tmp_path, capsys, monkeypatch):
    # 'link/..' is tmp_path when read lexically (as the save writes it), but elsewhere when the OS follows it
    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real" / "sub", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    assert cli.main([*base_ckpt, "--out", "link/../base", "--overwrite"]) == 1
    assert "overlaps --base" in capsys.readouterr().err
