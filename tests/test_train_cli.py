"""``qlora-spec train`` and ``eval`` end to end on a small model and data the test builds."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jax_impl.apps.cli import main
from jax_impl.apps.train import TrainConfig, resolve_lora, resolve_max_length
from jax_impl.model import EngineConfig
from jax_impl.train.data import save_byte_tokenizer
from ref_numpy.config import LoraConfig, gpt2_config, llama_config
from ref_numpy.formats.hf import save_model
from ref_numpy.formats.peft import load_adapter
from ref_numpy.model import init_params

CFG = llama_config(
    vocab_size=300, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=128
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small Llama-family model with a byte-level tokenizer.json (ids 0-255 are bytes)."""
    out = tmp_path_factory.mktemp("m") / "base"
    save_model(init_params(CFG, np.random.default_rng(0), std=0.1), CFG, out)
    save_byte_tokenizer(out)
    return out


def write_chat_data(path: Path, n: int = 24) -> Path:
    rng = np.random.default_rng(1)
    lines = []
    for i in range(n):
        a, b = (int(x) for x in rng.integers(10, 99, size=2))
        user = ["こんにちは", "مرحبا", "नमस्ते", "hello"][i % 4] + f" {a}+{b}?"
        lines.append(
            json.dumps(
                {
                    "messages": [
                        {"role": "system", "content": "Answer yes in the user's language."},
                        {"role": "user", "content": user},
                        {"role": "assistant", "content": ["はい", "نعم", "हाँ", "yes"][i % 4]},
                    ]
                },
                ensure_ascii=False,
            )
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def train_args(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--out",
        str(out),
        "--method",
        "lora",
        "--rank",
        "4",
        "--lr",
        "3e-2",
        "--batch-size",
        "4",
        "--seed",
        "3",
        "--dropout",
        "0.1",
        *extra,
    ]


@pytest.mark.slow
def test_train_writes_an_adapter_and_the_loss_falls(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_chat_data(tmp_path / "chat.jsonl")
    out = tmp_path / "run"
    args = train_args(
        model_dir,
        data,
        out,
        "--steps",
        "25",
        "--eval-split",
        "0.25",
        "--eval-interval",
        "10",
        "--checkpoint-interval",
        "10",
    )
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "metrics.jsonl",
        "loss.png",
        "train_config.json",
        "summary.json",
    ):
        assert (out / name).exists(), name
    assert not (tmp_path / ".run.run").exists()  # the work directory is gone
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 26))
    assert np.mean([r["loss"] for r in rows[-5:]]) < 0.8 * np.mean([r["loss"] for r in rows[:5]])
    assert any("eval_loss" in r for r in rows)
    assert summary["format"] == "chat" and summary["examples"] == 24
    assert 0 < summary["trainable_percent"] < 100
    resolved = EngineConfig().resolve(CFG)  # auto made concrete: float32 and einsum on a CPU
    assert summary["engine"]["dtype"] == resolved.dtype != "auto"
    assert summary["engine"]["attention"] == resolved.attention != "auto"
    lcfg, adapters = load_adapter(out, CFG)
    assert lcfg.rank == 4 and len(adapters) == 2 * 7
    # the engine and the spec agree on the trained model's loss over the file
    capsys.readouterr()
    base = [
        "eval",
        "--model",
        str(model_dir),
        "--adapter",
        str(out),
        "--data",
        str(data),
        "--max-length",
        "128",
    ]
    assert main([*base, "--backend", "jax"]) == 0
    jax_res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main([*base, "--backend", "numpy"]) == 0
    np_res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert jax_res["tokens"] == np_res["tokens"] > 0
    assert jax_res["loss"] == pytest.approx(np_res["loss"], rel=1e-5)
    assert jax_res["perplexity"] == pytest.approx(np.exp(jax_res["loss"]))
    assert main(args) == 2  # --out exists
    assert "exists" in capsys.readouterr().err


def test_bad_data_stops_before_training(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_chat_data(tmp_path / "chat.jsonl", n=4)
    text = data.read_text().splitlines()
    text[2] = '{"messages": [{"role": "user", "content": "x"}'  # truncated JSON
    data.write_text("\n".join(text) + "\n")
    assert main(train_args(model_dir, data, tmp_path / "run", "--steps", "2")) == 2
    assert f"{data}:3: not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    text[2] = json.dumps({"messages": [{"role": "robot", "content": "x"}]})
    data.write_text("\n".join(text) + "\n")
    assert main(train_args(model_dir, data, tmp_path / "run", "--steps", "2")) == 2
    assert "robot" in capsys.readouterr().err


def test_config_file_and_flags(model_dir: Path, tmp_path: Path) -> None:
    from jax_impl.apps.cli import build_parser, train_config

    conf = tmp_path / "c.toml"
    conf.write_text(
        f'model = "{model_dir}"\ndata = "d.jsonl"\nout = "o"\nrank = 16\n'
        'targets = ["q_proj", "v_proj"]\nlr = 1e-3\n'
    )
    tc = train_config(build_parser().parse_args(["train", "--config", str(conf), "--rank", "2"]))
    assert tc.lora.rank == 2 and tc.optim.lr == 1e-3 and tc.lora.targets == ("q_proj", "v_proj")
    yml = tmp_path / "c.yaml"
    yml.write_text("model: m\ndata: d.jsonl\nout: o\nmethod: full\nmax-length: 64\n")
    tc = train_config(build_parser().parse_args(["train", "--config", str(yml)]))
    assert tc.method == "full" and tc.data_config.max_length == 64
    # tables per section, as train_config.json records them, work too
    conf.write_text(
        f'model = "{model_dir}"\ndata = "d.jsonl"\nout = "o"\n[lora]\nrank = 5\nuse_rslora = true\n'
        "[engine]\nnf4_blocksize = 128\n"
    )
    tc = train_config(build_parser().parse_args(["train", "--config", str(conf)]))
    assert (tc.lora.rank, tc.lora.use_rslora, tc.engine.nf4_blocksize) == (5, True, 128)
    conf.write_text('model = "m"\ndata = "d"\nout = "o"\n[lora]\nranks = 3\n')
    with pytest.raises(ValueError, match="unknown key 'lora.ranks'"):
        train_config(build_parser().parse_args(["train", "--config", str(conf)]))
    conf.write_text('model = "m"\ndata = "d"\nout = "o"\nranks = 3\n')
    with pytest.raises(ValueError, match="unknown key 'ranks'"):
        train_config(build_parser().parse_args(["train", "--config", str(conf)]))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_killed_run_resumes_to_identical_parameters(
    model_dir: Path, tmp_path: Path, method: str
) -> None:
    """SIGKILL mid-run, --resume, and the adapter equals an uninterrupted run's bit for bit
    (with adapter dropout on, so the dropout keys must resume too)."""
    data = write_chat_data(tmp_path / "chat.jsonl")
    extra = ("--steps", "30", "--checkpoint-interval", "1", "--method", method)
    cmd = [sys.executable, "-m", "jax_impl.apps.cli"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    full = tmp_path / "full"
    subprocess.run(
        [*cmd, *train_args(model_dir, data, full, *extra)], check=True, env=env, capture_output=True
    )
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [*cmd, *train_args(model_dir, data, out, *extra)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = tmp_path / ".killed.run" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 8:
            break
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.05)  # returns at once if the run ends
        if proc.returncode is not None:
            break
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    done = len(metrics.read_text().splitlines())
    assert 8 <= done < 30
    subprocess.run(
        [*cmd, *train_args(model_dir, data, out, *extra, "--resume")],
        check=True,
        env=env,
        capture_output=True,
    )
    a = (full / "adapter_model.safetensors").read_bytes()
    b = (out / "adapter_model.safetensors").read_bytes()
    assert a == b, "resumed adapter differs from the uninterrupted run"
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 31))


def checkpoint_steps(work: Path) -> list[int]:
    """The steps of the training-state checkpoints written completely in a work directory
    (orbax renames a step's temporary directory to the step number when it is whole)."""
    return sorted(int(p.name) for p in (work / "state").iterdir() if p.name.isdigit())


def test_non_finite_loss_stops_with_the_step(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_chat_data(tmp_path / "chat.jsonl", n=8)
    out = tmp_path / "run"
    args = train_args(
        model_dir,
        data,
        out,
        "--steps",
        "10",
        "--lr",
        "1e36",
        "--max-grad-norm",
        "1e30",
        "--checkpoint-interval",
        "1",
    )
    assert main(args) == 3
    err = capsys.readouterr().err
    assert "non-finite loss or gradient" in err and "step " in err
    step = int(err.split("step ")[1].split(":")[0])
    assert 1 <= step <= 10
    assert not out.exists()
    assert checkpoint_steps(tmp_path / ".run.run")[-1] == step - 1  # the last good step


def test_train_config_is_validated(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_chat_data(tmp_path / "chat.jsonl", n=4)
    for flags, message in [
        (["--method", "foo"], "argument --method: invalid choice: 'foo'"),
        (["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
        (["--rank", "two"], "argument --rank: invalid int value: 'two'"),
    ]:
        with pytest.raises(SystemExit) as stop:
            main(train_args(model_dir, data, tmp_path / "o", *flags))
        assert stop.value.code == 2
        assert message in capsys.readouterr().err
    conf = tmp_path / "c.toml"
    for line, message in [
        ('method = "foo"', "c.toml: method: expected one of ['full', 'lora', 'qlora'], got 'foo'"),
        ('rank = "16"', "c.toml: rank: expected int, got '16'"),
        ("packing = 1", "c.toml: packing: expected bool, got 1"),
        ("targets = 3", "c.toml: targets: expected names, got [3]"),
    ]:
        conf.write_text(line + "\n")
        assert main(train_args(model_dir, data, tmp_path / "o", "--config", str(conf))) == 2
        assert message in capsys.readouterr().err
    for flags, message in [
        (["--checkpoint-interval", "0"], "TrainConfig.checkpoint_interval: expected >= 1"),
        (["--max-length", "4096"], "--max-length 4096 exceeds the model's"),
    ]:
        assert main(train_args(model_dir, data, tmp_path / "o", *flags)) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "o").exists() and not (tmp_path / ".o.run").exists()
    with pytest.raises(ValueError, match="EngineConfig.dtype: expected one of"):
        EngineConfig(dtype="float8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="TrainConfig.method: expected one of"):
        TrainConfig(model="m", data="d", out="o", method="half")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"EngineConfig.nf4_blocksize: expected one of \[32, 64"):
        EngineConfig(nf4_blocksize=48)


def last_json(capsys: pytest.CaptureFixture[str]) -> dict:
    return dict(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))


def test_max_length_defaults_to_the_model_context(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model of context 48 trains without --max-length (the default is min(512, 48)),
    and refuses an explicit --max-length above its context."""
    short = CFG.replace(max_seq_len=48)
    base = tmp_path / "short"
    save_model(init_params(short, np.random.default_rng(0), std=0.1), short, base)
    save_byte_tokenizer(base)
    data = write_chat_data(tmp_path / "chat.jsonl", n=8)
    assert main(train_args(base, data, tmp_path / "o", "--steps", "2")) == 0
    recorded = json.loads((tmp_path / "o" / "train_config.json").read_text())
    assert recorded["data_config"]["max_length"] == 48
    assert last_json(capsys)["truncated"] > 0  # the chats are longer than 48 bytes
    assert main(train_args(base, data, tmp_path / "o2", "--max-length", "49")) == 2
    err = capsys.readouterr().err
    assert "--max-length 49 exceeds the model's max_position_embeddings (48)" in err
    assert (resolve_max_length(None, 48), resolve_max_length(None, 4096)) == (48, 512)
    assert resolve_max_length(48, 48) == 48


def test_layers_to_transform_trains_only_those_blocks(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from jax_impl.apps.cli import build_parser, train_config

    def layers(*argv: str) -> tuple[int, ...] | None:
        args = ["train", "--model", "m", "--data", "d", "--out", "o", *argv]
        return train_config(build_parser().parse_args(args)).lora.layers_to_transform

    assert layers() is None
    assert layers("--layers-to-transform", "0,1") == layers("--layers-to-transform", "0", "1")
    assert layers("--layers-to-transform", "1") == (1,)
    conf = tmp_path / "c.yaml"
    conf.write_text("layers_to_transform: [1]\n")
    assert layers("--config", str(conf)) == (1,)
    with pytest.raises(ValueError, match="--layers-to-transform: expected integers"):
        layers("--layers-to-transform", "q_proj")
    data = write_chat_data(tmp_path / "chat.jsonl", n=8)
    out = tmp_path / "run"
    args = train_args(model_dir, data, out, "--steps", "2", "--layers-to-transform", "1")
    assert main([*args, "--targets", "q_proj,v_proj"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [1]
    assert config["target_modules"] == ["q_proj", "v_proj"]
    _, adapters = load_adapter(out, CFG)
    assert sorted(adapters) == ["layers.1.attn.q_proj", "layers.1.attn.v_proj"]
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # q_proj [32, 32] and v_proj [32, 16] (2 kv heads of 8) of one block, rank 4
    assert summary["trainable_params"] == 4 * (32 + 32) + 4 * (32 + 16)
    bad = train_args(model_dir, data, tmp_path / "o", "--layers-to-transform", "2")
    assert main(bad) == 2
    assert "layers_to_transform" in capsys.readouterr().err


def test_targets_take_commas_spaces_and_all_linear(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from jax_impl.apps.cli import build_parser, train_config

    def targets(*argv: str) -> tuple[str, ...]:
        args = ["train", "--model", "m", "--data", "d", "--out", "o", *argv]
        return tuple(train_config(build_parser().parse_args(args)).lora.targets)

    assert targets("--targets", "q_proj,v_proj") == ("q_proj", "v_proj")
    assert targets("--targets", "q_proj", "v_proj") == ("q_proj", "v_proj")
    assert targets("--targets", "q_proj,", "v_proj,o_proj") == ("q_proj", "v_proj", "o_proj")
    assert targets() == targets("--targets", "all-linear") == ("all-linear",)
    conf = tmp_path / "c.yaml"
    conf.write_text("targets: q_proj, down_proj\n")
    assert targets("--config", str(conf)) == ("q_proj", "down_proj")
    conf.write_text("targets: [q_proj, down_proj]\n")
    assert targets("--config", str(conf)) == ("q_proj", "down_proj")
    with pytest.raises(ValueError, match="all-linear already selects every projection"):
        targets("--targets", "all-linear,q_proj")
    # all-linear is every projection of a block, per family (PEFT: all but the output head)
    gpt2 = gpt2_config(vocab_size=50, d_model=16, n_layers=2, n_heads=2, d_ff=24, max_seq_len=16)
    assert resolve_lora(LoraConfig(rank=2), gpt2).targets == ("c_attn", "c_fc", "c_proj")
    assert resolve_lora(LoraConfig(), CFG).targets == tuple(
        sorted(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    )
    data = write_chat_data(tmp_path / "chat.jsonl", n=8)
    out = tmp_path / "run"
    assert main(train_args(model_dir, data, out, "--steps", "1", "--targets", "q_proj,v_proj")) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj"]
    _, adapters = load_adapter(out, CFG)  # selected as PEFT selects them
    assert sorted(p.rsplit(".", 1)[-1] for p in adapters) == ["q_proj"] * 2 + ["v_proj"] * 2
    capsys.readouterr()
    bad = train_args(model_dir, data, tmp_path / "o", "--targets", "q_proj,qproj")
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert "LoraConfig.targets: 'qproj' matches no module of this llama model" in err
    assert "gate_proj" in err and "all-linear" in err
    assert not (tmp_path / ".o.run").exists()


def test_flags_that_would_do_nothing_are_errors(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_chat_data(tmp_path / "chat.jsonl", n=8)
    base = ["train", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "o")]
    assert main([*base, "--method", "full", "--rank", "4"]) == 2
    assert "train: --rank sets the LoRA adapters, and --method full" in capsys.readouterr().err
    conf = tmp_path / "c.toml"
    conf.write_text('method = "full"\nuse_rslora = true\n')
    assert main([*base, "--config", str(conf)]) == 2
    assert "train: --use-rslora sets the LoRA adapters" in capsys.readouterr().err
    conf.write_text('method = "full"\n[lora]\nrank = 4\n')
    assert main([*base, "--config", str(conf)]) == 2
    assert "train: --rank sets the LoRA adapters" in capsys.readouterr().err
    assert main([*base, "--eval-interval", "5"]) == 2
    assert "--eval-interval 5 needs --eval-split > 0" in capsys.readouterr().err
    assert main([*base, "--eval-split", "0.01"]) == 2
    assert "--eval-split 0.01 of 8 examples holds out none" in capsys.readouterr().err
    nf4 = tmp_path / "nf4"
    assert main(["quantize", "--model", str(model_dir), "--out", str(nf4)]) == 0
    for method in ("lora", "full"):
        args = ["train", "--model", str(nf4), "--data", str(data), "--out", str(tmp_path / "o")]
        assert main([*args, "--method", method]) == 2
        err = capsys.readouterr().err
        assert f"a 4-bit (NF4) checkpoint; --method {method} needs the float checkpoint" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.run").exists()


@pytest.mark.slow
def test_float64_runs_in_64_bit_mode(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--dtype float64 switches JAX to 64-bit mode for the run only; its first loss is the
    float32 run's to float32 rounding, but not bit for bit."""
    data = write_chat_data(tmp_path / "chat.jsonl", n=8)
    losses = {}
    for dtype in ("float32", "float64"):
        out = tmp_path / dtype
        flags = ("--steps", "1", "--dtype", dtype, "--param-dtype", dtype)
        assert main(train_args(model_dir, data, out, *flags)) == 0
        losses[dtype] = json.loads((out / "metrics.jsonl").read_text())["loss"]
    assert losses["float64"] == pytest.approx(losses["float32"], rel=1e-5)
    assert losses["float64"] != losses["float32"]
    assert jnp.zeros(1).dtype == jnp.float32  # the process is back in 32-bit mode


def interrupt_before_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make a run stop after its last checkpoint, before --out is written."""

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("jax_impl.apps.train.plot_loss", stop)


def test_resume_refuses_a_changed_config_or_data(
    model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = write_chat_data(tmp_path / "chat.jsonl", n=8)
    out, work = tmp_path / "run", tmp_path / ".run.run"
    args = train_args(model_dir, data, out, "--steps", "3")
    with monkeypatch.context() as m:
        interrupt_before_out(m)
        with pytest.raises(KeyboardInterrupt):
            main(args)
    assert not out.exists()
    assert checkpoint_steps(work)[-1] == 3
    recorded = (work / "train_config.json").read_bytes()
    assert main([*args, "--resume", "--lr", "1e-3", "--warmup-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "--resume: lr changed from 0.03 to 0.001; warmup_steps changed from 0 to 1" in err
    text = data.read_text()
    data.write_text(text + text.splitlines()[0] + "\n")
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    size = len(text.encode())
    assert f"data file {data} changed (size {size} -> " in err and "sha256 " in err
    assert (work / "train_config.json").read_bytes() == recorded  # not rewritten
    data.write_text(text)
    assert main([*args, "--resume"]) == 0
    summary = last_json(capsys)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert summary["final_train_loss"] == rows[-1]["loss"]
    assert (out / "train_config.json").read_bytes() == recorded  # the run as first started
    assert json.loads(recorded)["resume"] is False


def test_metrics_count_processed_and_loss_tokens(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One epoch: the tokens of metrics.jsonl add up to every token of the encoded file,
    the loss tokens to its targets; the bar shows both rates; peak memory is reported."""
    from jax_impl.train.data import encode_file

    data = write_chat_data(tmp_path / "chat.jsonl", n=12)
    out = tmp_path / "run"
    assert main(train_args(model_dir, data, out, "--epochs", "1")) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert "tok_s=" in captured.err and "loss_tok_s=" in captured.err  # the progress bar
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    encoded, _, _, _ = encode_file(model_dir, data, CFG.vocab_size, CFG.max_seq_len)
    assert sum(r["tokens"] for r in rows) == sum(len(e.input_ids) for e in encoded)
    assert sum(r["loss_tokens"] for r in rows) == sum(int((e.labels >= 0).sum()) for e in encoded)
    assert all(r["tokens"] > r["loss_tokens"] > 0 for r in rows)  # prompts are masked
    assert all(r["tokens_per_s"] > r["loss_tokens_per_s"] > 0 for r in rows)
    assert summary["peak_memory_source"] in ("device", "process_rss")
    if summary["peak_memory_source"] == "process_rss":
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        assert 2**20 < summary["peak_memory_bytes"] <= rss


def test_help_lists_every_flag_with_its_choices(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse
    import dataclasses

    from jax_impl.apps.cli import add_flags, build_parser, leaves

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        for action in sub._actions:
            assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)
    with pytest.raises(SystemExit) as stop:
        main(["train", "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    flags = leaves(TrainConfig)  # every leaf field of the nested configs
    assert {leaf.path[0] for leaf in flags} >= {"lora", "optim", "engine", "data_config"}
    for leaf in flags:
        assert leaf.flag in text, leaf.path
    for flag in (
        "--method {full,lora,qlora}",
        "--dtype {auto,float32,bfloat16,float64}",
        "--param-dtype {float32,bfloat16,float64}",
        "--remat {auto,none,full,dots,attn_out}",
        "--attention {auto,cudnn,xla,einsum}",
        "--offload-optimizer, --no-offload-optimizer",
        "--mesh AXES",
        "--coordinator HOST:PORT",
        "--nf4-blocksize {32,64,128,256,512,1024,2048,4096}",
        "--double-quant, --no-double-quant",
        "--on-overflow {truncate,error}",
        "--packing, --no-packing",
        "--rank N",
        "--warmup-steps N",
        "--use-rslora, --no-use-rslora",
        "--lora-seed N",
    ):
        assert flag in text, flag
    assert "--quantize" not in text  # --method qlora decides it
    assert "(required)" not in text and "None" not in text
    entries = text.split("\n  --")[1:]  # one per flag
    assert len(entries) == len(flags) + 1  # and --config
    assert all(e.count("default") == 1 for e in entries[1:]), entries  # a help line, a default
    assert "(default: the model's context, at most 512)" in " ".join(text.split())
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    assert "output model directory (required)" in " ".join(capsys.readouterr().out.split())

    @dataclasses.dataclass(frozen=True)
    class Undocumented:
        size: int = 3

    with pytest.raises(TypeError, match="Undocumented.size: no metadata"):
        add_flags(argparse.ArgumentParser(), Undocumented)


def test_generate_command_gives_the_spec_greedy_text(
    model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from jax_impl.train.data import load_tokenizer
    from ref_numpy.formats.hf import load_model
    from ref_numpy.generate import generate

    prompt = "hello 12+34?"
    assert (
        main(["generate", "--model", str(model_dir), "--prompt", prompt, "--max-new-tokens", "6"])
        == 0
    )
    got = capsys.readouterr().out[:-1]  # print adds one newline
    tok = load_tokenizer(model_dir)
    cfg, params = load_model(model_dir, dtype=np.float64)
    ids = np.asarray([[tok.bos_id, *tok.encode(prompt)]])
    new = [int(t) for t in generate(params, cfg, ids, 6, eos_id=tok.eos_id)[0, ids.shape[1] :]]
    if tok.eos_id in new:
        new = new[: new.index(tok.eos_id)]
    assert got == tok.decode(new)
    assert (
        main(
            [
                "generate",
                "--model",
                str(model_dir),
                "--prompt",
                prompt,
                "--chat",
                "--temperature",
                "0.8",
                "--top-k",
                "5",
                "--seed",
                "1",
            ]
        )
        == 0
    )


@pytest.mark.slow
def test_qlora_block_size_and_double_quant_are_flags(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--nf4-blocksize and --no-double-quant reach the NF4 base the adapters train beside,
    and train_config.json and summary.json record them."""
    from jax_impl.model import to_spec
    from jax_impl.train.checkpoint import load_pretrained
    from ref_numpy.nf4 import NF4Tensor

    data = write_chat_data(tmp_path / "chat.jsonl", n=8)
    losses = {}
    for blocksize, dq in ((128, False), (64, True)):
        out = tmp_path / f"q{blocksize}"
        flags = ["--method", "qlora", "--steps", "2", "--nf4-blocksize", str(blocksize)]
        flags.append("--double-quant" if dq else "--no-double-quant")
        assert main(train_args(model_dir, data, out, *flags)) == 0
        summary = last_json(capsys)
        engine = json.loads((out / "train_config.json").read_text())["engine"]
        assert (engine["nf4_blocksize"], engine["double_quant"], engine["quantize"]) == (
            blocksize,
            dq,
            True,
        )
        assert (summary["nf4_blocksize"], summary["double_quant"]) == (blocksize, dq)
        _, model = load_pretrained(model_dir, None, EngineConfig(**engine), adapter_dir=out)
        q = to_spec(model)["layers"][0]["attn"]["q_proj"]["kernel"]  # the NF4 state trained on
        assert isinstance(q, NF4Tensor) and (q.blocksize, q.double_quant) == (blocksize, dq)
        assert q.absmax.size == CFG.d_model * CFG.d_model // blocksize
        losses[blocksize] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    # a different quantization of the same base gives a (slightly) different first loss
    assert losses[128] != losses[64]
    assert losses[128] == pytest.approx(losses[64], rel=0.05)


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, flags, want",
    [
        ("qlora", (), ("full", "scan")),  # trained for memory, one layer dequantized at a time
        ("qlora", ("--remat", "none"), ("none", "unroll")),  # the fast step, asked for
        ("lora", (), ("none", "unroll")),
    ],
)
def test_qlora_recomputes_its_blocks_unless_told_otherwise(
    model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    method: str,
    flags: tuple[str, ...],
    want: tuple[str, str],
) -> None:
    data = write_chat_data(tmp_path / "chat.jsonl", n=8)
    out = tmp_path / "run"
    args = train_args(model_dir, data, out, "--steps", "1", "--dtype", "bfloat16")
    args[args.index("--method") + 1] = method
    assert main([*args, *flags]) == 0
    # the suite runs as on a CPU without bf16 units (QLORA_SPEC_CPU_BF16=0): the run says so
    assert "--dtype bfloat16: this CPU has no bf16 matrix units" in capsys.readouterr().err
    engine = json.loads((out / "summary.json").read_text())["engine"]
    assert (engine["remat"], engine["layer_loop"]) == want
