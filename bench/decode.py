"""Greedy KV-cache decoding speed: the engine's jitted loop against transformers' ``generate``.

One random Llama-shaped model (V=8192, D=512, F=1376, 4 layers, 8 heads, 4 kv heads) is
built in transformers and saved with ``save_pretrained``; the engine loads the same files with
``load_pretrained``, so both sides run the same float32 weights. Both decode the same
prompts (B x T0, T0 = 32) by NEW = 128 new tokens, greedy, cache on, no eos, at each batch
size of ``--batches`` (B = 1 and B = 8 by default).

``--dtype bf16`` (or ``bfloat16``) adds a bf16 pair to every round and batch size, as a CPU
user with bf16 matrix units (AMX, AVX512-BF16) decodes: the engine with
``EngineConfig(dtype="bfloat16")``, what ``dtype="auto"`` resolves to on such a CPU, the peer
with the model loaded in bfloat16. Both ratios are printed, float32 / float32 and bf16 / bf16;
bf16 rounding flips near-tied greedy choices of the random model, so the two bf16 sides agree
on fewer tokens than the float32 ones, as each side's bf16 run does with its own float32 run.

Each side runs in a fresh process of its own (the engine under the settings ``qlora-spec``
gives itself, ``jax_impl/cpu.py``), warms up once (compilation excluded) and takes the median of
``--timed`` runs; the sides alternate (engine first in odd rounds) for ``--rounds`` rounds.
Every process prints a JSON line; each round and batch size gets the ratio engine / peer of
tokens per second and the share of generated tokens on which the two sides agree; the last
line has the median ratio per dtype and batch size. On a quiet 2-core Xeon the peer decodes
about 380 tokens/s at B=1 and 1,700 at B=8 in float32; figures far below those mean a loaded
machine, and ratios that read high. Run:

    python bench/decode.py            # needs torch and transformers (the interop extra)
    python bench/decode.py --batches 1 --rounds 5
    python bench/decode.py --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout

from bench.common import add_dtype_option, run_dtypes  # noqa: E402

V, D, F, L, N, K = 8192, 512, 1376, 4, 8, 4


def timed(run: Callable[[], np.ndarray], n: int) -> tuple[list[float], np.ndarray]:
    """Seconds of each of ``n`` runs after one warm-up run, and the tokens the last gave."""
    out = run()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - t)
    return times, out


def prompt(batch: int, t0: int) -> np.ndarray:
    """The prompt ids [B, T0] of a batch size (the same on both sides)."""
    return np.random.default_rng(batch).integers(0, V, size=(batch, t0))


def save_model(path: str) -> None:
    """The random float32 Llama of the benchmark, written with ``save_pretrained``."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=D,
        intermediate_size=F,
        num_hidden_layers=L,
        num_attention_heads=N,
        num_key_value_heads=K,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)


def engine_side(
    path: str, ids: np.ndarray, new: int, n: int, dtype: str
) -> tuple[dict, np.ndarray]:
    import jax

    from jax_impl.generate import generate
    from jax_impl.model import EngineConfig
    from jax_impl.train.checkpoint import load_pretrained

    _, model = load_pretrained(path, eng=EngineConfig(dtype=dtype))  # type: ignore[arg-type]
    times, out = timed(lambda: generate(model, ids, new), n)
    return {"jax": jax.__version__, "backend": jax.default_backend(), "times": times}, out


def peer_side(path: str, ids: np.ndarray, new: int, n: int, dtype: str) -> tuple[dict, np.ndarray]:
    import torch
    import transformers

    peer = transformers.LlamaForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    peer.eval()
    x = torch.as_tensor(ids)

    def run() -> np.ndarray:
        with torch.no_grad():
            out = peer.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
            )
        return out.numpy()

    times, out = timed(run, n)
    versions = {"transformers": transformers.__version__, "torch": torch.__version__}
    return {**versions, "threads": torch.get_num_threads(), "times": times}, out


def run_side(args: argparse.Namespace) -> None:
    """One side at one batch size in this process: a JSON line, the tokens to a .npy file."""
    ids = prompt(args.batch, args.t0)
    side = engine_side if args.side == "engine" else peer_side
    dtype = run_dtypes(args.dtype)[-1]
    row, out = side(args.model, ids, args.new, args.timed, dtype)
    np.save(args.tokens, out[:, args.t0 :])
    med = statistics.median(row["times"])
    row.update(s_per_generate=med, tokens_per_s=args.batch * args.new / med)
    print(json.dumps({"side": args.side, "dtype": dtype, "B": args.batch, **row}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes B")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of both sides")
    p.add_argument("--t0", type=int, default=32, help="prompt length T0")
    p.add_argument("--new", type=int, default=128, help="new tokens per row")
    p.add_argument("--timed", type=int, default=5, help="timed generate calls per process")
    add_dtype_option(p, "with the model loaded in bfloat16")
    p.add_argument("--side", choices=["engine", "peer"], help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--tokens", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        return run_side(args)

    from jax_impl.cpu import runtime_env

    envs = {"engine": runtime_env(os.environ) or dict(os.environ), "peer": dict(os.environ)}
    batches = [int(b) for b in args.batches.split(",")]
    dtypes = run_dtypes(args.dtype)
    head = {"V": V, "D": D, "F": F, "L": L, "N": N, "K": K, "T0": args.t0, "new": args.new}
    print(json.dumps({**head, "batches": batches, "dtypes": dtypes, "cpus": os.cpu_count()}))
    ratios: dict[str, list[float]] = {f"{dt} B={b}": [] for dt in dtypes for b in batches}
    with tempfile.TemporaryDirectory() as tmp:
        save_model(tmp)
        for r in range(args.rounds):
            order = ("engine", "peer") if r % 2 == 0 else ("peer", "engine")
            for dt in dtypes:
                for b in batches:
                    got, tokens = {}, {}
                    for side in order:
                        out = os.path.join(tmp, f"{side}.npy")
                        cmd = [sys.executable, os.path.abspath(__file__), "--side", side]
                        cmd += ["--batch", str(b), "--model", tmp, "--tokens", out]
                        cmd += ["--t0", str(args.t0), "--new", str(args.new)]
                        cmd += ["--timed", str(args.timed), "--dtype", dt]
                        proc = subprocess.run(cmd, capture_output=True, text=True, env=envs[side])
                        if proc.returncode != 0:
                            sys.exit(f"{side} side failed (exit {proc.returncode}):\n{proc.stderr}")
                        got[side] = json.loads(proc.stdout.strip().splitlines()[-1])
                        tokens[side] = np.load(out)
                        print(json.dumps({"round": r + 1, **got[side]}))
                    key = f"{dt} B={b}"
                    ratios[key].append(got["engine"]["tokens_per_s"] / got["peer"]["tokens_per_s"])
                    agree = float((tokens["engine"] == tokens["peer"]).mean())
                    line = {
                        "round": r + 1,
                        "dtype": dt,
                        "B": b,
                        "ratio_engine_over_peer": ratios[key][-1],
                    }
                    print(json.dumps({**line, "token_agreement": agree, "load": os.getloadavg()}))
    medians = {key: statistics.median(v) for key, v in ratios.items()}
    print(json.dumps({"ratios": ratios, "median_ratio": medians}))


if __name__ == "__main__":
    main()
