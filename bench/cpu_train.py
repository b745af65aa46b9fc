"""LoRA training throughput on CPU: the engine against transformers + PEFT, in one process.

Both train the same Llama-shaped model (V=8192, D=512, F=1376, 4 layers, 8 heads, 4 kv
heads), LoRA r=16 alpha=32 on all seven projections, AdamW, on the same random batch
(B x T tokens, env B and T, default 8 x 256). Prints one JSON line per side and the ratio
engine / peer of tokens per second (median of the timed steps). Run:

    python bench/cpu_train.py            # needs the interop extra (torch, transformers, peft)
"""

from __future__ import annotations

import json
import os
import statistics
import time

import numpy as np

V, D, F, L, N, K = 8192, 512, 1376, 4, 8, 4
B, T = int(os.environ.get("B", 8)), int(os.environ.get("T", 256))
WARMUP, TIMED = int(os.environ.get("WARMUP", 3)), int(os.environ.get("TIMED", 10))
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def timed(step: object) -> float:
    """Median seconds per step after the warmup steps."""
    times = []
    for i in range(WARMUP + TIMED):
        t0 = time.perf_counter()
        step()  # type: ignore[operator]
        if i >= WARMUP:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def engine(ids: np.ndarray) -> dict[str, object]:
    import jax
    from flax import nnx

    from jax_impl.model import EngineConfig, Model
    from jax_impl.train import OptimConfig, Trainer
    from ref_numpy.config import LoraConfig, llama_config

    cfg = llama_config(
        vocab_size=V, d_model=D, n_layers=L, n_heads=N, n_kv_heads=K, d_ff=F, max_seq_len=T
    )
    lora = LoraConfig(rank=16, alpha=32.0, targets=TARGETS)
    model = Model(cfg, lora, EngineConfig(), rngs=nnx.Rngs(0))
    trainer = Trainer.create(model, OptimConfig(lr=1e-4, total_steps=10_000, max_grad_norm=None))
    batch = {"input_ids": ids[None], "labels": ids[None]}

    def step() -> None:
        jax.block_until_ready(trainer.step(batch)["loss"])

    s = timed(step)
    return {
        "side": "qlora-spec engine (jax)",
        "jax": jax.__version__,
        "s_per_step": s,
        "tokens_per_s": B * T / s,
    }


def peer(ids: np.ndarray) -> dict[str, object]:
    import peft
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=D,
        intermediate_size=F,
        num_hidden_layers=L,
        num_attention_heads=N,
        num_key_value_heads=K,
        max_position_embeddings=T,
        tie_word_embeddings=False,
    )
    model = peft.get_peft_model(
        LlamaForCausalLM(cfg), peft.LoraConfig(r=16, lora_alpha=32, target_modules=list(TARGETS))
    )
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.tensor(ids)

    def step() -> None:
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    s = timed(step)
    return {
        "side": "transformers + peft (torch)",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "s_per_step": s,
        "tokens_per_s": B * T / s,
    }


def main() -> None:
    ids = np.random.default_rng(0).integers(0, V, size=(B, T)).astype(np.int32)
    ours, theirs = engine(ids), peer(ids.astype(np.int64))
    print(json.dumps(ours))
    print(json.dumps(theirs))
    ratio = float(ours["tokens_per_s"]) / float(theirs["tokens_per_s"])  # type: ignore[arg-type]
    print(json.dumps({"B": B, "T": T, "ratio_engine_over_peer": ratio}))


if __name__ == "__main__":
    main()
