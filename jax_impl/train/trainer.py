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

With ``OptimConfig.offload_optimizer`` AdamW's moments live in host memory (``memory_kind
"pinned_host"``), the JAX counterpart of QLoRA's paged optimizers: the jitted step moves them
to the device, updates them there and moves them back, so between steps the device holds
only the parameters. ``Trainer.opt_state_shardings`` gives the placement for a step that
pins its outputs (``MeshTrainer``).

Gradient accumulation splits the batch into ``A`` micro-batches ``[A, B, T]`` and sums
their token losses and gradients before dividing by the batch's token count, so it gives
exactly the gradient of the whole batch (not a mean of micro-batch means).

``fit(trainer, batches, hooks=...)`` is a training loop on arrays: it steps the trainer on each
batch, stops on a non-finite loss or gradient, and hands every step's metrics to the hooks
(logging, evaluation, checkpoints live there). It knows no files, paths or progress bars; the
``train`` and ``pretrain`` commands (``jax_impl.apps``) are thin jobs around it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import field
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ref_numpy.formats.files import fault_point
from ref_numpy.preference import LossType, check_preference_args

from ..layers import head_cross_entropy
from ..model import Model
from ..preference import REWARD_METRICS, preference_loss_sum, reward_sums, sequence_logps

Array = jax.Array
Batch = dict[str, Array]


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with global-norm clipping and a linear-warmup + cosine schedule."""

    lr: float = field(default=2e-4, metadata={"help": "peak learning rate"})
    warmup_steps: int = field(
        default=0, metadata={"help": "steps of linear warmup from 0 to the peak --lr"}
    )
    total_steps: int | None = field(
        default=None,
        metadata={
            "help": "steps of the schedule: the cosine reaches --end-lr here",
            "default_text": "the run's steps",
        },
    )
    end_lr: float = field(default=0.0, metadata={"help": "learning rate after --total-steps"})
    b1: float = field(default=0.9, metadata={"help": "AdamW first-moment decay"})
    b2: float = field(default=0.999, metadata={"help": "AdamW second-moment decay"})
    eps: float = field(default=1e-8, metadata={"help": "AdamW denominator epsilon"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decoupled weight decay"})
    max_grad_norm: float | None = field(
        default=1.0,
        metadata={
            "help": "clip the gradient to this global norm (null in a config file: no clipping)"
        },
    )
    offload_optimizer: bool = field(
        default=False,
        metadata={
            "help": "keep AdamW's moments in host memory (pinned_host) between steps, moved to "
            "the device inside each step: less device memory, more host transfers"
        },
    )

    def __post_init__(self) -> None:
        if self.warmup_steps < 0 or (
            self.total_steps is not None and not self.total_steps > self.warmup_steps
        ):
            raise ValueError(
                f"OptimConfig.warmup_steps: expected 0 <= warmup_steps < total_steps="
                f"{self.total_steps}, got {self.warmup_steps}"
            )
        if not self.lr >= 0:
            raise ValueError(f"OptimConfig.lr: expected >= 0, got {self.lr}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(
                f"OptimConfig.max_grad_norm: expected > 0 or None, got {self.max_grad_norm}"
            )

    def for_steps(self, steps: int) -> OptimConfig:
        """This config with ``total_steps`` set to ``steps`` where it was left to the run (and
        at least ``warmup_steps + 1``)."""
        if self.total_steps is not None:
            return self
        return dataclasses.replace(self, total_steps=max(steps, self.warmup_steps + 1))


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """Preference tuning (``--objective dpo``): DPO, its conservative (label-smoothed) form,
    or IPO, over pairs of completions (``ref_numpy.preference``).

    The reference policy is the model the run starts from: under LoRA / QLoRA the same
    parameters with the adapters off, computed in the same step (no second model); under full
    fine-tuning a frozen copy of the starting weights, or, with ``precompute_ref``,
    log-probabilities computed once per pair before training (no copy in memory).
    """

    beta: float = field(
        default=0.1,
        metadata={"help": "strength of the KL penalty to the reference policy (DPO's beta)"},
    )
    loss_type: LossType = field(
        default="sigmoid",
        metadata={"help": "sigmoid: DPO (conservative with --label-smoothing); ipo: IPO"},
    )
    label_smoothing: float = field(
        default=0.0,
        metadata={
            "help": "probability that a pair's preference is flipped (conservative DPO, "
            "sigmoid loss only)"
        },
    )
    precompute_ref: bool = field(
        default=False,
        metadata={
            "help": "compute the reference log-probabilities once before training instead of "
            "in every step (full fine-tuning then keeps no frozen copy of the weights)"
        },
    )

    def __post_init__(self) -> None:
        try:
            check_preference_args(self.beta, self.loss_type, self.label_smoothing)
        except ValueError as e:  # "beta: expected > 0, got 0" -> name the field and its flag
            name, why = str(e).split(": ", 1)
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"DPOConfig.{name} ({flag}): {why}") from None


def schedule(cfg: OptimConfig) -> Callable[[Array], Array]:
    """The spec's ``warmup_cosine``, evaluated at optax's step count.

    optax keeps its count as int32, and its schedule at an int32 count is float32 even
    under x64; casting the count to the widest int keeps float64 runs in float64.
    """
    if cfg.total_steps is None:
        raise ValueError(
            "OptimConfig.total_steps: None; the schedule needs its length "
            "(OptimConfig.for_steps sets it to the run's steps)"
        )
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
    x, _ = model.hidden_states(
        batch["input_ids"],
        positions=batch.get("positions"),
        attention_mask_2d=batch.get("attention_mask"),
        segment_ids=batch.get("segment_ids"),
        dropout_key=key,
    )  # [B,T,D]
    x, targets = x[:, :-1], batch["labels"][:, 1:]  # position t predicts label t + 1
    return head_cross_entropy(
        model.head_input(x), model.head_kernel(), targets, model.eng.loss_chunk
    )


def batch_logps(
    graphdef: Any, params: Any, rest: Any, batch: Batch, key: Array | None
) -> tuple[Array, Array]:
    """``(summed completion log-probabilities [R], counted tokens [R])`` of the rows of one
    batch ``[R, T]`` (``preference.sequence_logps``)."""
    model = nnx.merge(graphdef, params, rest)
    x, _ = model.hidden_states(
        batch["input_ids"], attention_mask_2d=batch.get("attention_mask"), dropout_key=key
    )  # [R,T,D]
    return sequence_logps(x, model.logits, batch["labels"], model.eng.loss_chunk)


def reference_logps(graphdef: Any, params: Any, rest: Any, batch: Batch, ref: Any) -> Array:
    """The reference policy's log-probabilities [R] of a preference batch, without dropout and
    without a gradient: ``batch["ref_logps"]`` where computed before training; else the
    frozen starting weights ``ref`` (full fine-tuning); else ``params`` with the adapters off
    (every LoRA factor zero, so each adapted projection is exactly its base)."""
    if "ref_logps" in batch:
        return batch["ref_logps"]
    off = jax.tree.map(jnp.zeros_like, params) if ref is None else ref
    return jax.lax.stop_gradient(batch_logps(graphdef, off, rest, batch, None)[0])


def dpo_loss_sum(
    objective: DPOConfig,
    graphdef: Any,
    params: Any,
    rest: Any,
    batch: Batch,
    key: Array | None,
    ref_logps: Array,
) -> tuple[Array, tuple[Array, dict[str, Array]]]:
    """``(sum of pair losses, (real pairs, metric sums))`` of one preference batch ``[R, T]``
    (pairs as adjacent rows) against ``ref_logps`` [R]; the metric sums are TRL's rewards and
    log-probabilities (``preference.reward_sums``) and ``tokens``, the completion tokens."""
    logps, counts = batch_logps(graphdef, params, rest, batch, key)  # [R], [R]
    total, pairs = preference_loss_sum(
        logps,
        ref_logps,
        counts,
        beta=objective.beta,
        loss_type=objective.loss_type,
        label_smoothing=objective.label_smoothing,
    )
    sums = reward_sums(jax.lax.stop_gradient(logps), ref_logps, counts, objective.beta)
    return total, (pairs, {**sums, "tokens": counts.sum()})


@dataclasses.dataclass
class Trainer:
    """Holds the split model and optimizer state and runs jitted steps.

    ``step(batch)`` takes arrays ``[A, B, T]`` (A micro-batches of gradient accumulation;
    A = 1 without it) with ``input_ids`` and ``labels`` and optionally ``attention_mask``,
    ``positions`` and ``segment_ids``; it returns ``{"loss", "grad_norm", "lr", "tokens"}``.

    With ``objective`` a ``DPOConfig`` the step trains on preference pairs instead: each
    micro-batch's B rows are pairs (row 2i chosen, 2i + 1 rejected; ``input_ids``,
    ``labels``, ``attention_mask``, and ``ref_logps`` [A, B] where computed before), the loss
    is the mean over all pairs of the batch, and the metrics add TRL's ``rewards/*`` and
    ``logps/*`` (``preference.REWARD_METRICS``) and ``pairs``. ``ref_params`` is the frozen
    reference of full fine-tuning (``create`` copies the starting weights).
    """

    graphdef: Any
    params: Any
    rest: Any
    opt_state: Any
    tx: optax.GradientTransformation
    lr_at: Callable[[Array], Array]
    dropout_seed: int = 0
    step_count: int = 0

    offload_optimizer: bool = False
    objective: DPOConfig | None = None
    ref_params: Any = None

    @classmethod
    def create(
        cls,
        model: Model,
        cfg: OptimConfig,
        dropout_seed: int = 0,
        objective: DPOConfig | None = None,
    ) -> Trainer:
        """A trainer of ``model`` (supervised fine-tuning, or ``objective``)."""
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)  # type: ignore[misc]
        tx = optimizer(cfg)
        full = model.lora is None and not model.eng.quantize
        frozen_copy = objective is not None and full and not objective.precompute_ref
        return cls(
            graphdef,
            params,
            rest,
            tx.init(params),
            tx,
            schedule(cfg),
            dropout_seed,
            offload_optimizer=cfg.offload_optimizer,
            objective=objective,
            ref_params=jax.tree.map(jnp.copy, params) if frozen_copy else None,
        )

    def __post_init__(self) -> None:
        if self.offload_optimizer:
            check_host_offload()
            self.opt_state = jax.device_put(
                self.opt_state,
                self.opt_state_shardings(jax.tree.map(lambda x: x.sharding, self.opt_state)),
            )
        self._step = jax.jit(self._step_impl, donate_argnums=(0, 1))

    def opt_state_shardings(self, shardings: Any) -> Any:
        """The placement of the optimizer state: ``shardings`` (a tree of shardings shaped as
        ``opt_state``) with AdamW's moments (every array leaf of more than 0 dimensions) in
        ``"pinned_host"`` memory when ``offload_optimizer``, the rest as given.

        A subclass that pins the step's outputs (``jax.jit(..., out_shardings=...)``) passes
        its own device shardings through this for the optimizer state's."""
        if not self.offload_optimizer:
            return shardings
        return jax.tree.map(
            lambda x, s: s.with_memory_kind(HOST) if _moment(x) else s, self.opt_state, shardings
        )

    def _memory(self, opt_state: Any, space: Any) -> Any:
        """Inside the step: the offloaded leaves of ``opt_state`` moved to memory ``space``
        (``jax.memory.Space.Device`` or ``.Host``), keeping their sharding."""
        if not self.offload_optimizer:
            return opt_state
        return jax.tree.map(lambda x: jax.device_put(x, space) if _moment(x) else x, opt_state)

    def _step_impl(
        self,
        params: Any,
        opt_state: Any,
        rest: Any,
        batch: Batch,
        step: Array,
        ref: Any = None,
    ) -> tuple[Any, Any, dict[str, Array]]:
        fault_point("compile")  # runs while jit traces the step, not when it executes
        key = jax.random.fold_in(jax.random.key(self.dropout_seed), step)  # dropout per step

        def micro(carry: tuple[Any, Array, Array, Any], xs: tuple[Batch, Array]) -> Any:
            grads, total, count, sums = carry
            mb, i = xs
            mkey = jax.random.fold_in(key, i)
            (s, (n, extra)), g = self._sum_and_grad(params, rest, mb, mkey, ref)
            grads = jax.tree.map(jnp.add, grads, g)
            sums = jax.tree.map(lambda a, b: a + b.astype(a.dtype), sums, extra)
            return (grads, total + s, count + n.astype(count.dtype), sums), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        n_micro = batch["input_ids"].shape[0]
        acc = _acc(params)
        names = () if self.objective is None else REWARD_METRICS
        no_sums = {"tokens": jnp.zeros((), jnp.int32), **{k: jnp.zeros((), acc) for k in names}}
        init = (zeros, jnp.zeros((), acc), jnp.zeros((), jnp.int32), no_sums)
        (grads, total, count, sums), _ = jax.lax.scan(micro, init, (batch, jnp.arange(n_micro)))
        denom = jnp.maximum(count, 1).astype(total.dtype)
        grads = jax.tree.map(lambda g: g / denom, grads)
        opt_state = self._memory(opt_state, jax.memory.Space.Device)  # host -> device
        updates, opt_state = self.tx.update(grads, opt_state, params)
        opt_state = self._memory(opt_state, jax.memory.Space.Host)  # device -> host
        params = optax.apply_updates(params, updates)
        metrics = {
            "loss": total / denom,
            "grad_norm": optax.tree.norm(grads),
            "lr": self.lr_at(step),
            "tokens": sums.pop("tokens"),
        }
        if self.objective is not None:  # means over the batch's pairs
            metrics.update({k: v / denom for k, v in sums.items()}, pairs=count)
        return params, opt_state, metrics

    def _sum_and_grad(
        self, params: Any, rest: Any, batch: Batch, key: Array, ref: Any
    ) -> tuple[tuple[Array, tuple[Array, dict[str, Array]]], Any]:
        """``((loss sum, (count, metric sums)), d loss sum / d params)`` of one micro-batch:
        token losses and tokens (supervised), or pair losses and pairs (``objective``)."""
        if self.objective is None:

            def sft(p: Any) -> tuple[Array, tuple[Array, dict[str, Array]]]:
                s, n = token_loss_sum(self.graphdef, p, rest, batch, key)
                return s, (n, {"tokens": n})

            return jax.value_and_grad(sft, has_aux=True)(params)
        objective = self.objective
        if objective.precompute_ref and "ref_logps" not in batch:
            raise ValueError(
                "DPOConfig.precompute_ref (--precompute-ref): the batch has no 'ref_logps'; "
                "compute them before training (train.precompute_reference, pair_batches)"
            )
        ref_logps = reference_logps(self.graphdef, params, rest, batch, ref)  # [R]

        def dpo(p: Any) -> tuple[Array, tuple[Array, dict[str, Array]]]:
            return dpo_loss_sum(objective, self.graphdef, p, rest, batch, key, ref_logps)

        return jax.value_and_grad(dpo, has_aux=True)(params)

    def step(self, batch: dict[str, Any]) -> dict[str, Array]:
        """One optimizer step on ``batch`` (arrays ``[A, B, T]``)."""
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        self.params, self.opt_state, metrics = self._step(
            self.params,
            self.opt_state,
            self.rest,
            batch,
            jnp.asarray(self.step_count),
            self.ref_params,
        )
        self.step_count += 1
        return metrics

    def model(self) -> Model:
        """The model with the current parameters."""
        return nnx.merge(self.graphdef, self.params, self.rest)


HOST = "pinned_host"  # the memory kind offloaded optimizer state lives in


def check_host_offload() -> None:
    """Raise ValueError, naming ``--offload-optimizer``, when JAX's default device has no
    ``"pinned_host"`` memory to keep the optimizer state in."""
    device = jax.devices()[0]
    kinds = [m.kind for m in device.addressable_memories()]
    if HOST not in kinds:
        raise ValueError(
            f"OptimConfig.offload_optimizer (--offload-optimizer): {device.platform} device "
            f"{device} has no {HOST!r} memory (its memories: {kinds})"
        )


def _moment(x: Any) -> bool:
    """An optimizer-state leaf that offloading moves: an array of at least one dimension
    (AdamW's moments; the step count stays in device memory)."""
    return isinstance(x, jax.Array) and x.ndim > 0


def _acc(params: Any) -> Any:
    leaves = jax.tree.leaves(params)
    return jnp.promote_types(leaves[0].dtype, jnp.float32) if leaves else jnp.float32


def _eval_sum(graphdef: Any, params: Any, rest: Any, batch: Batch) -> tuple[Array, Array]:
    return token_loss_sum(graphdef, params, rest, batch, None)


_eval_step = jax.jit(_eval_sum, static_argnums=0)


def eval_loss(model: Model, batches: Iterable[dict[str, Any]]) -> tuple[float, int]:
    """``(mean token loss, token count)`` of ``model`` over ``batches`` (arrays ``[1, B, T]``,
    as ``Trainer.step`` takes them), without dropout."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)  # type: ignore[misc]
    total, count = 0.0, 0
    for batch in batches:
        mb = {k: jnp.asarray(v[0]) for k, v in batch.items()}  # [1,B,T] -> [B,T]
        s, n = _eval_step(graphdef, params, rest, mb)
        total, count = total + float(s), count + int(n)
    return total / max(count, 1), count


def _eval_pairs(
    objective: DPOConfig, graphdef: Any, params: Any, rest: Any, batch: Batch, ref: Any
) -> tuple[Array, tuple[Array, dict[str, Array]]]:
    ref_logps = reference_logps(graphdef, params, rest, batch, ref)
    return dpo_loss_sum(objective, graphdef, params, rest, batch, None, ref_logps)


_eval_pairs_step = jax.jit(_eval_pairs, static_argnums=(0, 1))


def eval_preference(
    model: Model,
    batches: Iterable[dict[str, Any]],
    objective: DPOConfig,
    ref_params: Any = None,
) -> dict[str, float]:
    """The mean preference loss of ``model`` over ``batches`` of pairs (arrays ``[1, 2B, T]``,
    as ``Trainer.step`` takes them) and TRL's metrics, means over all real pairs, with
    ``pairs`` and ``tokens`` (completion tokens); no dropout.

    The reference is each batch's ``ref_logps`` where given, else ``ref_params`` (the
    ``nnx.Param`` state of a reference model of the same structure, full fine-tuning), else
    ``model`` with its adapters off. Raises ValueError for a model without adapters and no
    other reference."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)  # type: ignore[misc]
    own = ref_params is None and model.lora is None and not model.eng.quantize
    sums: dict[str, float] = {}
    total, pairs = 0.0, 0
    for batch in batches:
        if own and "ref_logps" not in batch:
            raise ValueError(
                "eval_preference: a model without adapters needs a reference: ref_params "
                "(its starting weights) or each batch's ref_logps"
            )
        mb = {k: jnp.asarray(v[0]) for k, v in batch.items()}  # [1,2B,T] -> [2B,T]
        s, (n, extra) = _eval_pairs_step(objective, graphdef, params, rest, mb, ref_params)
        total, pairs = total + float(s), pairs + int(n)
        for k, v in extra.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    tokens = int(sums.pop("tokens", 0))
    out = {"loss": total / max(pairs, 1), **{k: v / max(pairs, 1) for k, v in sums.items()}}
    return {**out, "pairs": pairs, "tokens": tokens}


_reference_step = jax.jit(reference_logps, static_argnums=0)


def batch_reference_logps(model: Model, batch: dict[str, Any], ref_params: Any = None) -> Array:
    """The reference log-probabilities [2B] of the rows of one batch ``[1, 2B, T]`` of pairs:
    ``ref_params``, else ``model`` with its adapters off, else (a model without adapters, as
    full fine-tuning starts) ``model`` itself."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)  # type: ignore[misc]
    if ref_params is None and model.lora is None and not model.eng.quantize:
        ref_params = params  # no adapters to switch off: the weights are the reference
    mb = {k: jnp.asarray(v[0]) for k, v in batch.items() if k != "ref_logps"}  # [2B,T]
    return _reference_step(graphdef, params, rest, mb, ref_params)


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient."""


Hook = Callable[[Trainer, dict[str, Any], dict[str, Any]], None]


def fit(
    trainer: Trainer,
    batches: Iterable[dict[str, Any]],
    *,
    steps: int | None = None,
    hooks: Sequence[Hook] = (),
) -> list[dict[str, Any]]:
    """Train ``trainer`` on ``batches`` until ``trainer.step_count`` reaches ``steps`` (or the
    batches run out, when None); returns every step's metrics.

    Each batch is a dict of arrays ``[A, B, T]`` (see ``Trainer.step``). After each step the
    metrics become floats with the 1-based ``step`` added (``{"loss", "grad_norm", "lr",
    "tokens", "step"}``) and every hook is called in turn as ``hook(trainer, batch, metrics)``;
    a hook may add entries (an eval loss, a throughput) that later hooks and the returned
    list see. Raises TrainingDiverged on a non-finite loss or gradient, before any hook runs
    for that step. The trainer is updated in place, so a caller can resume it by calling
    ``fit`` again with the batches that follow.
    """
    history: list[dict[str, Any]] = []
    if steps is not None and trainer.step_count >= steps:
        return history
    for batch in batches:
        out = trainer.step(batch)  # dispatched; computing while its results are awaited
        fault_point("step")
        metrics: dict[str, Any] = {k: float(v) for k, v in out.items()}
        metrics["step"] = trainer.step_count
        if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
            raise TrainingDiverged(
                f"step {trainer.step_count}: non-finite loss or gradient "
                f"(loss={metrics['loss']}, grad_norm={metrics['grad_norm']})"
            )
        for hook in hooks:
            hook(trainer, batch, metrics)
        history.append(metrics)
        if steps is not None and trainer.step_count >= steps:
            break
    return history
