"""The embedded default: ``qlora-spec train`` with no arguments, and a short ``qlora-spec
demo`` in which LoRA and QLoRA fine-tuning beat zero- and few-shot prompting of the base."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from jax_impl.apps.cli import build_parser, main, train_config
from jax_impl.apps.demo import (
    BASE,
    RECIPE,
    TASK_TRAIN,
    DemoConfig,
    answer,
    finetune,
    recipe,
    run_demo,
    table,
)
from jax_impl.apps.train import leaves, run
from ref_numpy.config import LoraConfig, attn_shapes, mlp_shapes
from ref_numpy.formats import hf as hf_io

# The fast version: fewer steps and held-out examples than the full demo's.
FAST_STEPS, FAST_HELDOUT = 200, 50


def test_train_without_model_and_data_is_the_bundled_qlora_recipe() -> None:
    tc = train_config(build_parser().parse_args(["train"]))
    assert (tc.model, tc.data, tc.out, tc.method) == (
        str(BASE),
        str(TASK_TRAIN),
        "qlora-spec-train",
        "qlora",
    )
    recorded = leaves(dataclasses.asdict(tc))  # every leaf field by its config-file key
    assert all(recorded[k] == v for k, v in RECIPE.items())
    assert tc.lora == LoraConfig()  # the recipe keeps the one LoRA default set
    tc = train_config(build_parser().parse_args(["train", "--method", "lora", "--steps", "3"]))
    assert (tc.model, tc.method, tc.steps, tc.optim.lr) == (str(BASE), "lora", 3, RECIPE["lr"])
    assert recipe("lora", 3, Path("o")) == dataclasses.replace(tc, out="o")
    with pytest.raises(ValueError, match="--model is required"):
        train_config(build_parser().parse_args(["train", "--data", "d.jsonl"]))


def test_demo_flags_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--heldout", "201"]) == 2
    assert "DemoConfig.heldout: expected 1 <= heldout <= 200, got 201" in capsys.readouterr().err
    assert main(["demo", "--steps", "0"]) == 2
    assert "DemoConfig.steps" in capsys.readouterr().err


def test_answer_is_the_first_line_stripped() -> None:
    assert answer(" 2021-03-05\n\nAda moved") == "2021-03-05"
    assert answer("") == ""


@pytest.mark.slow
def test_train_with_no_arguments_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--steps", "2"]) == 0
    out = tmp_path / "qlora-spec-train"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == LoraConfig().rank and config["base_model_name_or_path"] == str(BASE)
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    # the adapter knows its base: generate and eval need no --model
    assert main(["generate", "--adapter", str(out), "--method", "qlora", "--prompt", "Ada"]) == 0
    assert (
        main(["eval", "--adapter", str(out), "--method", "qlora", "--data", str(TASK_TRAIN)]) == 0
    )


def test_model_comes_from_the_adapter_or_is_required(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["generate", "--prompt", "x"]) == 2
    assert "--model is required (or an --adapter" in capsys.readouterr().err
    assert main(["generate", "--adapter", str(tmp_path), "--prompt", "x"]) == 2
    assert "no adapter config" in capsys.readouterr().err
    (tmp_path / "adapter_config.json").write_text('{"base_model_name_or_path": "org/model"}')
    assert main(["eval", "--adapter", str(tmp_path), "--data", "d.jsonl"]) == 2
    assert "'org/model' is not a local directory; pass --model" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_demo_fine_tune_is_the_train_command(tmp_path: Path, method: str) -> None:
    """The demo trains by ``fit`` in memory; ``qlora-spec train`` with the same recipe is a job
    around the same steps, so both give the same losses and the same adapter, bit for bit."""
    model, seconds = finetune(method, DemoConfig(steps=3), tmp_path / "demo")
    run(recipe(method, 3, tmp_path / "train"), progress=False)
    demo = load_file(tmp_path / "demo" / "adapter_model.safetensors")
    train = load_file(tmp_path / "train" / "adapter_model.safetensors")
    assert sorted(demo) == sorted(train) and len(demo) > 0
    for name in demo:
        np.testing.assert_array_equal(demo[name], train[name], err_msg=name)
    losses = [
        [json.loads(line)["loss"] for line in (tmp_path / d / "metrics.jsonl").open()]
        for d in ("demo", "train")
    ]
    assert len(losses[0]) == 3 and losses[0] == losses[1]
    assert model.lora is not None and seconds > 0


@pytest.mark.slow
def test_fine_tuning_beats_prompting(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    results = run_demo(
        DemoConfig(out=str(out), steps=FAST_STEPS, heldout=FAST_HELDOUT), log=lambda _: None
    )
    by = {r.method: r for r in results}
    assert list(by) == ["zero-shot prompt", "3-shot prompt", "LoRA", "QLoRA"]
    prompting = max(by["zero-shot prompt"].exact_match, by["3-shot prompt"].exact_match)
    for tuned in (by["LoRA"], by["QLoRA"]):
        assert tuned.exact_match >= prompting + 0.25, table(results)
        assert len(tuned.answers) == FAST_HELDOUT

    cfg = hf_io.load_config(BASE)
    shapes = [*attn_shapes(cfg).values(), *mlp_shapes(cfg).values()]
    adapters = cfg.n_layers * sum(LoraConfig().rank * (i + o) for i, o in shapes)
    assert by["LoRA"].trainable_params == by["QLoRA"].trainable_params == adapters
    assert by["zero-shot prompt"].trainable_params == 0
    float_bytes = 4 * hf_io.n_params(cfg)
    assert by["zero-shot prompt"].base_weight_bytes == float_bytes
    assert by["LoRA"].base_weight_bytes == float_bytes
    assert by["QLoRA"].base_weight_bytes < 0.45 * float_bytes  # 4-bit projections

    report = (out / "report.md").read_text()
    assert table(results) in report
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for method in ("lora", "qlora"):
        assert (out / method / "adapter_model.safetensors").is_file()
    saved = json.loads((out / "results.json").read_text())
    assert [r["exact_match"] for r in saved["results"]] == [r.exact_match for r in results]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # nothing half-written
