"""The train step: one jitted function, AdamW (optax) over the trainable leaves only.

The model is split once into ``graphdef`` (static structure), ``params`` (the
``nnx.Param`` leaves: every base weight in full fine-tuning, the ``nnx.LoRAParam`` adapters
otherwise) and ``rest`` (frozen base, NF4 state). Only ``params`` and the optimizer state
go through the optimizer, and both are donated to the step, so their buffers are updated
in place.

The step is the spec's step (``ref_numpy.optim``)::

    loss, grads = mean token loss over the whole batch and its gradient
    grads, gnorm = clip_by_global_norm(grads, max_norm)
    params = adamw(params, grads, lr = warmup_cosine(step))

Gradient accumulation splits the batch into ``A`` micro-batches ``[A, B, T]`` and sums
their token losses and gradients before dividing by the batch's token count, so it gives
exactly the gradient of the whole batch (not a mean of micro-batch means).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import shutil
import sys
import time
import typing
from collections.abc import Callable
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from ref_numpy.config import LoraConfig, ModelConfig, attn_shapes, mlp_shapes
from ref_numpy.formats import bnb, files, hf
from ref_numpy.lora import matches_target
from ref_numpy.nf4 import nf4_bits_per_param

from ..layers import cross_entropy
from ..model import EngineConfig, Model, Remat, to_spec, trainable_params
from .checkpoint import load_pretrained, load_train_state, save_adapter, save_train_state
from .data import (
    DataError,
    Row,
    batches,
    bucket_lengths,
    encode_file,
    num_batches,
    pack,
    unpacked_rows,
)

Array = jax.Array
Batch = dict[str, Array]


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with global-norm clipping and a linear-warmup + cosine schedule."""

    lr: float = 2e-4  # peak learning rate
    warmup_steps: int = 0  # linear warmup from 0 to lr
    total_steps: int = 100  # the cosine reaches end_lr here
    end_lr: float = 0.0  # learning rate after total_steps
    b1: float = 0.9  # AdamW first-moment decay
    b2: float = 0.999  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW denominator epsilon
    weight_decay: float = 0.0  # decoupled weight decay
    max_grad_norm: float | None = 1.0  # clip the global gradient norm; None: no clipping

    def __post_init__(self) -> None:
        if not self.total_steps > self.warmup_steps >= 0:
            raise ValueError(
                f"OptimConfig.warmup_steps: expected 0 <= warmup_steps < total_steps="
                f"{self.total_steps}, got {self.warmup_steps}"
            )
        if not self.lr >= 0:
            raise ValueError(f"OptimConfig.lr: expected >= 0, got {self.lr}")


def schedule(cfg: OptimConfig) -> Callable[[Array], Array]:
    """The spec's ``warmup_cosine``, evaluated at optax's step count.

    optax keeps its count as int32, and its schedule at an int32 count is float32 even
    under x64; casting the count to the widest int keeps float64 runs in float64.
    """
    inner = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.total_steps,
        end_value=cfg.end_lr,
    )
    wide = jnp.int64 if jax.dtypes.canonicalize_dtype(jnp.int64) == jnp.int64 else jnp.int32
    return lambda count: inner(jnp.asarray(count).astype(wide))


def optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """``clip_by_global_norm`` then ``adamw`` with the schedule (as ``ref_numpy.optim``)."""
    adamw = optax.adamw(
        schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay
    )
    if cfg.max_grad_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw)


def token_loss_sum(
    graphdef: Any, params: Any, rest: Any, batch: Batch, key: Array | None
) -> tuple[Array, Array]:
    """``(sum of token losses, counted tokens)`` of one batch ``[B, T]``."""
    model = nnx.merge(graphdef, params, rest)
    logits = model(
        batch["input_ids"],
        positions=batch.get("positions"),
        attention_mask_2d=batch.get("attention_mask"),
        segment_ids=batch.get("segment_ids"),
        dropout_key=key,
    )
    loss, count = cross_entropy(logits[:, :-1], batch["labels"][:, 1:])
    return loss * count, count


@dataclasses.dataclass
class Trainer:
    """Holds the split model and optimizer state and runs jitted steps.

    ``step(batch)`` takes arrays ``[A, B, T]`` (A micro-batches of gradient accumulation;
    A = 1 without it) with ``input_ids`` and ``labels`` and optionally ``attention_mask``,
    ``positions`` and ``segment_ids``; it returns ``{"loss", "grad_norm", "lr", "tokens"}``.
    """

    graphdef: Any
    params: Any
    rest: Any
    opt_state: Any
    tx: optax.GradientTransformation
    lr_at: Callable[[Array], Array]
    dropout_seed: int = 0
    step_count: int = 0

    @classmethod
    def create(cls, model: Model, cfg: OptimConfig, dropout_seed: int = 0) -> Trainer:
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)  # type: ignore[misc]
        tx = optimizer(cfg)
        return cls(graphdef, params, rest, tx.init(params), tx, schedule(cfg), dropout_seed)

    def __post_init__(self) -> None:
        self._step = jax.jit(self._step_impl, donate_argnums=(0, 1))

    def _step_impl(
        self, params: Any, opt_state: Any, rest: Any, batch: Batch, step: Array
    ) -> tuple[Any, Any, dict[str, Array]]:
        key = jax.random.fold_in(jax.random.key(self.dropout_seed), step)  # dropout per step

        def micro(carry: tuple[Any, Array, Array], xs: tuple[Batch, Array]) -> tuple[Any, None]:
            grads, total, count = carry
            mb, i = xs
            (s, n), g = _sum_and_grad(self.graphdef, params, rest, mb, key, i)
            grads = jax.tree.map(jnp.add, grads, g)
            return (grads, total + s, count + n.astype(count.dtype)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        n_micro = batch["input_ids"].shape[0]
        init = (zeros, jnp.zeros((), _acc(params)), jnp.zeros((), jnp.int32))
        (grads, total, count), _ = jax.lax.scan(micro, init, (batch, jnp.arange(n_micro)))
        denom = jnp.maximum(count, 1).astype(total.dtype)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = self.tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {
            "loss": total / denom,
            "grad_norm": optax.tree.norm(grads),
            "lr": self.lr_at(step),
            "tokens": count,
        }
        return params, opt_state, metrics

    def step(self, batch: dict[str, Any]) -> dict[str, Array]:
        """One optimizer step on ``batch`` (arrays ``[A, B, T]``)."""
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        self.params, self.opt_state, metrics = self._step(
            self.params, self.opt_state, self.rest, batch, jnp.asarray(self.step_count)
        )
        self.step_count += 1
        return metrics

    def model(self) -> Model:
        """The model with the current parameters."""
        return nnx.merge(self.graphdef, self.params, self.rest)


def _acc(params: Any) -> Any:
    leaves = jax.tree.leaves(params)
    return jnp.promote_types(leaves[0].dtype, jnp.float32) if leaves else jnp.float32


def _sum_and_grad(
    graphdef: Any, params: Any, rest: Any, batch: Batch, key: Array, i: Array
) -> tuple[tuple[Array, Array], Any]:
    """``((token loss sum, count), d sum / d params)`` of one micro-batch."""

    def f(p: Any) -> tuple[Array, Array]:
        return token_loss_sum(graphdef, p, rest, batch, jax.random.fold_in(key, i))

    (s, n), g = jax.value_and_grad(f, has_aux=True)(params)
    return (s, n), g


# --- a whole run: data in, adapter / weights, metrics and a loss curve out -----------------


# what --method full has no use for
LORA_FIELDS = ("rank", "alpha", "dropout", "targets", "layers_to_transform", "rslora")
ALL_LINEAR = "all-linear"  # PEFT's name for every linear layer but the output head


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything ``qlora-spec train`` takes; field names are the flags (``--max-length``),
    ``metadata["help"]`` their help, ``metadata["default_text"]`` the default in words where
    the value alone does not say it (None, or a field the CLI fills in)."""

    model: str = field(
        metadata={
            "help": "Hugging Face model directory (float or NF4 checkpoint)",
            "metavar": "DIR",
            "default_text": "the bundled base model, when --data is left out too",
        }
    )
    data: str = field(
        metadata={
            "help": "JSONL file of training examples",
            "metavar": "FILE",
            "default_text": "the bundled task, when --model is left out too",
        }
    )
    out: str = field(
        metadata={
            "help": "output directory, written only when the run completes",
            "metavar": "DIR",
            "default_text": "qlora-spec-train, with the bundled model and task",
        }
    )
    method: Literal["full", "lora", "qlora"] = field(
        default="qlora",
        metadata={
            "help": "what trains: every weight (full), adapters beside a float base (lora) "
            "or beside an NF4 base (qlora)"
        },
    )
    rank: int = field(default=8, metadata={"help": "LoRA rank R"})
    alpha: float = field(
        default=16.0, metadata={"help": "LoRA alpha: adapters are scaled by alpha / R"}
    )
    dropout: float = field(
        default=0.05, metadata={"help": "LoRA dropout probability on the adapter input"}
    )
    targets: tuple[str, ...] = field(
        default=(ALL_LINEAR,),
        metadata={
            "help": "projections that get an adapter: module names as the checkpoint spells "
            "them (q_proj v_proj, or q_proj,v_proj), regular expressions over the path "
            "(layers\\.0\\.attn\\..*), or all-linear: every projection of every block"
        },
    )
    layers_to_transform: tuple[int, ...] | None = field(
        default=None,
        metadata={
            "help": "adapt only these blocks (0-based, e.g. 0,2), as PEFT's layers_to_transform",
            "default_text": "every block",
            "metavar": "I",
        },
    )
    rslora: bool = field(default=False, metadata={"help": "scale adapters by alpha / sqrt(R)"})
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate"})
    warmup: int = field(default=0, metadata={"help": "steps of linear warmup from 0 to --lr"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decoupled weight decay"})
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "clip the gradient to this global norm"}
    )
    batch_size: int = field(default=4, metadata={"help": "rows per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_length: int | None = field(
        default=None,
        metadata={
            "help": "tokens per row, at most the model's max_position_embeddings",
            "default_text": "the model's context, at most 512",
        },
    )
    packing: bool = field(default=True, metadata={"help": "pack several examples into a row"})
    steps: int | None = field(
        default=None,
        metadata={"help": "optimizer steps", "default_text": "--epochs passes over the data"},
    )
    epochs: int = field(
        default=1, metadata={"help": "passes over the data, when --steps is not given"}
    )
    eval_split: float = field(
        default=0.0, metadata={"help": "fraction of the examples held out for an eval loss"}
    )
    eval_interval: int = field(
        default=0,
        metadata={"help": "steps between eval losses, with --eval-split; 0: only at the end"},
    )
    seed: int = field(default=0, metadata={"help": "seed of data order, adapter init, dropout"})
    dtype: Literal["float32", "bfloat16", "float64"] = field(
        default="float32",
        metadata={"help": "compute dtype; float64 runs JAX in 64-bit mode"},
    )
    param_dtype: Literal["float32", "bfloat16", "float64"] = field(
        default="float32",
        metadata={"help": "dtype of the stored weights, gradients and AdamW state"},
    )
    remat: Remat = field(
        default="none",
        metadata={
            "help": "rematerialisation per block: none keeps every activation, full "
            "recomputes the block in the backward pass, dots keeps the projections' outputs"
        },
    )
    checkpoint_interval: int = field(
        default=50, metadata={"help": "steps between resumable checkpoints"}
    )
    train_on_prompt: bool = field(
        default=False, metadata={"help": "count prompt tokens in the loss too"}
    )
    on_overflow: Literal["truncate", "error"] = field(
        default="truncate",
        metadata={"help": "an example longer than --max-length is cut (truncate) or refused"},
    )
    resume: bool = field(
        default=False,
        metadata={
            "help": "continue the unfinished run for this --out from its last checkpoint "
            "(refused if the config or data changed)"
        },
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "replace an existing --out, or start an unfinished run again"},
    )

    def __post_init__(self) -> None:
        for name, allowed in field_choices(TrainConfig).items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"TrainConfig.{name}: expected one of {list(allowed)}, "
                    f"got {getattr(self, name)!r}"
                )
        for name in ("rank", "batch_size", "grad_accum", "epochs", "checkpoint_interval"):
            if not getattr(self, name) >= 1:
                raise ValueError(f"TrainConfig.{name}: expected >= 1, got {getattr(self, name)}")
        for name in ("max_length", "steps"):
            if getattr(self, name) is not None and not getattr(self, name) >= 1:
                raise ValueError(f"TrainConfig.{name}: expected >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.eval_split < 1.0:
            raise ValueError(f"TrainConfig.eval_split: expected 0 <= x < 1, got {self.eval_split}")
        if self.eval_interval < 0:
            raise ValueError(f"TrainConfig.eval_interval: expected >= 0, got {self.eval_interval}")
        if self.eval_interval and not self.eval_split:
            raise ValueError(
                f"TrainConfig.eval_interval: --eval-interval {self.eval_interval} needs "
                "--eval-split > 0 (without it nothing is held out to evaluate)"
            )
        bad = [t for t in self.targets if not isinstance(t, str) or not t or "," in t]
        if isinstance(self.targets, str) or not self.targets or bad:
            raise ValueError(
                f"TrainConfig.targets: expected a non-empty tuple of names, got {self.targets!r}"
            )
        if ALL_LINEAR in self.targets and len(self.targets) > 1:
            raise ValueError(
                f"TrainConfig.targets: {ALL_LINEAR} already selects every projection; "
                f"got {list(self.targets)}"
            )

    def work_dir(self) -> Path:
        """Where checkpoints of an unfinished run live (beside --out, never in it)."""
        out = Path(self.out)
        return out.parent / f".{out.name}.run"


def field_choices(cls: Any) -> dict[str, tuple[Any, ...]]:
    """``{field: allowed values}`` for the fields of dataclass ``cls`` annotated ``Literal``."""
    hints = typing.get_type_hints(cls)
    return {
        f.name: typing.get_args(hints[f.name])
        for f in dataclasses.fields(cls)
        if typing.get_origin(hints[f.name]) is Literal
    }


def resolve_max_length(max_length: int | None, context: int) -> int:
    """``max_length``, or ``min(512, context)`` when None; refuses one above ``context`` (the
    model's ``max_position_embeddings``), naming the flag."""
    if max_length is None:
        return min(512, context)
    if max_length > context:
        raise ValueError(
            f"--max-length {max_length} exceeds the model's max_position_embeddings ({context})"
        )
    return max_length


def resolve_targets(targets: tuple[str, ...], cfg: ModelConfig) -> tuple[str, ...]:
    """The LoRA targets for ``cfg``: ``all-linear`` becomes the names of every projection of
    a block (PEFT's meaning: every linear layer but the output head); any other target must
    select a projection (an error names ``--targets`` and the valid names)."""
    names = sorted({*attn_shapes(cfg), *mlp_shapes(cfg)})
    if targets == (ALL_LINEAR,):
        return tuple(names)
    paths = [f"layers.{i}.{g}.{n}" for i in range(cfg.n_layers) for g, n in _projections(cfg)]
    for t in targets:
        if not any(matches_target(p, (t,)) for p in paths):
            raise ValueError(
                f"--targets: {t!r} matches no projection of this {cfg.family} model; "
                f"valid: {', '.join([*names, ALL_LINEAR])} (or a regular expression over "
                "paths like layers.0.attn.q_proj)"
            )
    return targets


def _projections(cfg: ModelConfig) -> list[tuple[str, str]]:
    return [("attn", n) for n in attn_shapes(cfg)] + [("mlp", n) for n in mlp_shapes(cfg)]


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient; the last good checkpoint is kept."""


def _lora_config(tc: TrainConfig) -> LoraConfig | None:
    if tc.method == "full":
        return None
    return LoraConfig(
        rank=tc.rank,
        alpha=tc.alpha,
        dropout=tc.dropout,
        targets=tc.targets,
        layers_to_transform=tc.layers_to_transform,
        use_rslora=tc.rslora,
        seed=tc.seed,
    )


def prepare_rows(
    tc: TrainConfig, max_length: int, vocab_size: int
) -> tuple[list[Row], list[Row], Any, dict]:
    """Train rows, eval rows, the tokenizer and data statistics, from the JSONL file."""
    encoded, truncated, tok, fmt = encode_file(
        tc.model,
        tc.data,
        vocab_size,
        max_length,
        train_on_prompt=tc.train_on_prompt,
        on_overflow=tc.on_overflow,
    )
    order = np.random.default_rng(tc.seed).permutation(len(encoded))
    n_eval = round(tc.eval_split * len(encoded))
    if tc.eval_split and not n_eval:
        raise DataError(
            f"{tc.data}: --eval-split {tc.eval_split} of {len(encoded)} examples holds out none"
        )
    held = [encoded[i] for i in order[:n_eval]]
    train = [encoded[i] for i in sorted(order[n_eval:])]
    if not train:
        raise DataError(f"{tc.data}: no training examples left after the eval split")
    to_rows = (lambda e: pack(e, max_length)) if tc.packing else unpacked_rows
    stats = {
        "format": fmt,
        "examples": len(encoded),
        "truncated": truncated,
        "eval_examples": n_eval,
    }
    return to_rows(train), (to_rows(held) if held else []), tok, stats


def evaluate(
    trainer: Trainer, rows: list[Row], tc: TrainConfig, buckets: list[int], pad_id: int | None
) -> tuple[float, int]:
    """Mean token loss and token count over ``rows`` (no dropout)."""
    total, count = 0.0, 0
    for batch in batches(rows, tc.batch_size, 1, buckets, seed=0, epoch=0, pad_id=pad_id):
        s, n = _eval_step(
            trainer.graphdef,
            trainer.params,
            trainer.rest,
            {k: jnp.asarray(v[0]) for k, v in batch.items()},
        )
        total, count = total + float(s), count + int(n)
    return total / max(count, 1), count


@functools.partial(jax.jit, static_argnums=0)
def _eval_step(graphdef: Any, params: Any, rest: Any, batch: Batch) -> tuple[Array, Array]:
    return token_loss_sum(graphdef, params, rest, batch, None)


def run(tc: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """Train, then write ``tc.out`` (adapter or weights, metrics.jsonl, loss.png,
    train_config.json, summary.json). Returns the summary. Raises TrainingDiverged on a
    non-finite loss. A float64 ``dtype`` or ``param_dtype`` runs in JAX's 64-bit mode."""
    x64 = "float64" in (tc.dtype, tc.param_dtype)
    with jax.enable_x64(True) if x64 else contextlib.nullcontext():
        return _run(tc, progress)


def _run(tc: TrainConfig, progress: bool) -> dict[str, Any]:
    out, work = Path(tc.out), tc.work_dir()
    if out.exists() and not tc.overwrite:
        raise FileExistsError(f"{out}: exists (pass --overwrite to replace it)")
    if work.exists() and not tc.resume:
        if not tc.overwrite:
            raise FileExistsError(
                f"{work}: an unfinished run for {out} (pass --resume to continue it, "
                "or --overwrite to start again)"
            )
        shutil.rmtree(work)
    if bnb.is_nf4_checkpoint(tc.model) and tc.method != "qlora":
        raise ValueError(
            f"{tc.model}: a 4-bit (NF4) checkpoint; --method {tc.method} needs the float "
            "checkpoint (use --method qlora to train adapters beside the NF4 base)"
        )
    base_cfg = hf.load_config(tc.model)
    max_length = resolve_max_length(tc.max_length, base_cfg.max_seq_len)
    tc = dataclasses.replace(  # as the run uses it, which train_config.json records
        tc,
        max_length=max_length,
        targets=tc.targets if tc.method == "full" else resolve_targets(tc.targets, base_cfg),
    )
    resuming = tc.resume and (work / "checkpoint").exists()
    record = run_record(tc)
    if resuming:
        check_unchanged(work, record)
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}
    eng = EngineConfig(
        param_dtype=dtypes[tc.param_dtype],
        dtype=dtypes[tc.dtype],
        remat=tc.remat,
        quantize=tc.method == "qlora",
    )
    cfg, model = load_pretrained(tc.model, _lora_config(tc), eng)
    rows, held, tok, stats = prepare_rows(tc, max_length, cfg.vocab_size)
    pad_id = tok.pad_id if tok is not None else None  # token-id data may come without one
    buckets = bucket_lengths(max_length)
    per_epoch = num_batches(len(rows), tc.batch_size, tc.grad_accum)
    total = tc.steps if tc.steps is not None else tc.epochs * per_epoch
    opt = OptimConfig(
        lr=tc.lr,
        warmup_steps=tc.warmup,
        total_steps=max(total, tc.warmup + 1),
        weight_decay=tc.weight_decay,
        max_grad_norm=tc.max_grad_norm,
    )
    trainer = Trainer.create(model, opt, dropout_seed=tc.seed)
    work.mkdir(parents=True, exist_ok=True)
    metrics_path = work / "metrics.jsonl"
    last: dict[str, Any] = {}
    if resuming:
        trainer.params, trainer.opt_state, meta = load_train_state(
            work / "checkpoint", trainer.params, trainer.opt_state
        )
        trainer.step_count = int(meta["step"])
        lines = metrics_path.read_text().splitlines() if metrics_path.exists() else []
        kept = [x for x in lines if json.loads(x)["step"] <= trainer.step_count]
        metrics_path.write_text("".join(x + "\n" for x in kept))
        last = json.loads(kept[-1]) if kept else {}
    else:  # the record a later --resume is checked against
        metrics_path.write_text("")
        for name, value in record.items():
            files.write_json(work / name, value)

    bar = tqdm(total=total, initial=trainer.step_count, disable=not progress, unit="step")
    t_start, tokens_done, loss_tokens_done = time.perf_counter(), 0, 0
    with metrics_path.open("a") as log:
        while trainer.step_count < total:
            epoch, start = divmod(trainer.step_count, per_epoch)
            for batch in batches(
                rows,
                tc.batch_size,
                tc.grad_accum,
                buckets,
                seed=tc.seed,
                epoch=epoch,
                start=start,
                pad_id=pad_id,
            ):
                m = {k: float(v) for k, v in trainer.step(batch).items()}
                step = trainer.step_count
                if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
                    raise TrainingDiverged(
                        f"step {step}: non-finite loss or gradient (loss={m['loss']}, "
                        f"grad_norm={m['grad_norm']}); last good checkpoint kept in {work}"
                    )
                tokens = int(batch["attention_mask"].sum())  # every real input token
                loss_tokens = int(m.pop("tokens"))
                tokens_done, loss_tokens_done = tokens_done + tokens, loss_tokens_done + loss_tokens
                seconds = time.perf_counter() - t_start
                m.update(
                    step=step,
                    tokens=tokens,
                    loss_tokens=loss_tokens,
                    tokens_per_s=tokens_done / seconds,
                    loss_tokens_per_s=loss_tokens_done / seconds,
                )
                if held and tc.eval_interval and step % tc.eval_interval == 0:
                    m["eval_loss"] = evaluate(trainer, held, tc, buckets, pad_id)[0]
                log.write(json.dumps(m) + "\n")
                log.flush()
                bar.update(1)
                bar.set_postfix(
                    loss=f"{m['loss']:.4f}",
                    tok_s=f"{m['tokens_per_s']:.0f}",
                    loss_tok_s=f"{m['loss_tokens_per_s']:.0f}",
                )
                last = m
                if step % tc.checkpoint_interval == 0 or step == total:
                    save_train_state(
                        work / "checkpoint", trainer.params, trainer.opt_state, {"step": step}
                    )
                if step >= total:
                    break
    bar.close()
    summary = _summary(trainer, cfg, stats, last)
    if held:
        summary["eval_loss"], summary["eval_tokens"] = evaluate(trainer, held, tc, buckets, pad_id)
    with files.atomic_dir(out, tc.overwrite) as tmp:
        final = trainer.model()
        if tc.method == "full":
            hf.save_model(to_spec(final), cfg, tmp / "model", tokenizer_from=tc.model)
            for f in (tmp / "model").iterdir():
                f.rename(tmp / f.name)
            (tmp / "model").rmdir()
        else:
            save_adapter(final, tmp / "adapter", base_model=tc.model)
            for f in (tmp / "adapter").iterdir():
                f.rename(tmp / f.name)
            (tmp / "adapter").rmdir()
        shutil.copy2(metrics_path, tmp / "metrics.jsonl")
        shutil.copy2(work / "train_config.json", tmp / "train_config.json")  # as first started
        files.write_json(tmp / "summary.json", summary)
        plot_loss(tmp / "metrics.jsonl", tmp / "loss.png")
    shutil.rmtree(work)
    return summary


def run_record(tc: TrainConfig) -> dict[str, Any]:
    """What a run's work directory records when it starts, for ``--resume`` to check:
    ``train_config.json`` (every field, as resolved for the model) and ``inputs.json``
    (size and sha256 of the data file and of the model's ``config.json``)."""
    return {
        "train_config.json": json.loads(json.dumps(dataclasses.asdict(tc))),
        "inputs.json": {
            "data": _file_id(Path(tc.data)),
            "model_config": _file_id(Path(tc.model) / "config.json"),
        },
    }


def _file_id(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


RESUME_EXEMPT = ("resume", "overwrite", "checkpoint_interval")  # may change on --resume


def check_unchanged(work: Path, record: dict[str, Any]) -> None:
    """Refuse to resume the run in ``work`` when its config or inputs differ from
    ``record`` (``run_record`` of the resuming config), naming each change."""
    changes = []
    for name in record:
        if not (work / name).is_file():
            raise ValueError(
                f"--resume: {work / name} is missing, so the unfinished run cannot be checked "
                "(pass --overwrite to start again)"
            )
    then = json.loads((work / "train_config.json").read_text())
    now = record["train_config.json"]
    for key in sorted(set(then) | set(now)):
        if key not in RESUME_EXEMPT and then.get(key) != now.get(key):
            changes.append(f"{key} changed from {then.get(key)!r} to {now.get(key)!r}")
    inputs = json.loads((work / "inputs.json").read_text())
    for key, what in (("data", "data file"), ("model_config", "model config")):
        a, b = inputs.get(key, {}), record["inputs.json"][key]
        if (a.get("bytes"), a.get("sha256")) != (b["bytes"], b["sha256"]):
            changes.append(
                f"{what} {b['path']} changed (size {a.get('bytes')} -> {b['bytes']} bytes, "
                f"sha256 {str(a.get('sha256'))[:12]}... -> {b['sha256'][:12]}...)"
            )
    if changes:
        raise ValueError(
            f"--resume: {'; '.join(changes)} since the checkpoint in {work} "
            "(resume with the same config and data, or pass --overwrite to start again)"
        )


def _summary(trainer: Trainer, cfg: Any, stats: dict, last: dict) -> dict:
    trainable = trainable_params(trainer.model())  # the selected layers' adapters only
    base = hf.n_params(cfg)
    proj = sum(int(np.prod(s)) for s in (*attn_shapes(cfg).values(), *mlp_shapes(cfg).values()))
    proj *= cfg.n_layers
    gib = 2.0**30
    peak, source = peak_memory()
    return {
        **stats,
        "steps": trainer.step_count,
        "trainable_params": trainable,
        "trainable_percent": 100.0 * trainable / base,
        "base_params": base,
        "base_weight_gib": {
            "16-bit": base * 2 / gib,
            "nf4": ((base - proj) * 16 + proj * nf4_bits_per_param(64, False)) / 8 / gib,
            "nf4_double_quant": ((base - proj) * 16 + proj * nf4_bits_per_param()) / 8 / gib,
        },
        "peak_memory_bytes": peak,
        "peak_memory_source": source,
        "final_train_loss": last.get("loss"),
    }


def peak_memory() -> tuple[int, str]:
    """``(bytes, source)``: the first device's peak where the backend reports it (GPU, TPU;
    source ``"device"``), else the process's peak resident set size (CPU; ``"process_rss"``).
    """
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device"
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return int(rss) * (1 if sys.platform == "darwin" else 1024), "process_rss"


def plot_loss(metrics: Path, png: Path) -> None:
    """Train (and eval) loss against step, as a PNG."""
    plot_losses({"train": metrics}, png)


def plot_losses(runs: dict[str, Path], png: Path) -> None:
    """The train loss of each run's ``metrics.jsonl`` against step (and its eval loss, where
    logged), as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    for label, metrics in runs.items():
        rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=label)
        ev = [r for r in rows if "eval_loss" in r]
        if ev:
            ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("mean token loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
