"""Greedy KV-cache decoding speed: the engine's jitted loop against transformers' ``generate``.

One random Llama-shaped model (V=8192, D=512, F=1376, 4 layers, 8 heads, 4 kv heads) is
built in transformers, saved with ``save_pretrained`` and loaded by the engine with
``load_pretrained``, so both sides run the same weights in float32. Both decode the same
prompt (B x T0 = 1 x 32, env B and T0) by NEW = 128 new tokens, greedy, cache on, no eos.
Each side warms up once (compilation excluded), then the median of TIMED runs is taken.
Prints one JSON line per side and one with the ratio engine / peer of tokens per second
and how many generated tokens agree. Run:

    python bench/decode.py            # needs torch and transformers (the interop extra)
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout

V, D, F, L, N, K = 8192, 512, 1376, 4, 8, 4
B, T0 = int(os.environ.get("B", 1)), int(os.environ.get("T0", 32))
NEW, TIMED = int(os.environ.get("NEW", 128)), int(os.environ.get("TIMED", 5))


def timed(run: Callable[[], np.ndarray]) -> tuple[float, np.ndarray]:
    """Median seconds of a run after one warm-up run, and the tokens it gave."""
    out = run()
    times = []
    for _ in range(TIMED):
        t = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    import jax
    import torch
    import transformers

    from jax_impl.generate import generate
    from jax_impl.train.checkpoint import load_pretrained

    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
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
    peer = transformers.LlamaForCausalLM(hf_cfg).eval()
    prompt = np.random.default_rng(0).integers(0, V, size=(B, T0))
    ids = torch.as_tensor(prompt)

    def peer_run() -> np.ndarray:
        with torch.no_grad():
            out = peer.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW,
                min_new_tokens=NEW,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
            )
        return out.numpy()

    with tempfile.TemporaryDirectory() as tmp:
        peer.save_pretrained(tmp)
        _, model = load_pretrained(tmp)

    def engine_run() -> np.ndarray:
        return generate(model, prompt, NEW)

    s_eng, out_eng = timed(engine_run)
    s_peer, out_peer = timed(peer_run)
    tokens = B * NEW
    rows = [
        {
            "side": "qlora-spec engine (jax, jit while_loop)",
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "s_per_generate": s_eng,
            "tokens_per_s": tokens / s_eng,
        },
        {
            "side": "transformers generate",
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "s_per_generate": s_peer,
            "tokens_per_s": tokens / s_peer,
        },
    ]
    for row in rows:
        print(json.dumps({"B": B, "T0": T0, "new_tokens": NEW, **row}))
    agree = float((out_eng[:, T0:] == out_peer[:, T0:]).mean())
    print(json.dumps({"ratio_engine_over_peer": s_peer / s_eng, "token_agreement": agree}))


if __name__ == "__main__":
    main()
