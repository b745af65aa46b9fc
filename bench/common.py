"""What the benchmarks share: the model of a shape on each side, the peer's 4-bit load, and the
``--dtype`` choice of float32 and bf16 pairs.

A shape is a dict with V (vocabulary), D (width), F (MLP width), L (layers), N (heads), K (kv
heads), T (sequence length) and optionally ``tied`` (tied embeddings).
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any


def add_dtype_option(p: argparse.ArgumentParser, bf16_peer: str) -> None:
    """``--dtype``: ``float32`` runs a float32 pair of sides per round, ``bf16`` (or
    ``bfloat16``) a bf16 pair too, its peer ``bf16_peer``; a side's own process gets the
    dtype it runs (``run_dtypes``)."""
    p.add_argument(
        "--dtype",
        choices=["float32", "bf16", "bfloat16"],
        default="float32",
        help=f"float32: one float32 pair per round; bf16 (bfloat16): a bf16 pair too, the peer "
        f"{bf16_peer}",
    )


def run_dtypes(choice: str) -> list[str]:
    """The compute dtypes a ``--dtype`` choice runs, float32 first; a side runs the last."""
    return ["float32"] if choice == "float32" else ["float32", "bfloat16"]


TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def engine_config(s: dict[str, Any], **overrides: Any) -> Any:
    """The spec's ``ModelConfig`` of a Llama-family shape."""
    from ref_numpy.config import llama_config

    return llama_config(
        vocab_size=s["V"],
        d_model=s["D"],
        n_layers=s["L"],
        n_heads=s["N"],
        n_kv_heads=s["K"],
        d_ff=s["F"],
        max_seq_len=s["T"],
        tie_embeddings=s.get("tied", False),
        **overrides,
    )


def peer_model(s: dict[str, Any], method: str, device: str, dtype: Any) -> Any:
    """transformers' ``LlamaForCausalLM`` of the shape, random weights, on ``device``; for
    ``method="qlora"`` saved and loaded again 4-bit (NF4, double quant) with ``dtype`` compute."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=s["V"],
        hidden_size=s["D"],
        intermediate_size=s["F"],
        num_hidden_layers=s["L"],
        num_attention_heads=s["N"],
        num_key_value_heads=s["K"],
        head_dim=s["D"] // s["N"],
        max_position_embeddings=s["T"],
        tie_word_embeddings=s.get("tied", False),
    )
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg).to(dtype)
    if method != "qlora":
        return model
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        del model
        qc = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        return transformers.AutoModelForCausalLM.from_pretrained(
            tmp, quantization_config=qc, device_map=device, dtype=dtype
        )
