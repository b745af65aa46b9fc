"""Checkpoints into and out of the engine. The file formats belong to the spec
(``ref_numpy.formats``: ``hf``, ``peft``, ``bnb``); this module only moves their param trees
onto devices (``model.from_spec``) and back (``model.to_spec``)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ref_numpy.config import LoraConfig, ModelConfig
from ref_numpy.formats import bnb, hf, peft
from ref_numpy.lora import add_lora, join_lora, projections, split_lora
from ref_numpy.nf4 import NF4Tensor

from ..model import EngineConfig, Model, from_spec, to_spec


def load_pretrained(
    model_dir: str | os.PathLike[str],
    lora: LoraConfig | None = None,
    eng: EngineConfig | None = None,
    adapter_dir: str | os.PathLike[str] | None = None,
) -> tuple[ModelConfig, Model]:
    """An engine model from a Hugging Face directory, ready to train or run.

    A float checkpoint is quantized to NF4 while it streams in when ``eng.quantize``; an
    NF4 checkpoint (ours or one transformers + bitsandbytes saved) loads as it is, with
    ``eng.quantize`` switched on. With ``lora``, fresh adapters (PEFT init) are added; with
    ``adapter_dir``, a saved PEFT adapter is loaded instead (its config wins), also one on
    some layers only (``layers_to_transform`` or a regex ``target_modules``): the other layers
    get zero adapter slots (see ``model.lora_targets``).
    """
    eng = EngineConfig() if eng is None else eng
    if bnb.is_nf4_checkpoint(model_dir):
        cfg, params = bnb.load_nf4_model(model_dir)
        settings = {
            (p["kernel"].blocksize, p["kernel"].double_quant)
            for _, p in projections(params)
            if isinstance(p["kernel"], NF4Tensor)
        }
        if len(settings) != 1:  # the engine holds one NF4 layout for every projection
            raise ValueError(
                f"{model_dir}: expected every projection in NF4 with one (blocksize, "
                f"double_quant), got {sorted(settings)}"
            )
        ((blocksize, double_quant),) = settings
        eng = dataclasses.replace(
            eng, quantize=True, nf4_blocksize=blocksize, double_quant=double_quant
        )
    else:
        cfg, params = hf.load_model(
            model_dir,
            quantize=(lambda path: True) if eng.quantize else None,
            blocksize=eng.nf4_blocksize,
            double_quant=eng.double_quant,
        )
    if adapter_dir is not None:
        lora, adapters = peft.load_adapter(adapter_dir, cfg)
        params = join_lora(params, adapters)
    elif lora is not None:
        params = add_lora(params, cfg, lora)
    return cfg, from_spec(params, cfg, lora, eng)


def save_adapter(
    model: Model,
    out_dir: str | os.PathLike[str],
    base_model: str | os.PathLike[str],
    overwrite: bool = False,
) -> Path:
    """Write the model's adapters in PEFT layout (``adapter_config.json`` and
    ``adapter_model.safetensors``): the tensors of the layers its LoRA config selects, and a
    ``target_modules`` (with ``layers_to_transform`` where it fits) that selects exactly
    those."""
    if model.lora is None:
        raise ValueError("model: has no LoRA adapters to save")
    params = to_spec(model)
    _, adapters = split_lora(params)
    if not adapters:
        raise ValueError("model: has no LoRA adapters to save")
    return peft.save_adapter(
        params,
        model.cfg,
        model.lora,
        out_dir,
        base_model_name_or_path=str(base_model),
        overwrite=overwrite,
    )
