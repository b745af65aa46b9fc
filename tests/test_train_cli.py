"""``qlora-spec train`` and ``eval`` end to end on a small model and data the test builds."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jax_impl.cli import main
from jax_impl.data import save_byte_tokenizer
from ref_numpy.config import llama_config
from ref_numpy.hf_io import save_model
from ref_numpy.model import init_params
from ref_numpy.peft_io import load_adapter

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
        "--max-length",
        "128",
        "--seed",
        "3",
        "--dropout",
        "0.1",
        *extra,
    ]


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
    from jax_impl.cli import build_parser, train_config

    conf = tmp_path / "c.toml"
    conf.write_text(
        f'model = "{model_dir}"\ndata = "d.jsonl"\nout = "o"\nrank = 16\n'
        'targets = ["q_proj", "v_proj"]\nlr = 1e-3\n'
    )
    tc = train_config(build_parser().parse_args(["train", "--config", str(conf), "--rank", "2"]))
    assert tc.rank == 2 and tc.lr == 1e-3 and tc.targets == ("q_proj", "v_proj")
    yml = tmp_path / "c.yaml"
    yml.write_text("model: m\ndata: d.jsonl\nout: o\nmethod: full\nmax-length: 64\n")
    tc = train_config(build_parser().parse_args(["train", "--config", str(yml)]))
    assert tc.method == "full" and tc.max_length == 64
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
    cmd = [sys.executable, "-m", "jax_impl.cli"]
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
    state = json.loads((tmp_path / ".run.run" / "checkpoint" / "state.json").read_text())
    assert state["step"] == step - 1  # the last good step


def test_train_config_is_validated(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_chat_data(tmp_path / "chat.jsonl", n=4)
    for flags, message in [
        (["--method", "foo"], "TrainConfig.method: expected one of"),
        (["--dtype", "float8"], "TrainConfig.dtype: expected one of"),
        (["--checkpoint-interval", "0"], "TrainConfig.checkpoint_interval: expected >= 1"),
        (["--max-length", "4096"], "--max-length 4096 exceeds the model's"),
    ]:
        assert main(train_args(model_dir, data, tmp_path / "o", *flags)) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "o").exists() and not (tmp_path / ".o.run").exists()


def test_generate_command_gives_the_spec_greedy_text(
    model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from jax_impl.data import load_tokenizer
    from ref_numpy.generate import generate
    from ref_numpy.hf_io import load_model

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
