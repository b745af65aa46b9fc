"""Mean token loss of a model (with or without an adapter) on a JSONL file, computed by the
engine or by the specification itself, so the two can be compared on any model and data."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from flax import nnx

from ref_numpy.formats import bnb, hf, peft
from ref_numpy.lora import join_lora
from ref_numpy.model import causal_lm_loss, model_forward
from ref_numpy.preference import (
    preference_loss_forward,
    reference_logps,
    rewards,
    sequence_logps_forward,
)

from ..model import EngineConfig
from ..train.checkpoint import load_pretrained
from ..train.data import batches as make_batches
from ..train.data import bucket_lengths, encode_file, unpacked_rows
from ..train.data.pairs import Truncation, encode_pairs_file, pair_batches
from ..train.trainer import DPOConfig, eval_loss, eval_preference
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

    params, scale = _spec_params(model_dir, method, adapter)
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


def evaluate_preferences(
    model_dir: str | Path,
    data: str | Path,
    objective: DPOConfig,
    *,
    adapter: str | Path | None = None,
    ref_model: str | Path | None = None,
    method: Literal["full", "lora", "qlora"] = "lora",
    backend: Literal["jax", "numpy"] = "jax",
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    truncation_mode: Truncation = "keep_start",
    batch_size: int = 4,
) -> dict[str, float]:
    """The preference loss and TRL's metrics of a policy over every pair of a preference file
    (``data.pairs``): ``loss``, ``rewards/{chosen,rejected,accuracies,margins}``,
    ``logps/{chosen,rejected}`` (means over pairs), ``pairs`` and ``tokens``.

    The policy is ``model_dir`` with ``adapter``; the reference is ``model_dir`` alone (the
    adapter off), or ``ref_model`` when given (a full fine-tune against its starting model).
    ``backend="numpy"`` computes everything with the specification.
    """
    cfg = hf.load_config(model_dir)
    if adapter is None and ref_model is None:
        raise ValueError(
            "--objective dpo: a reference is needed: --adapter (the reference is the base "
            "without it) or --ref-model"
        )
    if adapter is not None and ref_model is not None:
        raise ValueError(
            "--objective dpo: --ref-model is the reference of a full fine-tune; with --adapter "
            "the reference is the base without it"
        )
    max_length = resolve_max_length(max_length, cfg.max_seq_len)
    pairs, _, tok, _ = encode_pairs_file(
        model_dir,
        data,
        cfg.vocab_size,
        max_length,
        max_prompt_length=max_prompt_length,
        truncation_mode=truncation_mode,
    )
    pad_id = tok.pad_id if tok is not None else None
    made = pair_batches(
        pairs, batch_size, 1, bucket_lengths(max_length), seed=0, epoch=0, pad_id=pad_id
    )
    if backend == "jax":
        eng = EngineConfig(quantize=method == "qlora")
        _, model = load_pretrained(model_dir, None, eng, adapter_dir=adapter)
        ref = None
        if ref_model is not None:
            _, reference = load_pretrained(ref_model, None, eng)
            ref = nnx.state(reference, nnx.Param)
        return eval_preference(model, made, objective, ref)

    params, scale = _spec_params(model_dir, method, adapter)
    ref_params = None if ref_model is None else _spec_params(ref_model, method, None)[0]
    sums: dict[str, float] = {}
    total, n_pairs, tokens = 0.0, 0, 0
    for batch in made:
        b = {k: v[0] for k, v in batch.items()}  # [1,2B,T] -> [2B,T]
        ids, labels, mask = b["input_ids"], b["labels"], b["attention_mask"]
        if ref_params is None:
            ref_lp = reference_logps(params, cfg, ids, labels, attention_mask_2d=mask)
        else:  # the reference model as it is (its own adapters, if any, merged or absent)
            ref_lp = reference_logps(
                ref_params, cfg, ids, labels, ref_params=ref_params, attention_mask_2d=mask
            )
        logits, _ = model_forward(params, cfg, ids, attention_mask_2d=mask, lora_scale=scale)
        logps, counts, _ = sequence_logps_forward(logits, labels)
        loss, _ = preference_loss_forward(
            logps,
            ref_lp,
            counts,
            beta=objective.beta,
            loss_type=objective.loss_type,
            label_smoothing=objective.label_smoothing,
        )
        n = int(((counts[0::2] > 0) & (counts[1::2] > 0)).sum())
        total, n_pairs, tokens = total + loss * n, n_pairs + n, tokens + int(counts.sum())
        for k, v in rewards(logps, ref_lp, counts, objective.beta).items():
            sums[k] = sums.get(k, 0.0) + v * n
    out = {"loss": total / max(n_pairs, 1), **{k: v / max(n_pairs, 1) for k, v in sums.items()}}
    return {**out, "pairs": n_pairs, "tokens": tokens}


def _spec_params(
    model_dir: str | Path, method: str, adapter: str | Path | None
) -> tuple[dict, float]:
    """The spec's float64 params of ``model_dir`` (NF4 kernels for QLoRA or an NF4
    checkpoint) with ``adapter`` joined, and the adapter's scale (0 without one)."""
    if bnb.is_nf4_checkpoint(model_dir):
        cfg, params = bnb.load_nf4_model(model_dir, dtype=np.float64)
    else:
        quantize = (lambda path: True) if method == "qlora" else None
        cfg, params = hf.load_model(model_dir, dtype=np.float64, quantize=quantize)
    if adapter is None:
        return params, 0.0
    lora, adapters = peft.load_adapter(adapter, cfg, dtype=np.float64)
    return join_lora(params, adapters), lora.scale
