"""LoRA / QLoRA training on one accelerator: tokens/s, peak device memory and model FLOP/s.

The model is built with random weights directly on the device (nothing is downloaded):

* ``1b``: TinyLlama-1.1B's shape (V=32000, D=2048, F=5632, 22 layers, 32 heads over 4 kv
  heads), batch 4 x 2048;
* ``8b``: Llama-3-8B's shape (V=128256, D=4096, F=14336, 32 layers, 32 heads over 8 kv heads),
  batch 2 x 2048, with full rematerialisation and AdamW's moments in host memory
  (``--offload-optimizer``) by default;
* ``tiny``: a small shape that runs anywhere, to check the script itself (the tests run it).

LoRA r=16, alpha 32 on all seven projections, AdamW. The engine runs with its defaults, which
resolve per backend (``EngineConfig.resolve``; every result line says what ran): on a GPU,
bf16 compute with float32 adapters, optimizer state and loss, frozen weights stored in bf16,
and cuDNN flash attention; on a CPU, float32 and the einsum attention. The model is built
one layer and copied to every layer (same random weights in each; speed does not depend on
them), so building it never holds more than one layer's float kernels and the peak device
memory is that of training. Each configuration runs in a fresh process of its own. Model FLOPs
per token (the figure TFLOP/s is computed from), with N the parameters of every matrix the
tokens pass through (projections and the LM head), r the LoRA parameters, L layers, T the
sequence length and D the width:

    4 N  (forward, and the input gradient of every frozen matrix; frozen weights get none)
  + 6 r  (forward, input and weight gradients of the adapters)
  + 6 L T D  (causal attention: Q K^T and P V over half the T x T scores, forward + backward)

When torch (with CUDA), PEFT and bitsandbytes are importable, transformers + PEFT train the same
shape in the same call, in their own processes, and the ratios are printed. Every line is JSON.

    python bench/gpu_train.py                        # 1b: LoRA and QLoRA, remat none and full
    python bench/gpu_train.py --model-size 8b
    python bench/gpu_train.py --model-size tiny      # CPU check of the script
    python bench/gpu_train.py --remats none,attn_out,dots,full --offload-optimizer
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout

from bench.common import TARGETS, engine_config, peer_model  # noqa: E402
from jax_impl.apps.plan import MODEL_SIZES  # noqa: E402

RANK, ALPHA = 16, 32.0
# The shapes are qlora-spec plan's named sizes; each with its batch, and the remat policies and
# optimizer placement it runs by default.
RUNS: dict[str, dict[str, Any]] = {
    "tiny": dict(B=2, T=128, remat=("none",), offload=False),
    "1b": dict(B=4, T=2048, remat=("none", "full"), offload=False),
    "8b": dict(B=2, T=2048, remat=("full",), offload=True),
}
SHAPES: dict[str, dict[str, Any]] = {
    name: {**{k: v for k, v in MODEL_SIZES[name].items() if k != "theta"}, **run}
    for name, run in RUNS.items()
}
RUN_KEYS = ("remat", "offload")  # per-shape run settings, not part of the shape


def model_flops_per_token(s: dict[str, Any]) -> float:
    """The formula of the module docstring."""
    d, f, v, layers, t = s["D"], s["F"], s["V"], s["L"], s["T"]
    kv = d // s["N"] * s["K"]
    proj = [(d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)]  # q k v o gate up down
    n = layers * sum(i * o for i, o in proj) + v * d
    r = layers * sum(RANK * (i + o) for i, o in proj)
    return 4 * n + 6 * r + 6 * layers * t * d


def build_model(cfg: Any, lora: Any, eng: Any) -> Any:
    """The engine model of ``cfg``: one block built (random weights, NF4-quantized under
    QLoRA) and copied into each of the ``cfg.n_layers`` stacked slots; the rest as built."""
    import dataclasses

    import jax.numpy as jnp
    from flax import nnx

    from jax_impl.model import Model

    one = Model(dataclasses.replace(cfg, n_layers=1), lora, eng, rngs=nnx.Rngs(0))
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Model(cfg, lora, eng, rngs=nnx.Rngs(0))))
    built = dict(nnx.to_flat_state(nnx.state(one)))
    flat = []
    for path, var in nnx.to_flat_state(abstract):
        value = built[path].get_value()
        if path[0] == "layers":
            value = jnp.repeat(value, cfg.n_layers, axis=0)  # [1,...] -> [L,...]
        flat.append((path, var.replace(value)))
    del one, built
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def engine_side(
    s: dict[str, Any], method: str, remat: str, offload: bool, warmup: int, steps: int
) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jax_impl.model import EngineConfig
    from jax_impl.train.trainer import OptimConfig, Trainer
    from ref_numpy.config import LoraConfig

    cfg = engine_config(s, rope_theta=500000.0)
    eng = EngineConfig(remat=remat, quantize=method == "qlora")  # type: ignore[arg-type]
    lora = LoraConfig(rank=RANK, alpha=ALPHA, targets=TARGETS)
    model = build_model(cfg, lora, eng)
    optim = OptimConfig(lr=1e-4, total_steps=10_000, offload_optimizer=offload)
    trainer = Trainer.create(model, optim)
    del model
    state_bytes = sum(x.nbytes for x in jax.live_arrays())
    ids = np.random.default_rng(0).integers(0, s["V"], size=(1, s["B"], s["T"]), dtype=np.int32)
    batch = {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(ids)}
    for _ in range(warmup):
        jax.block_until_ready(trainer.step(batch)["loss"])
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(trainer.step(batch)["loss"])
        times.append(time.perf_counter() - t0)
    stats = jax.local_devices()[0].memory_stats() or {}
    resolved = trainer.model().eng
    return {
        "jax": jax.__version__,
        "device": jax.local_devices()[0].device_kind,
        "dtype": resolved.dtype,
        "attention": resolved.attention,
        "offload_optimizer": offload,
        "times": times,
        "live_gib_before_steps": state_bytes / 2**30,
        "peak_bytes": stats.get("peak_bytes_in_use"),
    }


def peer_side(
    s: dict[str, Any], method: str, remat: str, offload: bool, warmup: int, steps: int
) -> dict:
    """transformers + PEFT (+ bitsandbytes) on CUDA; ``offload`` has no counterpart here (the
    peer keeps AdamW's state on the device)."""
    import peft
    import torch

    model = peer_model(s, method, "cuda", torch.bfloat16)
    if remat != "none":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lcfg = peft.LoraConfig(r=RANK, lora_alpha=int(ALPHA), target_modules=list(TARGETS))
    model = peft.get_peft_model(model, lcfg)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randint(0, s["V"], (s["B"], s["T"]), device="cuda")

    def step() -> None:
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(),
        "times": times,
        "peak_bytes": torch.cuda.max_memory_allocated(),
    }


def run_side(args: argparse.Namespace) -> None:
    s = SHAPES[args.model_size]
    side = engine_side if args.side == "engine" else peer_side
    out = side(s, args.method, args.remat, args.offload_optimizer, args.warmup, args.steps)
    sec = statistics.median(out["times"])
    tok_s = s["B"] * s["T"] / sec
    out.update(
        side=args.side,
        method=args.method,
        remat=args.remat,
        s_per_step=sec,
        tokens_per_s=tok_s,
        model_tflops_per_s=tok_s * model_flops_per_token(s) / 1e12,
        peak_gib=None if out["peak_bytes"] is None else out["peak_bytes"] / 2**30,
    )
    print(json.dumps(out))


def peer_available() -> bool:
    code = "import torch, peft, bitsandbytes; assert torch.cuda.is_available()"
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def spawn(
    args: argparse.Namespace, side: str, method: str, remat: str, offload: bool
) -> dict | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--method", method]
    cmd += ["--remat", remat, "--model-size", args.model_size]
    cmd += ["--offload-optimizer" if offload else "--no-offload-optimizer"]
    cmd += ["--warmup", str(args.warmup), "--steps", str(args.steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:  # out of memory is a result too: say so and go on
        print(json.dumps({"side": side, "method": method, "remat": remat, "failed": True}))
        print(proc.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-size", choices=sorted(SHAPES), default="1b")
    p.add_argument("--methods", default="lora,qlora", help="comma-separated: lora, qlora")
    p.add_argument(
        "--remats",
        help="comma-separated remat policies: none, full, dots, attn_out (default: per model size)",
    )
    p.add_argument(
        "--offload-optimizer",
        action=argparse.BooleanOptionalAction,
        help="AdamW's moments in host memory (default: on for 8b only)",
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per process")
    p.add_argument("--steps", type=int, default=5, help="timed steps per process")
    p.add_argument("--no-peer", action="store_true", help="skip transformers + PEFT")
    p.add_argument("--side", choices=["engine", "peer"], help=argparse.SUPPRESS)
    p.add_argument("--method", default="lora", help=argparse.SUPPRESS)
    p.add_argument("--remat", default="none", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        if args.offload_optimizer is None:
            args.offload_optimizer = SHAPES[args.model_size]["offload"]
        return run_side(args)
    s = SHAPES[args.model_size]
    remats = args.remats.split(",") if args.remats else list(s["remat"])
    offload = s["offload"] if args.offload_optimizer is None else args.offload_optimizer
    with_peer = not args.no_peer and peer_available()
    head = {"model_size": args.model_size, "gflop_per_token": model_flops_per_token(s) / 1e9}
    shape = {k: v for k, v in s.items() if k not in RUN_KEYS}
    print(json.dumps({**head, **shape, "offload_optimizer": offload, "peer": with_peer}))
    for method in args.methods.split(","):
        for remat in remats:
            ours = spawn(args, "engine", method, remat, offload)
            if ours is not None:
                print(json.dumps(ours))
            theirs = spawn(args, "peer", method, remat, False) if with_peer else None
            if theirs is not None:
                print(json.dumps(theirs))
            if ours is not None and theirs is not None:
                ratio = {
                    "tokens_per_s": ours["tokens_per_s"] / theirs["tokens_per_s"],
                    "peak_memory": (ours["peak_gib"] or 0) / theirs["peak_gib"],
                }
                print(json.dumps({"method": method, "remat": remat, "engine_over_peer": ratio}))


if __name__ == "__main__":
    main()
