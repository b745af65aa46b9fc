"""Preference tuning: the spec's DPO / IPO / conservative losses against finite differences,
and the engine's jitted DPO step against the spec over three steps."""

from __future__ import annotations

import copy
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_impl.model import to_spec
from jax_impl.train.trainer import DPOConfig, OptimConfig, Trainer
from ref_numpy.lora import has_lora, projections
from ref_numpy.model import model_forward
from ref_numpy.optim import adamw_init, adamw_update, clip_by_global_norm, warmup_cosine
from ref_numpy.preference import (
    preference_loss_and_grads,
    preference_loss_backward,
    preference_loss_forward,
    reference_logps,
    rewards,
    sequence_logps_backward,
    sequence_logps_forward,
)
from tests.gradcheck import grad_rel_err, numerical_grad
from tests.helpers import BF16_LEAF_RTOL, DPO_BF16_RTOL, FD_RTOL, RTOL, leaves, rel_err
from tests.test_model import V
from tests.test_parity import engine, make_case
from tests.test_train import put_tree, sub_tree

A, P, T = 2, 2, 9  # micro-batches, pairs per micro-batch, positions
LOSSES = {  # name: (loss_type, label_smoothing)
    "sigmoid": ("sigmoid", 0.0),
    "conservative": ("sigmoid", 0.2),
    "ipo": ("ipo", 0.0),
}


def pair_rows(rng: np.random.Generator, pairs: int) -> dict[str, np.ndarray]:
    """``pairs`` pairs as adjacent rows [2P, T]: each pair's two rows share a prompt (its labels
    -100), then differ; some rows end in padding."""
    ids = rng.integers(0, V, size=(2 * pairs, T))
    labels = ids.copy()
    mask = np.ones_like(ids)
    for i in range(pairs):
        k = 2 + i % 3  # prompt length
        ids[2 * i + 1, :k] = ids[2 * i, :k]
        labels[2 * i : 2 * i + 2, :k] = -100
        end = T - (i % 2) * 2  # the rejected row of every other pair is shorter
        mask[2 * i + 1, end:] = 0
        labels[2 * i + 1, end:] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def pair_batches(rng: np.random.Generator, n: int) -> list[dict[str, np.ndarray]]:
    """``n`` batches [A, 2P, T]; the first one's last pair is padding (rows counting nothing),
    as the filled-up last batch of an epoch is."""
    out = []
    for step in range(n):
        rows = [pair_rows(rng, P) for _ in range(A)]
        batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        if step == 0:
            batch["labels"][1, -2:] = -100
            batch["attention_mask"][1, -2:] = 0
        out.append(batch)
    return out


# --- pieces against finite differences ---------------------------------------------------


def test_sequence_logps_backward() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, T, V))
    labels = pair_rows(rng, 2)["labels"]
    w = rng.normal(size=4)
    logps, counts, cache = sequence_logps_forward(logits, labels)
    np.testing.assert_array_equal(counts, (labels[:, 1:] != -100).sum(1))
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))  # log-softmax, by hand
    for r in range(4):  # the sum over completion tokens, position t predicting t + 1
        want = sum(lp[r, t, labels[r, t + 1]] for t in range(T - 1) if labels[r, t + 1] != -100)
        assert logps[r] == pytest.approx(want, rel=1e-12)
    dlogits = sequence_logps_backward(w, cache)
    numeric, idx = numerical_grad(
        lambda: float(w @ sequence_logps_forward(logits, labels)[0]), logits
    )
    assert grad_rel_err(dlogits.reshape(-1)[idx], numeric) <= FD_RTOL


@pytest.mark.parametrize("name", list(LOSSES))
def test_preference_loss_backward(name: str) -> None:
    loss_type, eps = LOSSES[name]
    rng = np.random.default_rng(1)
    logps, ref = rng.normal(-20, 4, size=6), rng.normal(-20, 4, size=6)
    counts = np.array([5, 7, 3, 4, 0, 0])  # the third pair is padding
    kw = dict(beta=0.3, loss_type=loss_type, label_smoothing=eps)
    loss, cache = preference_loss_forward(logps, ref, counts, **kw)
    dlogps = preference_loss_backward(1.0, cache)
    numeric, _ = numerical_grad(lambda: preference_loss_forward(logps, ref, counts, **kw)[0], logps)
    assert grad_rel_err(dlogps, numeric) <= FD_RTOL
    assert np.all(dlogps[4:] == 0)  # the padding pair takes no part
    # the formula of each loss, pair by pair
    ratio = logps - ref
    if loss_type == "sigmoid":
        h = 0.3 * (ratio[0:4:2] - ratio[1:4:2])
        per = -(1 - eps) * np.log(1 / (1 + np.exp(-h))) - eps * np.log(1 / (1 + np.exp(h)))
    else:
        u = ratio[0:4:2] / counts[0:4:2] - ratio[1:4:2] / counts[1:4:2]
        per = (u - 1 / (2 * 0.3)) ** 2
    assert loss == pytest.approx(per.mean(), rel=1e-12)


def test_rewards_are_trls() -> None:
    logps = np.array([-3.0, -5.0, -4.0, -2.0, -9.0, -9.0])
    ref = np.array([-4.0, -4.0, -4.0, -4.0, -1.0, -1.0])
    m = rewards(logps, ref, np.array([2, 3, 2, 2, 0, 0]), beta=0.5)
    assert m == {
        "rewards/chosen": pytest.approx((0.5 + 0.0) / 2),
        "rewards/rejected": pytest.approx((-0.5 + 1.0) / 2),
        "rewards/accuracies": 0.5,
        "rewards/margins": pytest.approx((1.0 - 1.0) / 2),
        "logps/chosen": pytest.approx(-3.5),
        "logps/rejected": pytest.approx(-3.5),
    }


def test_bad_arguments_are_named() -> None:
    x = np.zeros(2)
    with pytest.raises(ValueError, match="beta: expected > 0, got 0"):
        preference_loss_forward(x, x, np.ones(2, int), beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing: applies to the sigmoid loss"):
        preference_loss_forward(
            x, x, np.ones(2, int), beta=0.1, loss_type="ipo", label_smoothing=0.1
        )
    with pytest.raises(ValueError, match=r"DPOConfig.beta \(--beta\): expected > 0, got -1"):
        DPOConfig(beta=-1.0)
    with pytest.raises(ValueError, match=r"DPOConfig.loss_type \(--loss-type\)"):
        DPOConfig(loss_type="hinge")  # type: ignore[arg-type]


# --- the whole model against finite differences ---------------------------------------------


def _spec_loss(params: dict, cfg: Any, lcfg: Any, rows: dict, name: str, **kw: Any) -> Any:
    loss_type, eps = LOSSES[name]
    return preference_loss_and_grads(
        params,
        cfg,
        rows["input_ids"],
        rows["labels"],
        beta=0.7,
        loss_type=loss_type,
        label_smoothing=eps,
        lora_scale=0.0 if lcfg is None else lcfg.scale,
        attention_mask_2d=rows["attention_mask"],
        **kw,
    )


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_whole_model_gradients(method: str, name: str) -> None:
    """Every trainable leaf (the adapters only under LoRA / QLoRA) against central
    differences of the loss, the reference recomputed at each probe as the loss defines it."""
    rng = np.random.default_rng(2)
    params, cfg, lcfg = make_case("llama-gqa-rope3", method, rng, spread=0.3)
    ref = None if lcfg is not None else copy.deepcopy(params)
    if ref is not None:  # the policy has moved away from its reference
        for _, leaf in leaves(params):
            leaf += rng.normal(0.0, 0.05, size=leaf.shape)
    rows = pair_rows(rng, 3)
    _, _, grads = _spec_loss(params, cfg, lcfg, rows, name, ref_params=ref)
    by_path = dict(leaves(params))
    probed = []
    for path, g in leaves(grads):

        def f() -> float:
            return _spec_loss(params, cfg, lcfg, rows, name, ref_params=ref)[0]

        numeric, idx = numerical_grad(f, by_path[path], max_entries=6, rng=rng)
        err = grad_rel_err(g.reshape(-1)[idx], numeric)
        assert err <= FD_RTOL, f"{path}: relative error {err:.2e}"
        probed.append(path)
    if lcfg is not None:
        assert probed and all(p.endswith(("lora_A", "lora_B")) for p in probed)
    else:
        assert len(probed) == len(list(leaves(params)))


def test_lora_reference_is_the_base() -> None:
    """With adapters, the reference is the base (the adapters off), whatever the adapters
    hold; and at the start of training (B = 0) the policy equals it, so every reward is 0."""
    rng = np.random.default_rng(3)
    params, cfg, lcfg = make_case("qwen2-tied", "lora", rng, spread=0.3)
    rows = pair_rows(rng, 2)
    got = reference_logps(params, cfg, rows["input_ids"], rows["labels"])
    stripped = copy.deepcopy(params)
    for _, p in projections(stripped):
        p.pop("lora_A", None), p.pop("lora_B", None)
    assert has_lora(params) and not has_lora(stripped)
    want = reference_logps(stripped, cfg, rows["input_ids"], rows["labels"], ref_params=stripped)
    np.testing.assert_allclose(got, want, rtol=1e-13)
    for _, p in projections(params):
        if "lora_B" in p:
            p["lora_B"][...] = 0.0
    loss, metrics, _ = _spec_loss(params, cfg, lcfg, rows, "sigmoid")
    assert loss == pytest.approx(np.log(2.0), rel=1e-12)  # -log sigmoid(0)
    assert metrics["rewards/margins"] == 0.0 and metrics["rewards/accuracies"] == 0.0


# --- the engine's step against the spec --------------------------------------------------


def _spec_run(
    params: dict,
    cfg: Any,
    lcfg: Any,
    data: list[dict],
    opt: OptimConfig,
    dpo: DPOConfig,
    *,
    perturb: str | None = None,
) -> tuple[dict, list[dict[str, float]]]:
    """The spec's three steps: DPO loss over the whole batch, clip, AdamW."""
    params = copy.deepcopy(params)
    ref_params = None if lcfg is not None else copy.deepcopy(params)
    scale = 0.0 if lcfg is None else lcfg.scale
    state, history = None, []
    for step, batch in enumerate(data):
        whole = {k: v.reshape(A * 2 * P, T) for k, v in batch.items()}  # one big batch
        labels = whole["labels"]
        if perturb == "prompt":  # the prompt's tokens left in the sum
            labels = np.where(whole["attention_mask"] == 1, whole["input_ids"], -100)
        ref_logps = None
        if perturb == "adapters_on":  # the reference with the adapters still on
            logits, _ = model_forward(
                params,
                cfg,
                whole["input_ids"],
                attention_mask_2d=whole["attention_mask"],
                lora_scale=scale,
            )
            ref_logps = sequence_logps_forward(logits, labels)[0]
        loss, metrics, grads = preference_loss_and_grads(
            params,
            cfg,
            whole["input_ids"],
            labels,
            beta=dpo.beta * (1.1 if perturb == "beta" else 1.0),
            loss_type=dpo.loss_type,
            label_smoothing=dpo.label_smoothing,
            lora_scale=scale,
            ref_params=ref_params,
            ref_logps=ref_logps,
            attention_mask_2d=whole["attention_mask"],
        )
        grads, norm = clip_by_global_norm(grads, opt.max_grad_norm)
        trainable = sub_tree(params, grads)
        state = adamw_init(trainable) if state is None else state
        lr = warmup_cosine(step, opt.lr, opt.warmup_steps, opt.total_steps)
        trainable, state = adamw_update(grads, state, trainable, lr, weight_decay=opt.weight_decay)
        put_tree(params, trainable)
        history.append({"loss": loss, "grad_norm": norm, **metrics})
    return params, history


def _engine_run(
    params: dict,
    cfg: Any,
    lcfg: Any,
    method: str,
    data: list[dict],
    opt: OptimConfig,
    dpo: DPOConfig,
    dtype: Any,
    compute: Any = None,
) -> tuple[dict, list[dict[str, float]]]:
    model = engine(params, cfg, lcfg, dtype, method, compute)
    trainer = Trainer.create(model, opt, objective=dpo)
    history = [{k: float(v) for k, v in trainer.step(b).items()} for b in data]
    return to_spec(trainer.model()), history


def _worst(got: tuple[dict, list], want: tuple[dict, list], beta: float = 0.5) -> float:
    """The largest relative error over every metric of every step and every float leaf.

    A reward ``beta * (pi - ref)`` is the difference of two log-probabilities of tens of nats,
    so its error is measured against ``beta`` times their size (float32 holds the difference
    of two numbers near 20 to about 2e-6 absolute, whatever the difference)."""
    errs = []
    for g, w in zip(got[1], want[1], strict=True):
        logps = max(abs(w["logps/chosen"]), abs(w["logps/rejected"]))
        for k, v in w.items():
            scale = beta * logps if k.startswith("rewards/") else 0.0
            errs.append(abs(g[k] - v) / max(abs(v), scale, 1e-3))
    have = dict(leaves(got[0]))
    for path, w in leaves(want[0]):
        if isinstance(w, np.ndarray):
            errs.append(rel_err(have[path], w))
    return max(errs)


OPT = OptimConfig(lr=2e-2, warmup_steps=1, total_steps=4, weight_decay=0.1, max_grad_norm=0.5)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_engine_steps_equal_the_spec(method: str, name: str) -> None:
    """float64: 1e-9 on every metric of each step and every leaf after three steps with
    accumulation, clipping and weight decay; float32: 1e-5."""
    loss_type, eps = LOSSES[name]
    dpo = DPOConfig(beta=0.5, loss_type=loss_type, label_smoothing=eps)
    rng = np.random.default_rng(4)
    params, cfg, lcfg = make_case("llama-gqa-rope3", method, rng, spread=0.3)
    data = pair_batches(rng, 3)
    with jax.enable_x64(True):
        want = _spec_run(params, cfg, lcfg, data, OPT, dpo)
        got = _engine_run(params, cfg, lcfg, method, data, OPT, dpo, jnp.float64)
        assert _worst(got, want) <= 1e-9
    if method != "qlora":  # float32 copies of the float64 case's params
        params = jax.tree.map(lambda a: np.asarray(np.float32(a), np.float64), params)
    with jax.enable_x64(True):
        want = _spec_run(params, cfg, lcfg, data, OPT, dpo)
    got = _engine_run(params, cfg, lcfg, method, data, OPT, dpo, jnp.float32)
    assert _worst(got, want) <= RTOL["float32"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_engine_bf16_steps_are_near_the_spec(method: str) -> None:
    """bf16 compute (float32 adapters, moments and loss): ``DPO_BF16_RTOL`` on each step's
    loss, 2e-2 on the adapters after three steps (relative norm error over all of them; each
    leaf within the suite's per-leaf bf16 bound)."""
    dpo = DPOConfig(beta=0.5)
    rng = np.random.default_rng(5)
    params, cfg, lcfg = make_case("llama-gqa-rope3", method, rng, spread=0.3)
    data = pair_batches(rng, 3)
    with jax.enable_x64(True):
        want = _spec_run(params, cfg, lcfg, data, OPT, dpo)
    got = _engine_run(params, cfg, lcfg, method, data, OPT, dpo, jnp.float32, jnp.bfloat16)
    for g, w in zip(got[1], want[1], strict=True):
        assert abs(g["loss"] - w["loss"]) <= DPO_BF16_RTOL * abs(w["loss"])
    have = dict(leaves(got[0]))
    paths = [p for p, _ in leaves(want[0]) if p.endswith(("lora_A", "lora_B"))]
    want_leaves = dict(leaves(want[0]))
    for path in paths:
        assert rel_err(have[path], want_leaves[path]) <= BF16_LEAF_RTOL, path
    flat = np.concatenate([np.ravel(have[p]) for p in paths])
    assert (
        rel_err(flat, np.concatenate([np.ravel(want_leaves[p]) for p in paths])) <= RTOL["bfloat16"]
    )


@pytest.mark.slow
@pytest.mark.parametrize("perturb", ["beta", "adapters_on", "prompt"])
def test_perturbations_are_caught(perturb: str) -> None:
    """A different beta, a reference computed with the adapters on, or the prompt left in the
    sum each move the spec far outside the float32 tolerance of the engine's run."""
    dpo = DPOConfig(beta=0.5)
    rng = np.random.default_rng(6)
    params, cfg, lcfg = make_case("llama-gqa-rope3", "lora", rng, spread=0.3)
    data = pair_batches(rng, 3)
    got = _engine_run(params, cfg, lcfg, "lora", data, OPT, dpo, jnp.float32)
    with jax.enable_x64(True):
        assert _worst(got, _spec_run(params, cfg, lcfg, data, OPT, dpo)) <= RTOL["float32"]
        bad = _spec_run(params, cfg, lcfg, data, OPT, dpo, perturb=perturb)
    assert _worst(got, bad) > 100 * RTOL["float32"]


def _step_memory(method: str, remat: str, objective: DPOConfig | None) -> tuple[int, int]:
    """XLA's ``(temporaries, arguments)`` bytes of the compiled train step over 8 rows."""
    from flax import nnx

    from jax_impl.model import EngineConfig, Model
    from ref_numpy.config import LoraConfig, llama_config

    cfg = llama_config(
        vocab_size=256, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=352, max_seq_len=64
    )
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    lora = None if method == "full" else LoraConfig(rank=4, alpha=8.0, targets=names)
    eng = EngineConfig(quantize=method == "qlora", remat=remat)  # type: ignore[arg-type]
    trainer = Trainer.create(
        Model(cfg, lora, eng, rngs=nnx.Rngs(0)), OptimConfig(total_steps=10), objective=objective
    )
    ids = np.random.default_rng(0).integers(0, 256, size=(1, 8, 40)).astype(np.int32)
    labels = np.where(np.arange(40) < 10, -100, ids)  # a prompt of 10 tokens per row
    batch = {"input_ids": ids, "labels": labels, "attention_mask": np.ones_like(ids)}
    if objective is not None and objective.precompute_ref:
        batch["ref_logps"] = np.zeros((1, 8), np.float32)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    args = (trainer.params, trainer.opt_state, trainer.rest, batch, jnp.asarray(0))
    stats = trainer._step.lower(*args, trainer.ref_params).compile().memory_analysis()
    return int(stats.temp_size_in_bytes), int(stats.argument_size_in_bytes)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora"])
@pytest.mark.parametrize("remat", ["none", "full"])
def test_the_reference_costs_no_second_model(method: str, remat: str) -> None:
    """The DPO step over 4 pairs needs what the SFT step over the same 8 sequences needs, to
    10% (temporaries and arguments, XLA's compiled analysis): the reference is the same
    weights with the adapters off. Full fine-tuning's frozen copy shows in the arguments, so
    the measure would catch a second model."""
    sft, dpo = _step_memory(method, remat, None), _step_memory(method, remat, DPOConfig())
    assert abs(dpo[0] - sft[0]) <= 0.1 * sft[0], (sft, dpo)
    assert abs(dpo[1] - sft[1]) <= 0.1 * sft[1], (sft, dpo)
    if method == "lora" and remat == "none":
        full_sft, full_dpo = (
            _step_memory("full", remat, None),
            _step_memory("full", remat, DPOConfig()),
        )
        assert full_dpo[1] > 1.15 * full_sft[1]  # the starting weights, kept as the reference
        precomputed = _step_memory("full", remat, DPOConfig(precompute_ref=True))
        assert abs(precomputed[1] - full_sft[1]) <= 0.1 * full_sft[1]
