"""The GPU benchmark script runs anywhere: its FLOP formula counts the model it builds, and
its tiny shape trains on a CPU in a fresh process with the engine's options."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from bench.common import TARGETS, engine_config
from bench.gpu_train import ALPHA, RANK, SHAPES, build_model, model_flops_per_token
from jax_impl.model import EngineConfig, Model
from ref_numpy.config import LoraConfig

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("size", ["tiny", "1b", "8b"])
def test_flop_formula_counts_the_built_model(size: str) -> None:
    """4 N + 6 r + 6 L T D, with N and r counted from the model itself: N every frozen matrix
    a token passes through (projection kernels and the head), r the adapters."""
    s = SHAPES[size]
    cfg = engine_config(s)
    lora = LoraConfig(rank=RANK, alpha=ALPHA, targets=TARGETS)
    model = nnx.eval_shape(lambda: Model(cfg, lora, EngineConfig(), rngs=nnx.Rngs(0)))
    n = r = 0
    for path, var in nnx.to_flat_state(nnx.state(model)):
        size_ = int(np.prod(var.get_value().shape))
        if path[-1] in ("lora_A", "lora_B"):
            r += size_
        elif path[-1] == "kernel":  # the seven projections per layer and lm_head
            n += size_
    assert not cfg.tie_embeddings and n > s["L"] * s["D"] ** 2
    want = 4 * n + 6 * r + 6 * s["L"] * s["T"] * s["D"]
    assert model_flops_per_token(s) == want


@pytest.mark.slow
def test_the_model_is_one_block_copied_to_every_layer() -> None:
    s = SHAPES["tiny"]
    cfg = engine_config(s, rope_theta=500000.0)
    lora = LoraConfig(rank=RANK, alpha=ALPHA, targets=TARGETS)
    model = build_model(cfg, lora, EngineConfig(quantize=True))
    packed = np.asarray(model.layers.mlp.down_proj.kernel.packed[...])
    assert packed.shape[0] == cfg.n_layers == 2
    np.testing.assert_array_equal(packed[0], packed[1])
    assert packed[0].any()
    ids = jax.numpy.zeros((1, 8), jax.numpy.int32)
    assert np.isfinite(np.asarray(model(ids))).all()


@pytest.mark.slow
def test_tiny_shape_runs_on_cpu_with_remat_and_offload() -> None:
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_train.py"), "--model-size", "tiny"]
    cmd += ["--methods", "qlora", "--remats", "attn_out", "--offload-optimizer", "--no-peer"]
    cmd += ["--warmup", "1", "--steps", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.strip()]
    head, run = lines[0], lines[1]
    assert (head["model_size"], head["offload_optimizer"], head["peer"]) == ("tiny", True, False)
    assert head["gflop_per_token"] == pytest.approx(model_flops_per_token(SHAPES["tiny"]) / 1e9)
    assert (run["side"], run["method"], run["remat"]) == ("engine", "qlora", "attn_out")
    assert run["offload_optimizer"] is True
    if jax.default_backend() == "cpu":
        assert (run["dtype"], run["attention"]) == ("float32", "einsum")
    assert len(run["times"]) == 2 and run["tokens_per_s"] > 0
    tokens = SHAPES["tiny"]["B"] * SHAPES["tiny"]["T"]
    assert run["tokens_per_s"] == pytest.approx(tokens / run["s_per_step"])
    flops = run["tokens_per_s"] * model_flops_per_token(SHAPES["tiny"]) / 1e12
    assert run["model_tflops_per_s"] == pytest.approx(flops)


@pytest.mark.slow
def test_the_gpu_check_runs_end_to_end_at_the_tiny_size(tmp_path: Path) -> None:
    """``bench/gpu_check.sh`` at ``--model-size tiny``: every step of the GPU command runs on
    this machine and lands in one JSON file, the plan's prediction beside every engine run."""
    out = tmp_path / "check"
    cmd = ["bash", str(ROOT / "bench" / "gpu_check.sh"), str(out), "--model-size", "tiny"]
    cmd += ["--steps", "1", "--no-peer", "--budget", "100000"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["skipped"] == []
    assert report["card"]["backend"] == jax.default_backend()
    tests = report["gpu_tests"]
    assert tests["exit_status"] == 0 and tests["tests"], tests
    if jax.default_backend() != "gpu":  # the cuDNN tests say why they did not run
        assert tests["tests"]["test_cudnn_attention_matches_einsum_in_bfloat16"] == "skipped"
    runs = [r for r in report["train"] if r.get("side") == "engine"]
    assert sorted((r["method"], r["remat"]) for r in runs) == [
        ("lora", "full"),
        ("lora", "none"),
        ("qlora", "full"),
        ("qlora", "none"),
    ]
    (big,) = [r for r in report["train_big"] if r.get("side") == "engine"]
    assert (big["method"], big["remat"], big["offload_optimizer"]) == ("qlora", "full", True)
    plans = report["plan_vs_measured"]
    assert len(plans) == 5
    for entry, run in zip(plans, [*runs, big], strict=True):
        assert (entry["method"], entry["remat"]) == (run["method"], run["remat"])
        plan = entry["plan"]
        assert plan["peak"] > 0 and plan["formula_peak"] > 0, entry
        assert plan["engine"]["dtype"] == run["dtype"]  # the plan resolved what the run ran
        if run["peak_bytes"] is None:  # a CPU reports no device peak
            assert "plan_over_measured" not in entry
        else:
            assert entry["plan_over_measured"] == plan["peak"] / run["peak_bytes"]
    assert (out / "gpu_check.log").read_text().rstrip().endswith(f"wrote {out / 'gpu_check.json'}")
