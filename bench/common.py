"""What the benchmarks share: the model of a shape on each side, and the peer's 4-bit load.

A shape is a dict with V (vocabulary), D (width), F (MLP width), L (layers), N (heads), K (kv
heads), T (sequence length) and optionally ``tied`` (tied embeddings).
"""

from __future__ import annotations

import tempfile
from typing import Any

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
