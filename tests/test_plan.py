"""``qlora-spec plan``: the formula held to XLA's compiled memory analysis, and the command.

The formula (``make_plan``) is compared with ``compiled_step``, XLA's own memory analysis of
the real training step compiled for this process's backend on abstract arguments, for three
shapes and every method and remat policy, float32 on the CPU: within 10% of the compiled
total (arguments + outputs + temporaries). The shapes differ where the terms differ: a
vocabulary-heavy narrow model (the logits chunk dominates), a grouped-query model with three
layers (the saved activations dominate), and the CPU benchmark's block (weights and the MLP
dominate). A perturbation shows the comparison can fail: planning a longer row than the
compiled step ran moves the formula out of the band.
"""

from __future__ import annotations

import json
import math

import jax
import pytest

from jax_impl.apps.cli import main
from jax_impl.apps.plan import (
    MODEL_SIZES,
    PlanConfig,
    compiled_step,
    make_plan,
    parse_bytes,
    plan_mesh,
    run_plan,
)
from jax_impl.model import REMAT_POLICIES, EngineConfig
from ref_numpy.config import LoraConfig, ModelConfig, llama_config
from ref_numpy.formats.hf import config_to_hf

ALL_SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHAPES: dict[str, tuple[ModelConfig, int, int]] = {  # config, rows, positions
    "narrow": (
        llama_config(
            vocab_size=1024,
            d_model=128,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            d_ff=352,
            max_seq_len=512,
        ),
        4,
        128,
    ),
    "gqa": (
        llama_config(
            vocab_size=2048,
            d_model=256,
            n_layers=3,
            n_heads=8,
            n_kv_heads=2,
            d_ff=704,
            max_seq_len=512,
        ),
        2,
        256,
    ),
    "bench": (
        llama_config(
            vocab_size=8192,
            d_model=512,
            n_layers=2,
            n_heads=8,
            n_kv_heads=4,
            d_ff=1376,
            max_seq_len=512,
        ),
        2,
        256,
    ),
}
REMATS = ("none", *REMAT_POLICIES)
LORA = LoraConfig(rank=8, alpha=16.0, targets=ALL_SEVEN)
CASES = [
    *(
        (shape, method, remat)
        for shape in SHAPES
        for method in ("lora", "qlora")
        for remat in REMATS
    ),
    *(("narrow", "full", remat) for remat in REMATS),
    *(("bench", "full", remat) for remat in ("none", "full")),
]
TOLERANCE = 0.10


def _engine(method: str, remat: str) -> EngineConfig:
    eng = EngineConfig(dtype="float32", remat=remat, quantize=method == "qlora")  # type: ignore[arg-type]
    return eng.resolve(SHAPES["narrow"][0], backend="cpu")


def _needs_cpu() -> None:
    if jax.default_backend() != "cpu":
        pytest.skip(f"the CPU's compiled analysis; JAX's backend is {jax.default_backend()}")


@pytest.mark.slow
@pytest.mark.parametrize(("shape", "method", "remat"), CASES)
def test_formula_within_ten_percent_of_xla(shape: str, method: str, remat: str) -> None:
    _needs_cpu()
    cfg, rows, length = SHAPES[shape]
    lora = None if method == "full" else LORA
    eng = _engine(method, remat)
    plan = make_plan(cfg, lora, eng, rows, length, platform="cpu")
    xla = compiled_step(cfg, lora, eng, rows, length)
    assert abs(plan.peak / xla.total - 1) <= TOLERANCE, (plan.peak, xla)
    state = sum(t.bytes for t in plan.terms if t.phase == "resident" and "batch" not in t.name)
    ids = 2 * rows * length * 4  # input ids and labels
    assert state <= xla.arguments <= state + ids + 2**12  # the weights, adapters and moments
    longer = make_plan(cfg, lora, eng, rows, 2 * length, platform="cpu")
    assert abs(longer.peak / xla.total - 1) > TOLERANCE  # the band is narrow enough to miss


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_offloaded_moments_leave_the_device(method: str) -> None:
    """On a GPU the moments leave device memory for the host; on this CPU both are one
    memory, so the formula's device and host bytes together are XLA's total."""
    _needs_cpu()
    cfg, rows, length = SHAPES["gqa"]
    eng = _engine(method, "full")
    kept = make_plan(cfg, LORA, eng, rows, length, platform="cpu")
    moved = make_plan(cfg, LORA, eng, rows, length, platform="cpu", offload_optimizer=True)
    moments = next(t.bytes for t in kept.terms if t.name == "AdamW moments")
    assert moments == 2 * next(t.bytes for t in kept.terms if t.name == "adapters") > 0
    assert moved.host == moments and kept.peak - moved.peak == moments
    xla = compiled_step(cfg, LORA, eng, rows, length, offload_optimizer=True)
    assert abs((moved.peak + moved.host) / xla.total - 1) <= TOLERANCE


def test_a_mesh_divides_the_state_and_the_batch() -> None:
    cfg = llama_config(
        vocab_size=4096,
        d_model=256,
        n_layers=2,
        n_heads=8,
        n_kv_heads=4,
        d_ff=704,
        max_seq_len=512,
    )
    eng = EngineConfig(remat="full", quantize=True).resolve(cfg, backend="gpu")
    one = make_plan(cfg, LORA, eng, 8, 256)
    terms = {t.name: t.bytes for t in one.terms}
    for spec, devices in (("fsdp=4", 4), ("data=2,fsdp=2", 4), ("tensor=2", 2)):
        mesh = plan_mesh(spec)
        split = make_plan(cfg, LORA, eng, 8, 256, mesh=mesh)
        assert split.devices == devices
        got = {t.name: t.bytes for t in split.terms}
        # NF4's bytes are split over fsdp (sharding.RULES), the rows over data x fsdp, the
        # float weights over fsdp and tensor
        assert got["NF4 codes"] == terms["NF4 codes"] // mesh.fsdp
        assert got["base weights"] <= terms["base weights"] / (mesh.fsdp * mesh.tensor) * 1.01
        rows = mesh.data * mesh.fsdp
        assert got["saved activations"] <= terms["saved activations"] / rows * 1.01
        assert ("gathered block" in got) == (mesh.fsdp > 1)
        assert split.peak < one.peak
    with pytest.raises(ValueError, match=r"--batch-size 6: does not divide over the 4 devices"):
        make_plan(cfg, LORA, eng, 6, 256, mesh=plan_mesh("fsdp=4"))


def test_named_shapes_and_the_qlora_saving() -> None:
    """8B QLoRA's NF4 codes are half a byte per projection weight, and QLoRA plans well below
    LoRA's bf16 base at the same shape."""
    reports = {
        method: run_plan(
            PlanConfig(
                model_size="8b", method=method, batch_size=2, engine=EngineConfig(remat="full")
            )
        )
        for method in ("lora", "qlora")
    }
    s = MODEL_SIZES["8b"]
    d, f, kv = s["D"], s["F"], s["D"] // s["N"] * s["K"]
    proj = s["L"] * (2 * d * d + 2 * d * kv + 3 * d * f)
    terms = {t["name"]: t["bytes"] for t in reports["qlora"]["terms"]}
    assert terms["NF4 codes"] == proj // 2
    lora_terms = {t["name"]: t["bytes"] for t in reports["lora"]["terms"]}
    assert lora_terms["base weights"] - terms["base weights"] == 2 * proj  # bf16 kernels
    assert reports["qlora"]["peak"] < reports["lora"]["peak"] - 1.25 * proj
    assert reports["qlora"]["engine"]["dtype"] == "bfloat16"  # resolved for a GPU
    assert reports["qlora"]["source"] == "formula"


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("24GiB", 24 * 2**30),
        ("80GB", 80 * 10**9),
        ("141 gb", 141 * 10**9),
        ("512MiB", 2**29),
        ("1e9", 10**9),
        ("1.5TiB", 3 * 2**39),
    ],
)
def test_device_memory_sizes(text: str, want: int) -> None:
    assert parse_bytes(text) == want


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(["plan", *argv])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model-size", "3b"], r"--model-size: unknown shape '3b'; known: tiny, 1b, 8b, 70b"),
        (["--batch-size", "3", "--mesh", "fsdp=2"], r"--batch-size 3: does not divide over"),
        (["--mesh", "fsdp=two"], r"--mesh: 'fsdp=two': the size must be an integer"),
        (["--device-memory", "lots"], r"--device-memory: 'lots' is not a size"),
        (["--device-memory=-4GB"], r"--device-memory: '-4GB' is not a size"),
        (["--model", "x", "--model-size", "1b"], r"give one of them, not both"),
        (["--model", "no/such/dir"], r"no/such/dir/config.json: no such file"),
        (["--method", "full", "--rank", "4"], r"--rank sets the LoRA adapters"),
    ],
)
def test_bad_arguments_get_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = _run(capsys, *argv)
    assert status == 2 and out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("qlora-spec plan: error: ")
    assert __import__("re").search(message, err), err


@pytest.mark.slow
def test_the_command_on_this_backend(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    """A plan for the backend this process has reads XLA's compiled analysis, says whether it
    fits, and exits 1 when it does not; a model directory and its config.json plan alike."""
    _needs_cpu()
    args = ["--model-size", "tiny", "--platform", "cpu", "--batch-size", "2", "--max-length", "64"]
    status, out, _ = _run(capsys, *args, "--device-memory", "1GiB", "--json")
    report = json.loads(out)
    assert status == 0 and report["fits"] is True
    assert report["source"].startswith("XLA's compiled memory analysis")
    assert report["peak"] == report["compiled"]["total"]
    assert abs(report["formula_peak"] / report["peak"] - 1) <= TOLERANCE
    status, out, _ = _run(capsys, *args, "--device-memory", "1MiB")
    assert status == 1
    assert "does NOT fit in 0.00 GiB" in out.splitlines()[-1]
    for name in ("base weights", "NF4 codes", "adapters", "AdamW moments", "saved activations"):
        assert f"  {name} " in out
    cfg = SHAPES["narrow"][0]  # a context of 512 positions
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(cfg)))
    dirs = [str(tmp_path), str(tmp_path / "config.json")]
    peaks = [run_plan(PlanConfig(model=d, max_length=128))["peak"] for d in dirs]
    assert peaks[0] == peaks[1] > 0
    with pytest.raises(ValueError, match=r"--max-length 1024: longer than .*config.json's context"):
        run_plan(PlanConfig(model=dirs[0], max_length=1024))
    assert math.isfinite(peaks[0])
