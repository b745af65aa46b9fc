"""LoRA / QLoRA training throughput on CPU: the engine against transformers + PEFT.

Each side trains the same Llama-shaped model (random weights), LoRA r=16 alpha=32 on all seven
projections, AdamW, on one fixed random batch, in a fresh process of its own; the two sides
alternate (engine first in odd rounds, the peer first in even ones) for ``--rounds`` rounds.
Every round's figures are printed as JSON lines, then the ratio engine / peer of tokens per
second of each round and their median. Shapes:

* ``default``: V=8192, D=512, F=1376, 4 layers, 8 heads over 4 kv heads, untied, batch 8 x 256.
* ``smollm2-135m``: SmolLM2-135M (V=49152, D=576, F=1536, 30 layers, 9 heads over 3 kv heads,
  tied embeddings), batch 4 x 128.

``--method qlora`` quantizes the frozen base to NF4 (double quant, block 64) on both sides:
the peer loads it through transformers' ``BitsAndBytesConfig`` with float32 compute.

``--remat`` says whether each side recomputes its blocks in the backward pass: the engine
through ``EngineConfig.remat`` (under bf16 on a CPU its blocks are then scanned), the peer
through transformers' gradient checkpointing (non-reentrant). ``auto``, the default, runs
each method as its library sets it up: LoRA without recomputation on both sides, QLoRA with it
on both, as ``EngineConfig.remat="auto"`` resolves and as PEFT's QLoRA preparation
(``prepare_model_for_kbit_training``, which the peer's QLoRA goes through) turns it on by
default. ``none`` and ``full`` set both sides.

``--prompt P`` makes the first P positions of every row a prompt, without loss (label -100 on
both sides), as instruction data is trained; by default every position counts.

``--dtype bf16`` (or ``bfloat16``) adds a bf16 pair to every round, as a CPU user with bf16
matrix units (AMX, AVX512-BF16) runs it: the engine with ``EngineConfig(dtype="bfloat16")``
(float32 adapters, AdamW state and loss), the peer under ``torch.autocast("cpu",
dtype=torch.bfloat16)``. Each round then runs four processes (engine and peer, float32 and
bf16) and prints both ratios, float32 / float32 and bf16 / bf16. The first line says which of
those units the CPU has (``cpu_flags``) and what ``dtype="auto"`` resolves to on it.

    python bench/cpu_train.py                       # needs the interop extra
    python bench/cpu_train.py --shape smollm2-135m --rounds 3
    python bench/cpu_train.py --dtype bf16 --method qlora
    python bench/cpu_train.py --dtype bf16 --method qlora --remat none
    python bench/cpu_train.py --prompt 128           # half of every row a prompt

The engine side runs under the settings ``qlora-spec`` gives itself (``jax_impl/cpu.py``: the
glibc tunable ``glibc.malloc.hugetlb=1``, and XLA's 512-bit vectors on a CPU with bf16 matrix
units), the peer in the environment as it is, as PEFT's users run it (under the tunable its
steps become bimodal on a 2-core AMD EPYC, 1.06-1.80 s against 1.16-1.29 s);
``--env-as-is`` runs the engine without them too. The first line prints both environments.

A peer figure far below what transformers + PEFT do on the machine (about 2,900 tokens/s for
the default shape on a 2-core Xeon) means a loaded machine, not a fast engine: the spread of
each side over the rounds is printed to show it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout

from bench.common import (  # noqa: E402
    TARGETS,
    add_dtype_option,
    engine_config,
    peer_model,
    run_dtypes,
)

SHAPES: dict[str, dict[str, Any]] = {
    "default": dict(V=8192, D=512, F=1376, L=4, N=8, K=4, H=64, tied=False, B=8, T=256),
    "smollm2-135m": dict(V=49152, D=576, F=1536, L=30, N=9, K=3, H=64, tied=True, B=4, T=128),
}


def timed(step: Callable[[], None], warmup: int, steps: int) -> list[float]:
    """Seconds of each of ``steps`` steps after ``warmup`` untimed ones (compilation)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def cpu_flags() -> list[str]:
    """The CPU's bf16 matrix features (AMX, AVX512-BF16) as /proc/cpuinfo names them."""
    from jax_impl import cpu

    return sorted(f for f in cpu.cpu_flags() if f.startswith(("amx", "avx512_bf16")))


def engine_side(
    s: dict[str, Any],
    method: str,
    dtype: str,
    remat: str,
    ids: np.ndarray,
    labels: np.ndarray,
    warmup: int,
    steps: int,
) -> dict:
    import jax
    from flax import nnx

    from jax_impl.model import EngineConfig, Model
    from jax_impl.train.trainer import OptimConfig, Trainer
    from ref_numpy.config import LoraConfig

    cfg = engine_config(s)
    lora = LoraConfig(rank=16, alpha=32.0, targets=TARGETS)
    eng = EngineConfig(quantize=method == "qlora", dtype=dtype, remat=remat)  # type: ignore[arg-type]
    model = Model(cfg, lora, eng, rngs=nnx.Rngs(0))
    trainer = Trainer.create(model, OptimConfig(lr=1e-4, total_steps=10_000, max_grad_norm=None))
    batch = {"input_ids": ids[None], "labels": labels[None]}
    times = timed(lambda: jax.block_until_ready(trainer.step(batch)["loss"]), warmup, steps)
    versions = {"jax": jax.__version__, "backend": jax.default_backend()}
    how = {"remat": model.eng.remat, "layer_loop": model.eng.layer_loop}  # as resolved
    return {"side": "engine", **versions, **how, "times": times}


def peer_side(
    s: dict[str, Any],
    method: str,
    dtype: str,
    remat: str,
    ids: np.ndarray,
    labels: np.ndarray,
    warmup: int,
    steps: int,
) -> dict:
    import peft
    import torch

    model = peer_model(s, method, "cpu", torch.float32)
    checkpointing = remat == "full" or (remat == "auto" and method == "qlora")
    kwargs = {"use_reentrant": False}
    if method == "qlora":
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs=kwargs
        )
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    lcfg = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(TARGETS))
    model = peft.get_peft_model(model, lcfg)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.from_numpy(ids.astype(np.int64))
    y = torch.from_numpy(labels.astype(np.int64))

    bf16 = dtype == "bfloat16"

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=x, labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = timed(step, warmup, steps)
    versions = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    versions["checkpointing"] = any(
        getattr(m, "gradient_checkpointing", False) for m in model.modules()
    )
    return {"side": "peer", **versions, "times": times}


def run_side(args: argparse.Namespace) -> None:
    """One side in this process: prints one JSON line."""
    s = SHAPES[args.shape]
    ids = np.random.default_rng(0).integers(0, s["V"], size=(s["B"], s["T"])).astype(np.int32)
    labels = ids.copy()
    labels[:, : args.prompt] = -100  # a prompt: no loss (IGNORE_INDEX on both sides)
    side = engine_side if args.side == "engine" else peer_side
    dtype = run_dtypes(args.dtype)[-1]
    out = side(s, args.method, dtype, args.remat, ids, labels, args.warmup, args.steps)
    med = statistics.median(out["times"])
    out.update(s_per_step=med, tokens_per_s=s["B"] * s["T"] / med)
    print(json.dumps(out))


def engine_env(settings: bool) -> dict[str, str]:
    """The engine side's environment: this one, with what ``qlora-spec`` adds on this machine
    (``jax_impl.cpu.runtime_env``) when ``settings``."""
    from jax_impl.cpu import runtime_env

    return (runtime_env(os.environ) if settings else None) or dict(os.environ)


def spawn(args: argparse.Namespace, side: str, dtype: str, env: dict[str, str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--shape", args.shape]
    cmd += ["--method", args.method, "--warmup", str(args.warmup), "--steps", str(args.steps)]
    cmd += ["--dtype", dtype, "--remat", args.remat, "--prompt", str(args.prompt)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        sys.exit(f"{side} side failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="default")
    p.add_argument("--method", choices=["lora", "qlora"], default="lora")
    add_dtype_option(p, "under torch.autocast")
    p.add_argument(
        "--remat",
        choices=["auto", "none", "full"],
        default="auto",
        help="whether both sides recompute each block in the backward pass (the peer by "
        "gradient checkpointing); auto: as each library sets the method up, QLoRA with it and "
        "LoRA without",
    )
    p.add_argument(
        "--prompt",
        type=int,
        default=0,
        help="positions at the start of every row that are a prompt, without loss (label "
        "-100 on both sides), as instruction data is trained; 0: every position counts",
    )
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of both sides")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per process")
    p.add_argument("--steps", type=int, default=8, help="timed steps per process")
    p.add_argument(
        "--env-as-is",
        action="store_true",
        help="run the engine side in this environment as it is, without the huge pages and "
        "XLA flags qlora-spec adds (jax_impl/cpu.py)",
    )
    p.add_argument("--side", choices=["engine", "peer"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        return run_side(args)
    s = SHAPES[args.shape]
    if not 0 <= args.prompt < s["T"] - 1:
        p.error(f"--prompt {args.prompt}: expected 0 to {s['T'] - 2} for rows of {s['T']}")
    from jax_impl.model import EngineConfig

    dtypes = run_dtypes(args.dtype)
    envs = {"engine": engine_env(not args.env_as_is), "peer": dict(os.environ)}
    head = {"shape": args.shape, "method": args.method, "dtypes": dtypes, "remat": args.remat}
    head.update(prompt=args.prompt, **s)
    auto = EngineConfig().resolve(engine_config(s), "cpu").dtype
    head.update(cpus=os.cpu_count(), cpu_flags=cpu_flags(), auto_dtype=auto)
    settings = {
        var: {side: env.get(var) for side, env in envs.items()}
        for var in ("GLIBC_TUNABLES", "XLA_FLAGS")
    }
    print(json.dumps({**head, **settings, "load": os.getloadavg()}))
    ratios: dict[str, list[float]] = {dt: [] for dt in dtypes}
    per_side: dict[str, list[float]] = {f"{side} {dt}": [] for dt in dtypes for side in envs}
    for r in range(args.rounds):
        order = ("engine", "peer") if r % 2 == 0 else ("peer", "engine")
        for dt in dtypes:
            got = {side: spawn(args, side, dt, envs[side]) for side in order}
            for side in order:
                per_side[f"{side} {dt}"].append(got[side]["tokens_per_s"])
                print(json.dumps({"round": r + 1, "dtype": dt, **got[side]}))
            ratios[dt].append(got["engine"]["tokens_per_s"] / got["peer"]["tokens_per_s"])
            line = {"round": r + 1, "dtype": dt, "ratio_engine_over_peer": ratios[dt][-1]}
            print(json.dumps({**line, "load": os.getloadavg()}))
    spread = {k: max(v) / min(v) - 1 for k, v in per_side.items()}
    medians = {dt: statistics.median(v) for dt, v in ratios.items()}
    print(
        json.dumps(
            {
                "ratios": ratios,
                "median_ratio": medians,
                "tokens_per_s": per_side,
                "spread_over_rounds": spread,
            }
        )
    )


if __name__ == "__main__":
    main()
