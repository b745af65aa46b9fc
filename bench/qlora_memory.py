"""Peak host memory of LoRA, QLoRA from a float checkpoint and QLoRA from its NF4 checkpoint.

One random-weight checkpoint of a Llama-family shape (``bench/cpu_train.py``'s shapes) is
written in float32, and its NF4 checkpoint (double quant, block 64) beside it; then each case
runs in a fresh process of its own, twice:

* ``train``: ``qlora-spec train`` (the console script's ``python -m jax_impl.apps.cli``, so
  under the same glibc tunable, the heap trimmed after each long compilation) for 3 steps of
  the shape's batch (4 x 128 for ``smollm2-135m``), LoRA r=16 alpha=32 on all seven
  projections, on random token ids;
* ``load``: only the load that command does (``load_sharded`` on a one-device mesh).

The figure is the process's peak resident set (``ru_maxrss`` of that child, from
``os.wait4``); it counts everything the process held at its high-water mark: the model, the
runtime, compiled programs, and memory-mapped checkpoint pages. One JSON line per case and
round, then the differences of each QLoRA case to LoRA in MB (10^6 bytes)::

    python bench/qlora_memory.py --shape smollm2-135m
    python bench/qlora_memory.py --shape smollm2-135m --rounds 2 --keep /tmp/ckpts

Flags after ``--`` go to every case's ``qlora-spec train`` command, e.g. the layer loop and
rematerialisation that trade step time for memory::

    python bench/qlora_memory.py --shape smollm2-135m -- --layer-loop scan --remat full

Memory figures do not depend on other load on the machine, so they may be taken on a busy one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout

from bench.common import TARGETS, engine_config  # noqa: E402
from bench.cpu_train import SHAPES  # noqa: E402

STEPS = 3
CASES = (("lora", "float"), ("qlora", "float"), ("qlora", "nf4"))


def write_checkpoints(s: dict[str, Any], root: Path) -> tuple[Path, Path]:
    """The float32 checkpoint of shape ``s`` (normal(0, 0.02) matrices, unit norms) and its NF4
    checkpoint, under ``root``; kept if already there."""
    from ref_numpy.formats import bnb, hf

    cfg = engine_config(s)
    float_dir, nf4_dir = root / "float", root / "nf4"
    if not (float_dir / "config.json").exists():
        rng = np.random.default_rng(0)
        params: dict[str, Any] = {}
        for t in hf.hf_tensors(cfg):
            shape = t.shape[::-1] if t.transpose else t.shape
            if len(shape) == 1:
                value = np.ones(shape, np.float32)
            else:
                value = rng.standard_normal(shape, np.float32) * np.float32(0.02)
            hf.set_leaf(params, t.path, value)
        hf.save_model(params, cfg, float_dir)
        del params
    if not (nf4_dir / "config.json").exists():
        bnb.quantize_model(float_dir, nf4_dir)
    return float_dir, nf4_dir


def write_data(s: dict[str, Any], path: Path) -> None:
    """``STEPS`` batches of random token ids, one ``{"input_ids": [...]}`` line per row."""
    rng = np.random.default_rng(1)
    rows = rng.integers(0, s["V"], size=(STEPS * s["B"], s["T"]))
    path.write_text("".join(json.dumps({"input_ids": r.tolist()}) + "\n" for r in rows))


def run_child(argv: list[str], log: Path) -> tuple[int, str]:
    """Run ``argv`` to its end, stderr to ``log``; ``(peak resident set in bytes, stdout)`` of
    that process alone (``os.wait4`` on its pid, not the maximum over all children)."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out_path = log.with_suffix(".out")
    with open(out_path, "wb") as out, open(log, "wb") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed; its stderr:\n{log.read_text()[-4000:]}")
    return usage.ru_maxrss * 1024, out_path.read_text()  # ru_maxrss: KiB on Linux


def train_argv(
    model_dir: Path,
    method: str,
    data: Path,
    out: Path,
    s: dict[str, Any],
    flags: tuple[str, ...] = (),
) -> list[str]:
    """The ``qlora-spec train`` command line of one case: ``STEPS`` steps of the shape's batch,
    then ``flags``."""
    return [
        sys.executable,
        "-m",
        "jax_impl.apps.cli",
        "train",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--out",
        str(out),
        "--overwrite",
        "--method",
        method,
        "--steps",
        str(STEPS),
        "--batch-size",
        str(s["B"]),
        "--max-length",
        str(s["T"]),
        "--rank",
        "16",
        "--alpha",
        "32",
        "--targets",
        *TARGETS,
        "--checkpoint-interval",
        str(STEPS + 1),
        *flags,
    ]


def load_only(model_dir: str, method: str) -> None:
    """In this process: the load ``qlora-spec train`` does on one device, then print its size."""
    from jax_impl.cpu import reexec_with_runtime_env

    reexec_with_runtime_env()  # the same allocator settings and XLA flags as the train command

    import jax
    from flax import nnx

    from jax_impl.model import EngineConfig
    from jax_impl.train.sharded_load import load_sharded
    from jax_impl.train.sharding import make_mesh, parse_mesh
    from ref_numpy.config import LoraConfig

    mesh = make_mesh(parse_mesh(None))  # as the train command: every device on data
    lora = LoraConfig(rank=16, alpha=32.0, targets=TARGETS)
    _, model = load_sharded(model_dir, lora, EngineConfig(quantize=method == "qlora"), mesh)
    arrays = jax.tree.leaves(nnx.state(model))
    jax.block_until_ready(arrays)
    print(json.dumps({"held": sum(a.nbytes for a in arrays)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--keep", type=Path, help="write the checkpoints here and keep them")
    p.add_argument("--load-only", nargs=2, metavar=("MODEL_DIR", "METHOD"), help=argparse.SUPPRESS)
    p.add_argument("--write", type=Path, metavar="ROOT", help=argparse.SUPPRESS)
    p.add_argument(
        "train_flags",
        nargs=argparse.REMAINDER,
        help="after --: flags added to every case's qlora-spec train command",
    )
    args = p.parse_args()
    flags = tuple(args.train_flags[1:] if args.train_flags[:1] == ["--"] else args.train_flags)
    if args.load_only:
        load_only(*args.load_only)
        return
    if args.write:
        write_checkpoints(SHAPES[args.shape], args.write)
        return
    s = SHAPES[args.shape]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        root = args.keep if args.keep is not None else tmp
        # In a child: a child's ru_maxrss starts from this process's peak (fork, exec), so
        # this process stays small.
        run_child(
            [sys.executable, __file__, "--shape", args.shape, "--write", str(root)], tmp / "w"
        )
        dirs = {"float": root / "float", "nf4": root / "nf4"}
        data = tmp / "train.jsonl"
        write_data(s, data)
        peaks: dict[tuple[str, str, str], list[int]] = {}
        for r in range(args.rounds):
            for method, source in CASES:
                case = f"{method}-{source}"
                argv = train_argv(dirs[source], method, data, tmp / case, s, flags)
                train_peak, _ = run_child(argv, tmp / f"{case}-train.log")
                load_argv = [sys.executable, __file__, "--load-only", str(dirs[source]), method]
                load_peak, out = run_child(load_argv, tmp / f"{case}-load.log")
                held = json.loads(out.strip().splitlines()[-1])["held"]
                for phase, peak in (("train", train_peak), ("load", load_peak)):
                    peaks.setdefault((phase, method, source), []).append(peak)
                line = {"round": r, "shape": args.shape, "method": method, "checkpoint": source}
                line["train_flags"] = flags
                line.update(train_peak_rss=train_peak, load_peak_rss=load_peak, held=held)
                print(json.dumps(line), flush=True)
        mb = 1e6
        summary: dict[str, Any] = {"shape": args.shape, "rounds": args.rounds, "train_flags": flags}
        for phase in ("train", "load"):
            lora = statistics.median(peaks[(phase, "lora", "float")])
            for source in ("float", "nf4"):
                qlora = statistics.median(peaks[(phase, "qlora", source)])
                summary[f"{phase}_lora_minus_qlora_{source}_MB"] = round((lora - qlora) / mb, 1)
            summary[f"{phase}_peak_MB"] = {
                f"{m}-{c}": round(statistics.median(peaks[(phase, m, c)]) / mb, 1) for m, c in CASES
            }
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
