"""Where the engine's CPU train step spends its time, per compiled operation.

Builds the engine side of ``bench/cpu_train.py`` (same shapes, LoRA r=16 on all seven
projections, AdamW), traces a few steps with ``jax.profiler`` and sums the time XLA's CPU
runtime spends in each operation of the compiled step (a fusion, a dot, a copy), over all
its threads. Each operation is described from the optimized HLO: its output shape, and
either the dot inside it (operand shapes, contracted dimensions) or the ops it fuses. The
summary groups them as dots, transposing copies, dynamic slices and updates (the layer
scan's stacked residuals), broadcast fills and the rest.

    python bench/profile_cpu.py                      # default shape, 3 traced steps
    python bench/profile_cpu.py --shape smollm2-135m --layers 4 --top 40

Times are wall-clock per operation, so a loaded machine inflates them all; read the shares,
and compare variants in one process, one step after the other. ``qlora-spec`` runs under
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` and, on a CPU with bf16 matrix units,
``XLA_FLAGS=--xla_cpu_prefer_vector_width=512`` (``jax_impl/cpu.py``); set them here too
to profile the step as the command runs it (without the first, first touches of the step's
fresh temporaries show up as slow broadcast fills).
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout

from bench.common import TARGETS, engine_config  # noqa: E402
from bench.cpu_train import SHAPES  # noqa: E402

INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\S+) ([a-z][\w-]*)\((.*)$", re.M)
COMP = re.compile(r"^%(\S+) \(.*?\) -> .*? \{\n(.*?)\n\}", re.M | re.S)
DOT = re.compile(
    r"= (\S+) dot\((.*?)\), (.*?contracting_dims=\{[\d,]*\}.*?contracting_dims=\{[\d,]*\})"
)
PARAM = re.compile(r"%(\S+) = (\S+) parameter")
OP = re.compile(r"= \S+ ([a-z][\w-]*)\(")
PLAIN = {"parameter", "bitcast", "constant", "broadcast", "tuple", "get-tuple-element"}


def describe(hlo: str) -> dict[str, tuple[str, str]]:
    """``{instruction: (category, description)}`` for every instruction of the HLO text."""
    comps = {m.group(1): m.group(2) for m in COMP.finditer(hlo)}
    out = {}
    for m in INSTR.finditer(hlo):
        name, shape, op, rest = m.groups()
        calls = re.search(r"calls=%([\w.-]+)", rest)
        body = comps.get(calls.group(1), "") if calls else ""
        dot = DOT.search(body) if op == "fusion" else DOT.search(m.group(0))
        if dot:
            params = dict(PARAM.findall(body))
            args = [params.get(a.strip().lstrip("%"), a.strip()) for a in dot.group(2).split(",")]
            dims = re.sub(r"[a-z_]*contracting_dims=", "", dot.group(3)).replace(", ", " x ")
            out[name] = ("dot", f"{dot.group(1)} = dot({', '.join(args)}) contracting {dims}")
            continue
        ops = [o for o in dict.fromkeys(OP.findall(body)) if o not in PLAIN] if body else [op]
        if name.startswith("wrapped_broadcast") or ops == ["broadcast"]:
            kind = "broadcast fill"
        elif "transpose" in ops:
            kind = "transposing copy"
        elif any(o.startswith("dynamic") for o in ops):
            kind = "dynamic slice/update"
        else:
            kind = "other"
        out[name] = (kind, f"{shape} {','.join(ops) or op}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="default")
    p.add_argument("--layers", type=int, help="override the shape's layer count")
    p.add_argument("--steps", type=int, default=3, help="traced steps")
    p.add_argument("--top", type=int, default=30, help="operations listed")
    p.add_argument("--method", choices=["lora", "qlora"], default="lora")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jax_impl.model import EngineConfig, Model
    from jax_impl.train.trainer import OptimConfig, Trainer
    from ref_numpy.config import LoraConfig

    s = dict(SHAPES[args.shape], **({"L": args.layers} if args.layers else {}))
    eng = EngineConfig(quantize=args.method == "qlora", dtype=args.dtype)
    lora = LoraConfig(rank=16, alpha=32.0, targets=TARGETS)
    model = Model(engine_config(s), lora, eng, rngs=nnx.Rngs(0))
    trainer = Trainer.create(model, OptimConfig(lr=1e-4, total_steps=10_000, max_grad_norm=None))
    ids = np.random.default_rng(0).integers(0, s["V"], size=(1, s["B"], s["T"]), dtype=np.int32)
    batch = {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(ids)}
    for _ in range(3):  # compile and warm up
        jax.block_until_ready(trainer.step(batch)["loss"])
    lowered = trainer._step.lower(
        trainer.params, trainer.opt_state, trainer.rest, batch, jnp.asarray(0)
    )
    info = describe(lowered.compile().as_text() or "")

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        jax.profiler.start_trace(tmp)
        for _ in range(args.steps):
            jax.block_until_ready(trainer.step(batch)["loss"])
        jax.profiler.stop_trace()
        wall = (time.perf_counter() - t0) / args.steps
        data = jax.profiler.ProfileData.from_file(
            glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)[0]
        )
        per_op: collections.Counter[str] = collections.Counter()
        calls: collections.Counter[str] = collections.Counter()
        for plane in data.planes:
            for line in plane.lines:
                for ev in line.events:
                    if ev.name in info:
                        per_op[ev.name] += ev.duration_ns
                        calls[ev.name] += 1

    n, total = args.steps, sum(per_op.values())
    print(
        f"shape {args.shape}, {args.method} {args.dtype}, {s['L']} layers, batch {s['B']} x "
        f"{s['T']}: step {wall:.3f} s "
        f"wall, {total / n / 1e9:.3f} s in compiled operations; load {os.getloadavg()[0]:.1f}"
    )
    kinds: collections.Counter[str] = collections.Counter()
    for name, ns in per_op.items():
        kinds[info[name][0]] += ns
    for kind, ns in kinds.most_common():
        print(f"  {kind:22s} {ns / n / 1e6:9.1f} ms  {100 * ns / total:5.1f}%")
    print(f"top {args.top} operations (ms per step, calls per step):")
    for name, ns in per_op.most_common(args.top):
        kind, text = info[name]
        print(f"{ns / n / 1e6:8.1f} ms x{calls[name] / n:5.1f}  {kind:20s} {name:34s} {text[:150]}")


if __name__ == "__main__":
    main()
