"""``qlora-spec train --objective dpo`` and ``eval --objective dpo`` end to end on a small
model and pairs the test builds: every method, resume, TRL's metric names, bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jax_impl.apps.cli import main
from jax_impl.train.data import save_byte_tokenizer
from ref_numpy.formats.hf import save_model
from ref_numpy.model import init_params
from tests.test_train_cli import CFG

TRL_METRICS = {
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("m") / "base"
    save_model(init_params(CFG, np.random.default_rng(0), std=0.1), CFG, out)
    save_byte_tokenizer(out)
    return out


def write_pairs(path: Path, n: int = 12) -> Path:
    rng = np.random.default_rng(2)
    rows = []
    for _ in range(n):
        a, b = (int(x) for x in rng.integers(10, 50, size=2))
        rows.append({"prompt": f"{a}+{b}=", "chosen": f"{a + b}", "rejected": f"{a + b + 1}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def dpo_args(model_dir: Path, data: Path, out: Path, method: str, *extra: str) -> list[str]:
    return [
        "train",
        "--objective",
        "dpo",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--out",
        str(out),
        "--method",
        method,
        *(() if method == "full" else ("--rank", "4")),
        "--lr",
        "1e-2",
        "--batch-size",
        "2",
        "--max-length",
        "32",
        "--beta",
        "0.5",
        *extra,
    ]


def metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def stop_after_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Make a run die right after logging ``step`` (its checkpoints as they were)."""
    from jax_impl.apps import train

    made = train.log_metrics

    def log_metrics(log: Any) -> Any:
        hook = made(log)

        def stopping(trainer: Any, batch: Any, m: dict) -> None:
            hook(trainer, batch, m)
            if m["step"] == step:
                raise KeyboardInterrupt

        return stopping

    monkeypatch.setattr(train, "log_metrics", log_metrics)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "extra"),
    [("lora", ()), ("qlora", ("--loss-type", "ipo")), ("full", ("--precompute-ref",))],
)
def test_dpo_trains_and_resumes_bitwise(
    model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    method: str,
    extra: tuple[str, ...],
) -> None:
    """A run stopped after step 3 (checkpoint at 2) and resumed writes the same adapter (or
    weights) and metrics as one that ran through; the metrics carry TRL's names, the chosen
    reward rises above the rejected one, and the output is what an SFT run writes."""
    data = write_pairs(tmp_path / "pairs.jsonl")
    common = ("--steps", "4", "--checkpoint-interval", "2", "--eval-split", "0.2", *extra)
    whole = tmp_path / "whole"
    assert main(dpo_args(model_dir, data, whole, method, *common)) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = metrics(whole)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert TRL_METRICS <= set(rows[0]) and rows[0]["pairs"] == 2
    if method != "full" or "--precompute-ref" in extra:  # the first step starts at the reference
        assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert all(r["loss"] != rows[0]["loss"] for r in rows[1:])
    assert 0.0 <= summary["eval_rewards/accuracies"] <= 1.0
    assert summary["pairs"] == 12 and summary["eval_pairs"] == 2
    weights = "model.safetensors" if method == "full" else "adapter_model.safetensors"

    cut = tmp_path / "cut"
    with monkeypatch.context() as m:
        stop_after_step(m, 3)
        with pytest.raises(KeyboardInterrupt):
            main(dpo_args(model_dir, data, cut, method, *common))
    assert not cut.exists()
    assert main(dpo_args(model_dir, data, cut, method, *common, "--resume")) == 0
    assert (cut / weights).read_bytes() == (whole / weights).read_bytes()
    timeless = [{k: v for k, v in r.items() if not k.endswith("_per_s")} for r in rows]
    assert [{k: v for k, v in r.items() if not k.endswith("_per_s")} for r in metrics(cut)] == (
        timeless
    )


def test_dpo_eval_agrees_across_backends(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``eval --objective dpo`` of a trained adapter: one JSON line with the loss and TRL's
    metrics over every pair, the jax engine equal to the numpy spec."""
    data = write_pairs(tmp_path / "pairs.jsonl", n=6)
    run = tmp_path / "run"
    assert main(dpo_args(model_dir, data, run, "lora", "--steps", "3")) == 0
    capsys.readouterr()
    got = {}
    for backend in ("jax", "numpy"):
        args = ["eval", "--objective", "dpo", "--adapter", str(run), "--data", str(data)]
        assert main([*args, "--beta", "0.5", "--max-length", "32", "--backend", backend]) == 0
        got[backend] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert TRL_METRICS <= set(got["jax"]) and got["jax"]["pairs"] == 6
    for k in TRL_METRICS:
        assert got["jax"][k] == pytest.approx(got["numpy"][k], rel=1e-5, abs=1e-6), k
    assert got["jax"]["rewards/margins"] > 0
    assert main(["eval", "--objective", "dpo", "--model", str(model_dir), "--data", str(data)]) == 2
    assert "a reference is needed: --adapter" in capsys.readouterr().err


AT = r"pairs.jsonl:2: "
BAD = [
    ({"prompt": "1+1=", "chosen": "2"}, (), AT + "field 'rejected' is missing"),
    ({"prompt": "1+1=", "chosen": "", "rejected": "3"}, (), AT + "field 'chosen' is empty"),
    ({"prompt": "1+1=", "chosen": "2", "rejected": "2"}, (), AT + "fields 'chosen' and 'rejected'"),
    ({"prompt": "x" * 40, "chosen": "2", "rejected": "3"}, (), AT + r"the prompt has \d+ tokens"),
    (None, ("--beta", "0"), r"DPOConfig.beta \(--beta\): expected > 0, got 0.0"),
    (None, ("--loss-type", "ipo", "--label-smoothing", "0.1"), r"\(--label-smoothing\)"),
    ("sft", (), r"sft.jsonl:1: a supervised example \(prompt_completion\), not a preference"),
]


@pytest.mark.parametrize(("row", "flags", "message"), BAD)
def test_bad_input_is_named_and_nothing_is_written(
    model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    row: Any,
    flags: tuple[str, ...],
    message: str,
) -> None:
    data = write_pairs(tmp_path / "pairs.jsonl", n=3)
    if row == "sft":
        data = tmp_path / "sft.jsonl"
        data.write_text(json.dumps({"prompt": "1+1=", "completion": "2"}) + "\n")
    elif row is not None:
        lines = data.read_text().splitlines()
        data.write_text("\n".join([lines[0], json.dumps(row), *lines[1:]]) + "\n")
    out = tmp_path / "out"
    assert main(dpo_args(model_dir, data, out, "lora", "--steps", "1", *flags)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qlora-spec train: error: ")
    assert re.search(message, err[0]), err[0]
    written = {p.name for p in tmp_path.iterdir()}
    assert written == {"pairs.jsonl", data.name}  # neither --out nor its work directory
