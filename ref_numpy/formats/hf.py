"""Hugging Face checkpoints: ``config.json`` and safetensors weights, in and out.

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or the shards
listed in ``model.safetensors.index.json``. Reading maps every tensor name onto the spec's
param tree (``hf_tensors`` is the one table), transposing PyTorch's ``[out, in]`` linear
weights to our ``[in, out]`` kernels (GPT-2's ``Conv1D`` already stores ``[in, out]``), and
checks that each expected tensor is present with its shape and a float dtype, and that
nothing is left over. Tensors are read one at a time from memory-mapped files, each file open
only around one read, so a load never holds two copies of the model (nor the file's pages);
a kernel can be quantized to NF4 as it arrives.

Writing goes to a temporary directory beside the target, renamed into place at the end,
so a failed write leaves nothing behind.

Supported ``model_type``: ``llama``, ``mistral``, ``qwen2``, ``qwen3``, ``gpt2``, and
``qlora-spec`` (the classic family, our own). Both the transformers-4 form of RoPE settings
(``rope_theta``, ``rope_scaling``) and the transformers-5 form (``rope_parameters``) load,
with ``rope_type`` default, linear, llama3 or yarn; Mistral's and Qwen's sliding windows
(``sliding_window``, ``use_sliding_window``, ``max_window_layers``, ``layer_types``) too.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy, so safetensors can read it)
import numpy as np
from safetensors import SafetensorError, safe_open

from ..config import ROPE_FIELDS, ModelConfig, RopeScaling, attn_shapes, has_bias, mlp_shapes
from ..nf4 import DEFAULT_BLOCKSIZE, NF4Tensor, quantize_kernel
from . import tensorfile
from .files import atomic_dir, write_json

Params = dict[str, Any]
CLASSIC_MODEL_TYPE = "qlora-spec"
LLAMA_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")  # read as the llama family
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
# Buffers some checkpoints carry that are not parameters (recomputed from the config).
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as the config says; the message names the file."""


# --- config.json ----------------------------------------------------------------------


def _get(hf: dict[str, Any], key: str, where: str, default: Any = ...) -> Any:
    if key in hf and hf[key] is not None:
        return hf[key]
    if default is ...:
        raise CheckpointError(f"{where}: missing field {key!r}")
    return default


def _refuse(where: str, key: str, value: Any, why: str) -> None:
    raise CheckpointError(f"{where}: unsupported {key}={value!r} ({why})")


def _rope(hf: dict[str, Any], where: str) -> tuple[float, RopeScaling | None]:
    """RoPE base and scaling from either spelling: transformers-4 ``rope_theta`` and
    ``rope_scaling: {"type" or "rope_type", ...}``, or transformers-5 ``rope_parameters:
    {"rope_type", "rope_theta", ...}``. Defaults as transformers' ``standardize_rope_params``
    and ``_compute_*_parameters``."""
    params = hf.get("rope_parameters") or {}
    if any(isinstance(v, dict) for v in params.values()):
        _refuse(where, "rope_parameters", params, "RoPE settings per layer type")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    field = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    if kind == "default":
        return float(theta), None
    if kind not in ("linear", "llama3", "yarn"):
        _refuse(where, f"{field}.rope_type", kind, "known: 'default', 'linear', 'llama3', 'yarn'")

    def number(key: str, default: Any = ...) -> Any:
        value = scaling.get(key)
        if value is None:
            if default is ...:
                raise CheckpointError(f"{where}: missing field {field}.{key} (rope_type {kind!r})")
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CheckpointError(f"{where}: {field}.{key} must be a number, got {value!r}")
        return value

    if kind == "linear":
        return float(theta), RopeScaling("linear", factor=float(number("factor")))
    # A top-level original_max_position_embeddings wins, as in transformers (Phi-3 style).
    ctx = int(
        hf.get("original_max_position_embeddings")
        or number("original_max_position_embeddings", _get(hf, "max_position_embeddings", where))
    )
    if kind == "llama3":
        return float(theta), RopeScaling(
            "llama3",
            factor=float(number("factor")),
            original_max_position_embeddings=ctx,
            low_freq_factor=float(number("low_freq_factor")),
            high_freq_factor=float(number("high_freq_factor")),
        )
    factor = float(number("factor", _get(hf, "max_position_embeddings", where) / ctx))
    attention_factor = number("attention_factor", None)
    mscale, mscale_all_dim = number("mscale", None), number("mscale_all_dim", None)
    if attention_factor is None and mscale and mscale_all_dim:  # DeepSeek's spelling

        def get_mscale(m: float) -> float:
            return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

        attention_factor = get_mscale(mscale) / get_mscale(mscale_all_dim)
    truncate = scaling.get("truncate", True)
    if not isinstance(truncate, bool):
        raise CheckpointError(f"{where}: {field}.truncate must be true or false, got {truncate!r}")
    return float(theta), RopeScaling(
        "yarn",
        factor=factor,
        original_max_position_embeddings=ctx,
        beta_fast=float(number("beta_fast", 32.0) or 32.0),  # 0 or null mean the default
        beta_slow=float(number("beta_slow", 1.0) or 1.0),
        truncate=truncate,
        attention_factor=None if attention_factor is None else float(attention_factor),
    )


def _sliding(hf: dict[str, Any], kind: str, where: str) -> dict[str, Any]:
    """``sliding_window`` / ``sliding_layers`` as transformers reads them: Mistral windows
    every layer; Qwen2 / Qwen3 only with ``use_sliding_window``, on the layers
    ``layer_types`` marks ``"sliding_attention"`` (transformers 5), else on layers
    ``i >= max_window_layers``."""
    window = hf.get("sliding_window", 4096)  # transformers' default when the field is absent
    if (
        kind == "llama"
        or window is None
        or (kind != "mistral" and not hf.get("use_sliding_window"))
    ):
        return {}
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        raise CheckpointError(f"{where}: sliding_window must be a positive int, got {window!r}")
    if window >= int(_get(hf, "max_position_embeddings", where)):
        return {}  # every query sees every earlier key anyway
    n_layers = int(_get(hf, "num_hidden_layers", where))
    if kind == "mistral":
        return {"sliding_window": window}
    types = hf.get("layer_types")
    if types is None:
        first = int(hf.get("max_window_layers", 28))
        layers = tuple(range(first, n_layers))
    else:
        known = ("full_attention", "sliding_attention")
        if not isinstance(types, list) or len(types) != n_layers or set(types) - set(known):
            raise CheckpointError(
                f"{where}: layer_types must list {n_layers} of {list(known)}, got {types!r}"
            )
        layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    if not layers:
        return {}
    return {
        "sliding_window": window,
        "sliding_layers": None if len(layers) == n_layers else layers,
    }


def config_from_hf(hf: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """A ``ModelConfig`` from the fields of a Hugging Face ``config.json``.

    Raises CheckpointError naming ``where`` and the field for a missing field, an unknown
    ``model_type`` or an option this project does not implement.
    """
    kind = hf.get("model_type")
    if kind in LLAMA_MODEL_TYPES:
        act = _get(hf, "hidden_act", where, "silu")
        if act != "silu":
            _refuse(where, "hidden_act", act, "the llama family uses SwiGLU with silu")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                _refuse(where, flag, hf[flag], "biases on these layers are not implemented")
        theta, scaling = _rope(hf, where)
        n_heads = int(_get(hf, "num_attention_heads", where))
        d_model = int(_get(hf, "hidden_size", where))
        head_dim = hf.get("head_dim", 128 if kind == "qwen3" else None)  # transformers' default
        head_dim = None if head_dim in (None, d_model // n_heads) else int(head_dim)
        return ModelConfig(
            family="llama",
            vocab_size=int(_get(hf, "vocab_size", where)),
            d_model=d_model,
            n_layers=int(_get(hf, "num_hidden_layers", where)),
            n_heads=n_heads,
            n_kv_heads=int(_get(hf, "num_key_value_heads", where, n_heads)),
            head_dim=head_dim,
            d_ff=int(_get(hf, "intermediate_size", where)),
            max_seq_len=int(_get(hf, "max_position_embeddings", where)),
            position="rope",
            norm="rmsnorm",
            norm_eps=float(_get(hf, "rms_norm_eps", where, 1e-6)),
            activation="swiglu",
            bias="qkv" if kind == "qwen2" else "none",
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            rope_theta=theta,
            rope_scaling=scaling,
            qk_norm=kind == "qwen3",
            **_sliding(hf, kind, where),
        )
    if kind == "gpt2":
        act = _get(hf, "activation_function", where, "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            _refuse(where, "activation_function", act, "GPT-2 here uses the tanh GELU")
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if hf.get(flag):
                _refuse(where, flag, hf[flag], "not implemented")
        d_model = int(_get(hf, "n_embd", where))
        return ModelConfig(
            family="gpt2",
            vocab_size=int(_get(hf, "vocab_size", where)),
            d_model=d_model,
            n_layers=int(_get(hf, "n_layer", where)),
            n_heads=int(_get(hf, "n_head", where)),
            d_ff=int(_get(hf, "n_inner", where, 4 * d_model)),
            max_seq_len=int(_get(hf, "n_positions", where)),
            position="learned",
            norm="layernorm",
            norm_eps=float(_get(hf, "layer_norm_epsilon", where, 1e-5)),
            activation="gelu_tanh",
            bias="all",
            tie_embeddings=True,
        )
    if kind == CLASSIC_MODEL_TYPE:
        fields = dict(hf["qlora_spec"])
        if fields.get("rope_scaling") is not None:
            fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
        if fields.get("sliding_layers") is not None:
            fields["sliding_layers"] = tuple(fields["sliding_layers"])
        return ModelConfig(**fields)
    raise CheckpointError(
        f"{where}: unsupported model_type {kind!r}; expected one of "
        f"{sorted([*LLAMA_MODEL_TYPES, 'gpt2', CLASSIC_MODEL_TYPE])}"
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` fields transformers reads for ``cfg`` (transformers-4 RoPE form,
    which both transformers 4 and 5 accept).

    The llama family is written as ``qwen3`` (``qk_norm``), ``qwen2`` (``bias="qkv"``),
    ``mistral`` (a sliding window on every layer) or ``llama``. Raises ValueError for a
    config no transformers model type expresses (a sliding window on GPT-2, or on some layers
    of a model that is neither Qwen2 nor Qwen3).
    """
    if cfg.family == "gpt2":
        if cfg.sliding_window is not None:
            raise ValueError("ModelConfig.sliding_window: GPT-2 in transformers has no window")
        return {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": cfg.vocab_size,
            "n_embd": cfg.d_model,
            "n_layer": cfg.n_layers,
            "n_head": cfg.n_heads,
            "n_inner": cfg.d_ff,
            "n_positions": cfg.max_seq_len,
            "layer_norm_epsilon": cfg.norm_eps,
            "activation_function": "gelu_new",
            "tie_word_embeddings": True,
        }
    if cfg.family == "llama":
        if cfg.qk_norm:
            kind, arch = "qwen3", "Qwen3ForCausalLM"
        elif cfg.bias == "qkv":
            kind, arch = "qwen2", "Qwen2ForCausalLM"
        elif cfg.sliding_window is not None and cfg.sliding_layers is None:
            kind, arch = "mistral", "MistralForCausalLM"
        elif cfg.sliding_window is not None:
            raise ValueError(
                f"ModelConfig.sliding_layers: a window on layers {cfg.sliding_layers} only of a "
                "model without qkv biases or qk_norm has no transformers model type"
            )
        else:
            kind, arch = "llama", "LlamaForCausalLM"
        out: dict[str, Any] = {
            "model_type": kind,
            "architectures": [arch],
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model,
            "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.n_kv,
            "head_dim": cfg.hd,
            "intermediate_size": cfg.d_ff,
            "max_position_embeddings": cfg.max_seq_len,
            "rms_norm_eps": cfg.norm_eps,
            "hidden_act": "silu",
            "tie_word_embeddings": cfg.tie_embeddings,
            "rope_theta": cfg.rope_theta,
        }
        if kind in ("qwen2", "qwen3"):
            windows = [cfg.layer_window(i) is not None for i in range(cfg.n_layers)]
            out["use_sliding_window"] = any(windows)
            out["sliding_window"] = cfg.sliding_window
            # transformers 4 reads max_window_layers (a window on layers >= it), 5 layer_types
            out["max_window_layers"] = windows.index(True) if any(windows) else cfg.n_layers
            out["layer_types"] = [("sliding" if w else "full") + "_attention" for w in windows]
        elif kind == "mistral":
            out["sliding_window"] = cfg.sliding_window
        if cfg.rope_scaling is not None:
            out["rope_scaling"] = rope_scaling_to_hf(cfg.rope_scaling)
        return out
    fields = dict(vars(cfg))
    if cfg.rope_scaling is not None:
        fields["rope_scaling"] = vars(cfg.rope_scaling)
    return {"model_type": CLASSIC_MODEL_TYPE, "qlora_spec": fields}


def rope_scaling_to_hf(scaling: RopeScaling) -> dict[str, Any]:
    """``rope_scaling`` as transformers reads it: the fields this ``rope_type`` uses."""
    used = ROPE_FIELDS[scaling.rope_type]
    out = {"rope_type": scaling.rope_type}
    out.update({k: v for k, v in vars(scaling).items() if k in used and v is not None})
    return out


def load_config(model_dir: str | os.PathLike[str]) -> ModelConfig:
    """``config_from_hf`` of ``model_dir/config.json``."""
    path = Path(model_dir) / "config.json"
    try:
        hf = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file (is {model_dir} a model directory?)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    try:
        return config_from_hf(hf, str(path))
    except (TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: {e}") from None


# --- tensor names ---------------------------------------------------------------------


@dataclass(frozen=True)
class HFTensor:
    """One checkpoint tensor and where it lives in the spec's param tree."""

    name: str  # name in the safetensors file, e.g. "model.layers.0.self_attn.q_proj.weight"
    path: tuple[Any, ...]  # path in the param tree, e.g. ("layers", 0, "attn", "q_proj", "kernel")
    shape: tuple[int, ...]  # shape in the file (PyTorch layout)
    transpose: bool  # the file holds the transpose of our array ([out, in] vs [in, out])


_LLAMA_MODULES = {"attn": "self_attn", "mlp": "mlp"}
_NORMS = {
    "gpt2": {"attn_norm": "ln_1", "mlp_norm": "ln_2"},
    "llama": {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"},
}


def layer_prefix(cfg: ModelConfig, i: int) -> str:
    """``model.layers.{i}`` or GPT-2's ``transformer.h.{i}``."""
    return f"transformer.h.{i}" if cfg.family == "gpt2" else f"model.layers.{i}"


def module_name(cfg: ModelConfig, path: str) -> str:
    """The checkpoint name of a projection: ``layers.3.attn.q_proj`` ->
    ``model.layers.3.self_attn.q_proj`` (``transformer.h.3.attn.c_attn`` for GPT-2). PEFT
    adapters and bitsandbytes state are named after it."""
    _, i, group, name = path.split(".")
    if cfg.family == "gpt2":
        return f"{layer_prefix(cfg, int(i))}.{group}.{name}"
    return f"{layer_prefix(cfg, int(i))}.{_LLAMA_MODULES[group]}.{name}"


def hf_tensors(cfg: ModelConfig) -> list[HFTensor]:
    """Every tensor of a checkpoint of ``cfg``, in file order, with its place in our tree."""
    d = cfg.d_model
    gpt2 = cfg.family == "gpt2"
    out: list[HFTensor] = []
    top = "transformer" if gpt2 else "model"
    out.append(
        HFTensor(
            f"{top}.{'wte' if gpt2 else 'embed_tokens'}.weight",
            ("embed", "embedding"),
            (cfg.vocab_size, d),
            False,
        )
    )
    if cfg.position == "learned":
        out.append(
            HFTensor(f"{top}.wpe.weight", ("pos_embed", "embedding"), (cfg.max_seq_len, d), False)
        )
    norms = _NORMS["gpt2" if gpt2 else "llama"]
    for i in range(cfg.n_layers):
        pre = layer_prefix(cfg, i)
        for ours, theirs in norms.items():
            for leaf in ("weight", "bias") if cfg.norm == "layernorm" else ("weight",):
                out.append(
                    HFTensor(f"{pre}.{theirs}.{leaf}", ("layers", i, ours, leaf), (d,), False)
                )
        for group, shapes in (("attn", attn_shapes(cfg)), ("mlp", mlp_shapes(cfg))):
            for name, (d_in, d_out) in shapes.items():
                mod = module_name(cfg, f"layers.{i}.{group}.{name}")
                w_shape = (d_in, d_out) if gpt2 else (d_out, d_in)
                out.append(
                    HFTensor(
                        f"{mod}.weight", ("layers", i, group, name, "kernel"), w_shape, not gpt2
                    )
                )
                if has_bias(cfg, name):
                    out.append(
                        HFTensor(f"{mod}.bias", ("layers", i, group, name, "bias"), (d_out,), False)
                    )
            if group == "attn" and cfg.qk_norm:  # Qwen3: per-head RMSNorm weights [H]
                for norm in ("q_norm", "k_norm"):
                    name = f"{pre}.{_LLAMA_MODULES['attn']}.{norm}.weight"
                    out.append(
                        HFTensor(name, ("layers", i, "attn", norm, "weight"), (cfg.hd,), False)
                    )
    if cfg.norm_order == "pre":
        final = "transformer.ln_f" if gpt2 else "model.norm"
        for leaf in ("weight", "bias") if cfg.norm == "layernorm" else ("weight",):
            out.append(HFTensor(f"{final}.{leaf}", ("final_norm", leaf), (d,), False))
    if not cfg.tie_embeddings:
        out.append(HFTensor("lm_head.weight", ("lm_head", "kernel"), (cfg.vocab_size, d), True))
    return out


# --- safetensors ----------------------------------------------------------------------


def weight_files(model_dir: Path) -> dict[str, Path]:
    """``{tensor name: file}`` for a single-file or sharded checkpoint."""
    single = model_dir / "model.safetensors"
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        return {name: model_dir / file for name, file in weight_map.items()}
    if single.exists():
        with open_safetensors(single) as f:
            return dict.fromkeys(f.keys(), single)
    raise CheckpointError(
        f"{model_dir}: no model.safetensors or model.safetensors.index.json "
        "(PyTorch .bin checkpoints are not read: they unpickle)"
    )


def check_tensor_names(model_dir: Path, expected: Iterable[str], present: Iterable[str]) -> None:
    """Raise CheckpointError naming the first few tensors ``present`` in ``model_dir`` that
    this config does not have (other than ``IGNORED_SUFFIXES``), or ``expected`` ones it
    lacks."""
    want, have = set(expected), set(present)
    extra = sorted(n for n in have if n not in want and not n.endswith(IGNORED_SUFFIXES))
    if extra:
        raise CheckpointError(f"{model_dir}: unexpected tensors {extra[:5]} for this config")
    missing = sorted(want - have)
    if missing:
        raise CheckpointError(f"{model_dir}: missing tensors {missing[:5]}")


@contextlib.contextmanager
def open_safetensors(path: Path) -> Iterator[Any]:
    """``safe_open(path)`` (NumPy arrays), with a CheckpointError naming the file when it is
    missing or unreadable, and the tensor where its header is at fault
    (``tensorfile.check_header``: truncated, offsets or dtypes that lie)."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            yield f
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file (named by the checkpoint index)") from None
    except (SafetensorError, OSError) as e:
        raise unreadable(path, e) from None


def unreadable(path: Path, e: Exception, name: str | None = None) -> CheckpointError:
    """The CheckpointError for a safetensors file the library refused with ``e``: what
    ``tensorfile.check_header`` finds wrong, naming the tensor, else the library's reason
    (with the tensor ``name`` being read, where given)."""
    try:
        tensorfile.check_header(path)
    except (tensorfile.TensorFileError, OSError) as found:
        return CheckpointError(str(found))
    what = "not a readable safetensors file" if name is None else f"tensor {name!r} cannot be read"
    return CheckpointError(f"{path}: {what} ({e})")


def iter_tensors(files: dict[str, Path]) -> Iterator[tuple[str, np.ndarray]]:
    """``(name, array)`` for every tensor, file by file, each tensor read alone and checked
    against the checksum the file records for it (``tensorfile``; files written elsewhere
    carry none).

    The file is opened around each read only: the pages of a memory-mapped file stay resident
    while it is open, so reading every tensor through one open file would hold the whole file
    in memory besides the arrays read from it. At most one tensor's pages are mapped at once.
    """
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with open_safetensors(file) as f:
            present = set(f.keys())
            sums = checksums(f, file)
        for name in names:
            if name not in present:
                raise CheckpointError(f"{file}: tensor {name!r} listed in the index is absent")
            with open_safetensors(file) as f:
                try:
                    array = f.get_tensor(name)
                except (SafetensorError, OSError) as e:
                    raise unreadable(file, e, name) from None
            check_array(file, name, array, sums.get(name))
            yield name, array
            del array


def checksums(f: Any, path: Path) -> dict[str, Any]:
    """The per-tensor checksums an open safetensors file records (``tensorfile``)."""
    try:
        return tensorfile.checksums(f.metadata(), path)
    except tensorfile.TensorFileError as e:
        raise CheckpointError(str(e)) from None


def verify_file(path: Path) -> None:
    """``tensorfile.verify`` as a CheckpointError: the header checked, and every tensor's
    bytes against the checksums the file records (one streamed read of a file that has them),
    for readers that take a tensor in pieces and never hold it whole."""
    try:
        tensorfile.verify(path)
    except tensorfile.TensorFileError as e:
        raise CheckpointError(str(e)) from None
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file (named by the checkpoint index)") from None


def check_array(path: Path, name: str, array: np.ndarray, recorded: Any) -> None:
    """``tensorfile.check_array`` as a CheckpointError."""
    try:
        tensorfile.check_array(path, name, array, recorded)
    except tensorfile.TensorFileError as e:
        raise CheckpointError(str(e)) from None


def set_leaf(tree: Params, path: tuple[Any, ...], value: Any) -> None:
    """Put ``value`` at ``path`` of a param tree, creating dicts and layer lists on the way."""
    node: Any = tree
    for key, nxt in itertools.pairwise(path):
        if isinstance(key, int):
            node = node[key]
        else:
            node = node.setdefault(key, [] if isinstance(nxt, int) else {})
            if isinstance(nxt, int):
                while len(node) <= nxt:
                    node.append({})
    node[path[-1]] = value


def load_model(
    model_dir: str | os.PathLike[str],
    dtype: Any = np.float32,
    quantize: Callable[[tuple[Any, ...]], bool] | None = None,
    blocksize: int = DEFAULT_BLOCKSIZE,
    double_quant: bool = True,
) -> tuple[ModelConfig, Params]:
    """Read a checkpoint into the spec's param tree.

    Args:
      model_dir: a directory with config.json and safetensors weights.
      dtype: NumPy dtype of the float arrays (float32 or float64).
      quantize: ``quantize(path) -> bool`` picks projection kernels (paths
        ``("layers", i, group, name, "kernel")``) to hold as NF4 as they are read (QLoRA);
        embeddings and the head always stay float. None keeps all float.
      blocksize, double_quant: NF4 settings.
    Returns:
      ``(cfg, params)``.
    Raises:
      CheckpointError: unsupported config, missing / extra / mis-shaped / non-float tensor,
        unreadable file; the message names the file and tensor.
    """
    model_dir = Path(model_dir)
    cfg = load_config(model_dir)
    expected = {t.name: t for t in hf_tensors(cfg)}
    files = weight_files(model_dir)
    check_tensor_names(model_dir, expected, files)
    values: dict[str, Any] = {}
    for name, array in iter_tensors({n: f for n, f in files.items() if n in expected}):
        t = expected[name]
        if tuple(array.shape) != t.shape:
            raise CheckpointError(
                f"{files[name]}: tensor {name!r} has shape {list(array.shape)}, "
                f"expected {list(t.shape)}"
            )
        if array.dtype.name not in FLOAT_DTYPES:
            raise CheckpointError(
                f"{files[name]}: tensor {name!r} has dtype {array.dtype}, expected a float"
            )
        value = array.T if t.transpose else array
        projection = t.path[0] == "layers" and t.path[-1] == "kernel"
        if quantize is not None and projection and quantize(t.path):
            values[name] = quantize_kernel(value.astype(np.float32), blocksize, double_quant)
        else:
            values[name] = np.ascontiguousarray(value, dtype=dtype)
        del array, value
    params: Params = {}
    for t in expected.values():  # the tree in the canonical order of hf_tensors
        set_leaf(params, t.path, values.pop(t.name))
    return cfg, params


# --- writing --------------------------------------------------------------------------


def get_leaf(params: Params, path: tuple[Any, ...]) -> Any:
    """The value at ``path`` of a param tree."""
    node: Any = params
    for key in path:
        node = node[key]
    return node


def hf_state(params: Params, cfg: ModelConfig, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """``{checkpoint name: array}`` in PyTorch layout. NF4 kernels must be merged first."""
    out = {}
    for t in hf_tensors(cfg):
        value = get_leaf(params, t.path)
        if isinstance(value, NF4Tensor):
            raise ValueError(f"{t.name}: an NF4 kernel; dequantize or merge before saving")
        out[t.name] = np.ascontiguousarray((value.T if t.transpose else value).astype(dtype))
    return out


def save_model(
    params: Params,
    cfg: ModelConfig,
    out_dir: str | os.PathLike[str],
    *,
    dtype: Any = np.float32,
    tokenizer_from: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (+ the tokenizer files of
    ``tokenizer_from``) so transformers loads the model. Atomic: see ``atomic_dir``."""
    with atomic_dir(out_dir, overwrite) as tmp:
        state = hf_state(params, cfg, dtype)
        tensorfile.save(state, tmp / "model.safetensors", metadata={"format": "pt"})
        name = np.dtype(dtype).name  # "dtype" for transformers 5, "torch_dtype" for 4
        write_json(tmp / "config.json", {**config_to_hf(cfg), "dtype": name, "torch_dtype": name})
        if tokenizer_from is not None:
            copy_tokenizer(Path(tokenizer_from), tmp)
    return Path(out_dir)


def copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy whichever tokenizer files ``src`` has into ``dst``."""
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


def n_params(cfg: ModelConfig) -> int:
    """Parameter count of the base model."""
    return sum(math.prod(t.shape) for t in hf_tensors(cfg))
