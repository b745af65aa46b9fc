"""Mean token loss of a model (with or without an adapter) on a JSONL file, computed by the
engine or by the specification itself, so the two can be compared on any model and data."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from ref_numpy.formats import bnb, hf, peft
from ref_numpy.lora import join_lora
from ref_numpy.model import causal_lm_loss, model_forward

from ..model import EngineConfig
from ..train.checkpoint import load_pretrained
from ..train.data import batches as make_batches
from ..train.data import bucket_lengths, encode_file, unpacked_rows
from ..train.trainer import eval_loss
from .train import resolve_max_length


def evaluate_file(
    model_dir: str | Path,
    data: str | Path,
    *,
    adapter: str | Path | None = None,
    method: Literal["full", "lora", "qlora"] = "lora",
    backend: Literal["jax", "numpy"] = "jax",
    max_length: int | None = None,
    batch_size: int = 4,
    train_on_prompt: bool = False,
) -> tuple[float, int]:
    """``(mean loss over all counted tokens of the file, counted tokens)``.

    The file is tokenised as for training (``data.encode``): a text is the tokenizer's own
    encoding plus EOS. Examples longer than ``max_length`` (default: the model's context, at
    most 512) are truncated. ``method="qlora"`` quantizes the base to NF4 as it loads (an NF4
    checkpoint is always read as NF4).
    """
    cfg = hf.load_config(model_dir)
    max_length = resolve_max_length(max_length, cfg.max_seq_len)
    encoded, _, tok, _ = encode_file(
        model_dir, data, cfg.vocab_size, max_length, train_on_prompt=train_on_prompt
    )
    pad_id = tok.pad_id if tok is not None else None  # token-id data may come without one
    rows = unpacked_rows(encoded)
    buckets = bucket_lengths(max_length)
    total, count = 0.0, 0
    if backend == "jax":
        eng = EngineConfig(quantize=method == "qlora")
        _, model = load_pretrained(model_dir, None, eng, adapter_dir=adapter)
        return eval_loss(
            model, make_batches(rows, batch_size, 1, buckets, seed=0, epoch=0, pad_id=pad_id)
        )

    if bnb.is_nf4_checkpoint(model_dir):
        cfg, params = bnb.load_nf4_model(model_dir, dtype=np.float64)
    else:
        quantize = (lambda path: True) if method == "qlora" else None
        cfg, params = hf.load_model(model_dir, dtype=np.float64, quantize=quantize)
    scale = 0.0
    if adapter is not None:
        lora, adapters = peft.load_adapter(adapter, cfg, dtype=np.float64)
        params, scale = join_lora(params, adapters), lora.scale
    for batch in make_batches(rows, batch_size, 1, buckets, seed=0, epoch=0, pad_id=pad_id):
        b = {k: v[0] for k, v in batch.items()}
        logits, _ = model_forward(
            params,
            cfg,
            b["input_ids"],
            positions=b["positions"],
            attention_mask_2d=b["attention_mask"],
            lora_scale=scale,
        )
        loss, _ = causal_lm_loss(logits, b["labels"])
        n = int((b["labels"][:, 1:] != -100).sum())
        total, count = total + loss * n, count + n
    return total / max(count, 1), count
