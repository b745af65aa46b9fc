"""The accelerator check: everything a GPU can show that a CPU cannot, in one command.

Run on one GPU (about 8 minutes on an H100 or H200 at the default ``--model-size 1b``)::

    python bench/gpu_check.py --out results/            # or: bash bench/gpu_check.sh results/

In order, each step in fresh processes, every figure into ``<out>/gpu_check.json`` (written
whole, under a temporary name first, after every step, so a run cut short keeps what it has):

1. the card: JAX's devices, ``nvidia-smi``, versions;
2. the tests that skip without a GPU (cuDNN flash attention against the einsum path, the
   optimizer state in pinned host memory), as pytest reports them;
3. ``bench/gpu_train.py`` at the model size, LoRA and QLoRA, remat none and full, with
   transformers + PEFT (+ bitsandbytes) in the same call where they are installed;
4. the next size up (8B after 1B) with full remat and AdamW's moments offloaded to the host,
   QLoRA, 2 x 2048: the memory target's shape;
5. ``qlora-spec plan``'s prediction beside every measured peak: the formula's, and XLA's
   compiled analysis for this backend, with their ratios to the measured peak.

``--model-size tiny`` runs the same steps on any machine (the tests run it on a CPU, where
there is no device peak to compare and the GPU-only tests are reported as skipped).
``--budget`` (seconds) stops starting new steps once spent, and says which were skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout

GPU_TESTS = ["tests/test_engine.py", "-k", "cudnn or offloaded"]
NEXT_SIZE = {"tiny": "tiny", "1b": "8b", "8b": "8b"}


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as JSON at ``path``, whole or not at all (a temporary name, then a rename)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def card() -> dict[str, Any]:
    """The devices JAX sees and what ``nvidia-smi`` says of them (in a child process, so
    this process never initialises a backend the steps' processes need whole)."""
    code = (
        "import jax, json; d = jax.devices()[0]; "
        "print(json.dumps({'backend': jax.default_backend(), 'jax': jax.__version__, "
        "'device_kind': d.device_kind, 'devices': jax.device_count(), "
        "'memory_stats': {k: v for k, v in (d.memory_stats() or {}).items() "
        "if k in ('bytes_limit', 'bytes_reservable_limit')}}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    info: dict[str, Any] = {"python": platform.python_version(), "machine": platform.node()}
    if proc.returncode == 0:
        info.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    else:
        info["jax_error"] = proc.stderr[-2000:]
    if shutil.which("nvidia-smi"):
        query = "--query-gpu=name,memory.total,driver_version,clocks.max.sm"
        smi = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True
        )
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    return info


def gpu_tests(timeout: float) -> dict[str, Any]:
    """The GPU-only tests, run by pytest; each test's outcome by name."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "report.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *GPU_TESTS]
        cmd += [f"--junitxml={xml}"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"status": "timed out", "timeout_s": timeout}
        outcomes: dict[str, str] = {}
        if xml.exists():
            for case in ET.parse(xml).getroot().iter("testcase"):
                kinds = [child.tag for child in case]
                outcome = next((k for k in ("failure", "error", "skipped") if k in kinds), "passed")
                outcomes[case.get("name", "?")] = outcome
    summary = {k: sum(v == k for v in outcomes.values()) for k in set(outcomes.values())}
    return {
        "exit_status": proc.returncode,
        "summary": summary,
        "tests": outcomes,
        "tail": proc.stdout[-1500:] if proc.returncode else "",
    }


def train_runs(
    size: str, methods: str, remats: str, offload: bool, peer: bool, steps: int
) -> list[dict[str, Any]]:
    """``bench/gpu_train.py``'s JSON lines for one call (each side in its own process)."""
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_train.py"), "--model-size", size]
    cmd += ["--methods", methods, "--remats", remats, "--steps", str(steps), "--warmup", "2"]
    cmd += ["--offload-optimizer" if offload else "--no-offload-optimizer"]
    cmd += [] if peer else ["--no-peer"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.strip().startswith("{")]
    if proc.returncode != 0:
        lines.append(
            {"failed": True, "exit_status": proc.returncode, "stderr": proc.stderr[-3000:]}
        )
    return lines


def predicted(size: str, method: str, remat: str, offload: bool) -> dict[str, Any]:
    """``qlora-spec plan``'s figures for one engine run of ``gpu_train.py``, in a child
    process on this backend (XLA's compiled analysis where the backend compiles the step)."""
    from bench.gpu_train import SHAPES

    s = SHAPES[size]
    argv = ["plan", "--model-size", size, "--method", method, "--remat", remat, "--json"]
    argv += ["--batch-size", str(s["B"]), "--max-length", str(s["T"])]
    argv += ["--rank", "16", "--alpha", "32", "--targets", "all-linear"]
    argv += ["--offload-optimizer" if offload else "--no-offload-optimizer"]
    code = (
        "import jax, sys; from jax_impl.apps.cli import main; "
        "b = jax.default_backend(); "
        "sys.exit(main(sys.argv[1:] + ['--platform', 'gpu' if b in ('cuda', 'rocm') else b]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT
    )
    if proc.returncode != 0:
        return {"failed": True, "stderr": proc.stderr[-2000:]}
    report = json.loads(proc.stdout)
    keep = ("peak", "source", "formula_peak", "peak_phase", "host_bytes", "compiled", "engine")
    return {k: report[k] for k in keep}


def compare(run: dict[str, Any], plan: dict[str, Any]) -> dict[str, Any]:
    """The plan's peak over the measured one (the target: within 10%)."""
    measured = run.get("peak_bytes")
    out: dict[str, Any] = {"measured_peak_bytes": measured, "plan": plan}
    if measured and not plan.get("failed"):
        out["plan_over_measured"] = plan["peak"] / measured
        out["formula_over_measured"] = plan["formula_peak"] / measured
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for gpu_check.json (created)")
    p.add_argument("--model-size", choices=["tiny", "1b"], default="1b")
    p.add_argument("--steps", type=int, default=5, help="timed steps per training process")
    p.add_argument("--budget", type=float, default=450.0, help="seconds before no new step starts")
    p.add_argument("--no-peer", action="store_true", help="skip transformers + PEFT")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu_check.json"
    start = time.monotonic()
    size, big = args.model_size, NEXT_SIZE[args.model_size]
    report: dict[str, Any] = {"command": " ".join(sys.argv), "model_size": size, "skipped": []}
    steps: list[tuple[str, Any]] = [
        ("card", card),
        ("gpu_tests", lambda: gpu_tests(timeout=240.0)),
        (
            "train",
            lambda: train_runs(
                size, "lora,qlora", "none,full", False, not args.no_peer, args.steps
            ),
        ),
        ("train_big", lambda: train_runs(big, "qlora", "full", True, False, args.steps)),
    ]
    for name, step in steps:
        if time.monotonic() - start > args.budget:
            report["skipped"].append(name)
            continue
        t0 = time.monotonic()
        report[name] = step()
        report.setdefault("seconds", {})[name] = round(time.monotonic() - t0, 1)
        write_json(path, report)
        print(json.dumps({name: report[name]}), flush=True)
    plans = []
    for key, run_size in (("train", size), ("train_big", big)):
        for run in report.get(key, []):
            if run.get("side") != "engine":
                continue
            if time.monotonic() - start > args.budget + 60:
                report["skipped"].append(f"plan {run_size} {run['method']} {run['remat']}")
                continue
            plan = predicted(run_size, run["method"], run["remat"], run["offload_optimizer"])
            entry = {"model_size": run_size, "method": run["method"], "remat": run["remat"]}
            entry.update(offload_optimizer=run["offload_optimizer"], **compare(run, plan))
            plans.append(entry)
            print(json.dumps(entry), flush=True)
    report["plan_vs_measured"] = plans
    report["seconds"]["total"] = round(time.monotonic() - start, 1)
    write_json(path, report)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
