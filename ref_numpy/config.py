"""Model and adapter configuration: one frozen dataclass per concern.

Conventions that hold across the whole project (stated once, here):

* Kernels are stored ``[in, out]`` so a linear layer is ``y = x @ W + b``. PyTorch's
  ``nn.Linear`` stores ``[out, in]``; the Hugging Face loader transposes on the way in and
  every exporter transposes on the way out. (GPT-2's ``Conv1D`` already stores ``[in, out]``.)
* Axis letters: B batch, T query positions, S key positions, D model width, F MLP width,
  V vocabulary, N query heads, K key/value heads, G = N // K, H head dim, R LoRA rank.
* NF4 kernels hold the quantized ``W.T`` (the PyTorch ``[out, in]`` row-major order) so that
  the packed bytes are the ones bitsandbytes writes; see ``nf4.py``.

Three architecture families share one forward pass and differ only in these fields:

==========  ===========  ==========  ===========  ==========  ======  ====
family      position     norm        norm order   activation  bias    tied
==========  ===========  ==========  ===========  ==========  ======  ====
classic     sinusoidal   layernorm   post or pre  relu/gelu   all     no
gpt2        learned      layernorm   pre          gelu_tanh   all     yes
llama       rope         rmsnorm     pre          swiglu      none    no
==========  ===========  ==========  ===========  ==========  ======  ====

Qwen2 is the llama family with ``bias="qkv"``, Qwen3 with ``qk_norm``; Mistral v0.1 and some
Qwen2 models set ``sliding_window``; small Llama-3 models set ``tie_embeddings``.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

Family = Literal["classic", "gpt2", "llama"]
Position = Literal["sinusoidal", "learned", "rope"]
Norm = Literal["layernorm", "rmsnorm"]
NormOrder = Literal["pre", "post"]
Activation = Literal["relu", "gelu", "gelu_tanh", "swiglu"]
Bias = Literal["none", "qkv", "all"]
RopeType = Literal["linear", "llama3", "yarn"]

_CHOICES: dict[str, tuple[str, ...]] = {
    "family": ("classic", "gpt2", "llama"),
    "position": ("sinusoidal", "learned", "rope"),
    "norm": ("layernorm", "rmsnorm"),
    "norm_order": ("pre", "post"),
    "activation": ("relu", "gelu", "gelu_tanh", "swiglu"),
    "bias": ("none", "qkv", "all"),
}


# The RopeScaling fields each rope_type reads; the others must keep their defaults.
ROPE_FIELDS: dict[str, frozenset[str]] = {
    "linear": frozenset({"factor"}),
    "llama3": frozenset(
        {"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"}
    ),
    "yarn": frozenset(
        {
            "factor",
            "original_max_position_embeddings",
            "beta_fast",
            "beta_slow",
            "truncate",
            "attention_factor",
        }
    ),
}


def _check_choice(owner: str, name: str, value: object, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{owner}.{name}: expected one of {list(choices)}, got {value!r}")


def _check_positive(owner: str, name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{owner}.{name}: expected a positive int, got {value!r}")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling for a longer context, as Hugging Face's ``rope_type``.

    * ``"linear"`` (position interpolation): every frequency is divided by ``factor``.
    * ``"llama3"``: long wavelengths are divided by ``factor``, short ones kept, the band
      between blended (``low_freq_factor``, ``high_freq_factor``).
    * ``"yarn"``: the same three bands, set by how many rotations a pair makes over the
      original context (``beta_fast``, ``beta_slow``), and cos / sin multiplied by
      ``attention_factor``.
    """

    rope_type: RopeType  # which scheme (see above)
    factor: float  # context extension: the scaled frequencies are divided by this
    original_max_position_embeddings: int | None = None  # llama3, yarn: pre-training context
    low_freq_factor: float | None = None  # llama3: wavelengths above ctx / this are scaled
    high_freq_factor: float | None = None  # llama3: wavelengths below ctx / this are kept
    beta_fast: float = 32.0  # yarn: pairs making more rotations than this over ctx are kept
    beta_slow: float = 1.0  # yarn: pairs making fewer rotations than this are scaled
    truncate: bool = True  # yarn: round the blended band's ends to whole pairs
    attention_factor: float | None = None  # yarn: cos / sin multiplier; None: 0.1 ln(f) + 1

    def __post_init__(self) -> None:
        owner = "RopeScaling"
        _check_choice(owner, "rope_type", self.rope_type, tuple(ROPE_FIELDS))
        used = ROPE_FIELDS[self.rope_type]
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name not in used and f.name != "rope_type" and v != f.default:
                raise ValueError(
                    f"{owner}.{f.name}: not used by rope_type={self.rope_type!r}, got {v!r}"
                )
        for name in sorted(used - {"original_max_position_embeddings", "truncate"}):
            v = getattr(self, name)
            if name == "attention_factor" and v is None:
                continue  # derived from factor
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{owner}.{name}: expected a positive number, got {v!r}")
        if "original_max_position_embeddings" in used:
            _check_positive(
                owner, "original_max_position_embeddings", self.original_max_position_embeddings
            )
        low, high = self.low_freq_factor, self.high_freq_factor
        if low is not None and high is not None and not high > low:
            raise ValueError(
                f"{owner}.high_freq_factor: expected > low_freq_factor ({low}), got {high}"
            )


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer. See the module docstring for the families."""

    family: Family  # which architecture family (decides the checkpoint names)
    vocab_size: int  # V
    d_model: int  # D, residual stream width
    n_layers: int  # number of decoder blocks
    n_heads: int  # N, query heads
    d_ff: int  # F, MLP hidden width
    max_seq_len: int  # longest position the model accepts
    n_kv_heads: int | None = None  # K, key/value heads; None means N (no grouping)
    head_dim: int | None = None  # H; None means D // N
    position: Position = "rope"  # how positions enter the model
    norm: Norm = "rmsnorm"  # normalisation layer
    norm_order: NormOrder = "pre"  # pre-LN (GPT-2, Llama) or post-LN (the 2017 paper)
    norm_eps: float = 1e-5  # epsilon inside the norm's square root
    activation: Activation = "swiglu"  # MLP non-linearity; swiglu uses gate_proj
    bias: Bias = "none"  # which linear layers carry a bias
    tie_embeddings: bool = False  # lm_head reuses the token embedding matrix
    scale_embeddings: bool = False  # multiply token embeddings by sqrt(D) (the 2017 paper)
    rope_theta: float = 10000.0  # RoPE base wavelength
    rope_scaling: RopeScaling | None = None  # linear / llama3 / yarn frequency scaling, or None
    sliding_window: int | None = None  # a query sees only this many latest keys (itself too)
    sliding_layers: tuple[int, ...] | None = None  # layers with the window; None: every layer
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Qwen3)

    def __post_init__(self) -> None:
        owner = "ModelConfig"
        for name, choices in _CHOICES.items():
            _check_choice(owner, name, getattr(self, name), choices)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            _check_positive(owner, name, getattr(self, name))
        if self.n_kv_heads is not None:
            _check_positive(owner, "n_kv_heads", self.n_kv_heads)
            if self.n_heads % self.n_kv_heads:
                raise ValueError(
                    f"{owner}.n_kv_heads: must divide n_heads={self.n_heads}, got {self.n_kv_heads}"
                )
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"{owner}.head_dim: d_model={self.d_model} is not divisible by "
                    f"n_heads={self.n_heads}; set head_dim explicitly"
                )
        else:
            _check_positive(owner, "head_dim", self.head_dim)
        if self.position == "rope" and self.hd % 2:
            raise ValueError(f"{owner}.head_dim: rope needs an even head_dim, got {self.hd}")
        if self.position == "sinusoidal" and self.d_model % 2:
            raise ValueError(
                f"{owner}.d_model: sinusoidal positions need an even width, got {self.d_model}"
            )
        if not self.norm_eps > 0:
            raise ValueError(f"{owner}.norm_eps: expected > 0, got {self.norm_eps!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"{owner}.rope_theta: expected > 0, got {self.rope_theta!r}")
        if self.rope_scaling is not None and self.position != "rope":
            raise ValueError(
                f"{owner}.rope_scaling: only meaningful with position='rope', "
                f"got position={self.position!r}"
            )
        if self.family == "gpt2" and self.norm_order != "pre":
            raise ValueError(f"{owner}.norm_order: gpt2 is pre-LN, got {self.norm_order!r}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError(
                f"{owner}.rope_scaling: expected a RopeScaling or None, got {self.rope_scaling!r}"
            )
        if self.sliding_window is not None:
            _check_positive(owner, "sliding_window", self.sliding_window)
        if self.sliding_layers is not None:
            layers = self.sliding_layers
            if self.sliding_window is None:
                raise ValueError(f"{owner}.sliding_layers: set without a sliding_window")
            if (
                not isinstance(layers, tuple)
                or not layers
                or any(isinstance(i, bool) or not isinstance(i, int) for i in layers)
                or list(layers) != sorted(set(layers))
                or not 0 <= layers[0] <= layers[-1] < self.n_layers
            ):
                raise ValueError(
                    f"{owner}.sliding_layers: expected a non-empty increasing tuple of layer "
                    f"indices in [0, {self.n_layers}), got {layers!r}"
                )
        if self.qk_norm and self.fused_qkv:
            raise ValueError(f"{owner}.qk_norm: not available with gpt2's fused c_attn")

    # Derived sizes -------------------------------------------------------------------
    @property
    def n_kv(self) -> int:
        """K: key/value heads."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def hd(self) -> int:
        """H: width of one head."""
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    @property
    def fused_qkv(self) -> bool:
        """GPT-2 computes q, k and v with one ``c_attn`` projection ``[D, 3*N*H]``."""
        return self.family == "gpt2"

    def layer_window(self, i: int) -> int | None:
        """The sliding window of layer ``i``, or None where it attends to every earlier key."""
        if self.sliding_layers is not None and i not in self.sliding_layers:
            return None
        return self.sliding_window

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


ALL_LINEAR = "all-linear"  # PEFT's target for every linear layer but the output head


@dataclass(frozen=True)
class LoraConfig:
    """A LoRA adapter on selected linear layers, with PEFT semantics.

    ``y = x @ W + b + scale * dropout(x) @ A @ B`` with ``A: [in, R]``, ``B: [R, out]`` and
    ``scale = alpha / R`` (``alpha / sqrt(R)`` with rsLoRA).

    A projection is adapted when a target names or matches it and, if ``layers_to_transform``
    is set, its layer is listed there. The fields are PEFT's ``LoraConfig`` keys under short
    names (``adapter_config.json`` keeps PEFT's): ``rank`` is ``r``, ``alpha`` is
    ``lora_alpha``, ``dropout`` is ``lora_dropout``, ``targets`` is ``target_modules``.
    """

    rank: int = field(default=8, metadata={"help": "LoRA rank R (PEFT's r)"})
    alpha: float = field(
        default=16.0, metadata={"help": "adapters are scaled by alpha / R (PEFT's lora_alpha)"}
    )
    dropout: float = field(
        default=0.0,
        metadata={"help": "dropout probability on the adapter input (PEFT's lora_dropout)"},
    )
    targets: tuple[str, ...] = field(
        default=(ALL_LINEAR,),
        metadata={
            "help": "projections that get an adapter (PEFT's target_modules): module names as "
            "the checkpoint spells them (q_proj v_proj, or q_proj,v_proj), regular expressions "
            f"over the path (layers\\.0\\.attn\\..*), or {ALL_LINEAR}: every projection of "
            "every block"
        },
    )
    use_rslora: bool = field(
        default=False, metadata={"help": "scale adapters by alpha / sqrt(R) (rsLoRA)"}
    )
    seed: int = field(
        default=0,
        metadata={"help": "seed of the kaiming-uniform initialisation of A", "flag": "--lora-seed"},
    )
    layers_to_transform: tuple[int, ...] | None = field(
        default=None,
        metadata={
            "help": "adapt only these blocks (0-based, e.g. 0,2), as PEFT's layers_to_transform",
            "default_text": "every block",
            "metavar": "I",
        },
    )

    def __post_init__(self) -> None:
        _check_positive("LoraConfig", "rank", self.rank)
        if not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"LoraConfig.alpha: expected a positive number, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout: expected 0 <= p < 1, got {self.dropout!r}")
        bad = [t for t in self.targets if not isinstance(t, str) or not t or "," in t]
        if isinstance(self.targets, str) or not self.targets or bad:
            raise ValueError(
                f"LoraConfig.targets: expected a non-empty tuple of names, got {self.targets!r}"
            )
        if ALL_LINEAR in self.targets and len(self.targets) > 1:
            raise ValueError(
                f"LoraConfig.targets: {ALL_LINEAR} already selects every projection; "
                f"got {list(self.targets)}"
            )
        layers = self.layers_to_transform
        if layers is not None and (
            not isinstance(layers, tuple)
            or not layers
            or any(isinstance(i, bool) or not isinstance(i, int) for i in layers)
            or list(layers) != sorted(set(layers))
            or layers[0] < 0
        ):
            raise ValueError(
                "LoraConfig.layers_to_transform: expected None or a non-empty increasing tuple "
                f"of layer indices >= 0, got {layers!r}"
            )

    @property
    def scale(self) -> float:
        """The factor in front of ``x @ A @ B``."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def classic_config(**overrides: Any) -> ModelConfig:
    """The decoder of "Attention Is All You Need": sinusoidal, post-LN, ReLU, biases."""
    base: dict[str, Any] = dict(
        family="classic",
        position="sinusoidal",
        norm="layernorm",
        norm_order="post",
        activation="relu",
        bias="all",
        scale_embeddings=True,
    )
    return ModelConfig(**{**base, **overrides})


def gpt2_config(**overrides: Any) -> ModelConfig:
    """GPT-2: learned positions, pre-LN, GELU (tanh), biases, tied embeddings."""
    base: dict[str, Any] = dict(
        family="gpt2",
        position="learned",
        norm="layernorm",
        norm_order="pre",
        activation="gelu_tanh",
        bias="all",
        tie_embeddings=True,
    )
    return ModelConfig(**{**base, **overrides})


def llama_config(**overrides: Any) -> ModelConfig:
    """Llama family: RoPE, RMSNorm, SwiGLU, GQA, no biases (Qwen2: ``bias="qkv"``)."""
    base: dict[str, Any] = dict(
        family="llama",
        position="rope",
        norm="rmsnorm",
        norm_order="pre",
        activation="swiglu",
        bias="none",
    )
    return ModelConfig(**{**base, **overrides})


__all__ = [
    "ALL_LINEAR",
    "LoraConfig",
    "ModelConfig",
    "RopeScaling",
    "classic_config",
    "gpt2_config",
    "llama_config",
]


# --- the shape schema of a config: which projections exist, their kernels, their biases ---


def mlp_names(cfg: ModelConfig) -> tuple[str, ...]:
    """Projection names of the MLP: ``(up, down)`` or ``(gate, up, down)`` for SwiGLU."""
    if cfg.family == "gpt2":
        return ("c_fc", "c_proj")
    if cfg.activation == "swiglu":
        return ("gate_proj", "up_proj", "down_proj")
    return ("up_proj", "down_proj")


def attn_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """Kernel shape ``[in, out]`` of each attention projection."""
    d, n, kv, h = cfg.d_model, cfg.n_heads, cfg.n_kv, cfg.hd
    if cfg.fused_qkv:
        return {"c_attn": (d, (n + 2 * kv) * h), "c_proj": (n * h, d)}
    return {
        "q_proj": (d, n * h),
        "k_proj": (d, kv * h),
        "v_proj": (d, kv * h),
        "o_proj": (n * h, d),
    }


def mlp_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """Kernel shape ``[in, out]`` of each MLP projection."""
    d, f = cfg.d_model, cfg.d_ff
    *ins, down = mlp_names(cfg)
    return {**{name: (d, f) for name in ins}, down: (f, d)}


def has_bias(cfg: ModelConfig, name: str) -> bool:
    """Whether projection `name` carries a bias under `cfg.bias`."""
    return cfg.bias == "all" or (cfg.bias == "qkv" and name in ("q_proj", "k_proj", "v_proj"))


def projection_names(cfg: ModelConfig) -> list[tuple[str, str]]:
    """``(group, name)`` of every projection of a block: ``("attn", "q_proj")`` ..."""
    return [("attn", n) for n in attn_shapes(cfg)] + [("mlp", n) for n in mlp_shapes(cfg)]


def projection_paths(cfg: ModelConfig) -> list[str]:
    """The path of every projection of the model (``layers.3.attn.q_proj``), the names LoRA
    targets match."""
    names = projection_names(cfg)
    return [f"layers.{i}.{g}.{n}" for i in range(cfg.n_layers) for g, n in names]


# --- validation of config fields by their annotation ---------------------------------------


def field_choices(cls: Any) -> dict[str, tuple[Any, ...]]:
    """``{field: allowed values}`` of the dataclass ``cls``: a ``Literal`` annotation's values,
    or ``metadata["choices"]``."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if "choices" in f.metadata:
            out[f.name] = tuple(f.metadata["choices"])
        elif typing.get_origin(hints[f.name]) is Literal:
            out[f.name] = typing.get_args(hints[f.name])
    return out


def check_fields(obj: Any) -> None:
    """Refuse a value of a field with choices (``field_choices``) that is not one of them,
    naming the config class, the field and the value."""
    for name, allowed in field_choices(type(obj)).items():
        _check_choice(type(obj).__name__, name, getattr(obj, name), allowed)
