"""Training steps of the engine equal the spec's forward + backward + clip + AdamW."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_impl.model import to_spec
from jax_impl.train.trainer import OptimConfig, Trainer, TrainingDiverged, eval_loss, fit
from ref_numpy.model import loss_and_grads
from ref_numpy.optim import adamw_init, adamw_update, clip_by_global_norm, warmup_cosine
from tests.helpers import leaves
from tests.test_model import V
from tests.test_parity import engine, make_case, spec_masks

A, B, T = 2, 3, 7  # micro-batches, rows per micro-batch, positions


def sub_tree(full: Any, like: Any) -> Any:
    """The part of ``full`` with the structure of ``like`` (a sparse gradient tree)."""
    if isinstance(like, dict):
        return {k: sub_tree(full[k], v) for k, v in like.items()}
    if isinstance(like, list):
        return [sub_tree(f, v) for f, v in zip(full, like, strict=True)]
    return full


def put_tree(full: Any, part: Any) -> None:
    """Write the leaves of ``part`` into ``full`` in place."""
    for k, v in part.items() if isinstance(part, dict) else enumerate(part):
        if isinstance(v, (dict, list)):
            put_tree(full[k], v)
        else:
            full[k] = v


def batches(rng: np.random.Generator, n: int) -> list[dict[str, np.ndarray]]:
    out = []
    for _ in range(n):
        ids = rng.integers(0, V, size=(A, B, T))
        labels = ids.copy()
        labels[:, 0, :3] = -100  # prompts that take no loss
        mask = np.ones_like(ids)
        mask[1, 2, 5:] = 0  # padding in one micro-batch
        labels[1, 2, 5:] = -100
        out.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
    return out


def step_masks(
    params: dict, cfg: Any, rate: float, seed: int, step: int
) -> dict[str, np.ndarray] | None:
    """The spec's dropout masks ``{path: [A*B, T, I]}`` for the trainer's step ``step``: its key
    is ``fold_in(key(seed), step)`` and micro-batch i's ``fold_in(that, i)``."""
    if rate == 0:
        return None
    key = jax.random.fold_in(jax.random.key(seed), step)
    per_micro = [
        spec_masks(jax.random.fold_in(key, i), params, cfg, rate, (B, T)) for i in range(A)
    ]
    return {path: np.concatenate([m[path] for m in per_micro]) for path in per_micro[0]}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_steps_equal_the_spec(method: str) -> None:
    """Three steps with accumulation, clipping, weight decay and (for adapters) dropout."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(21)
        rate = 0.0 if method == "full" else 0.25
        params, cfg, lcfg = make_case("llama-gqa-rope3", method, rng, dropout=rate, spread=0.3)
        opt = OptimConfig(
            lr=3e-2, warmup_steps=1, total_steps=4, weight_decay=0.1, max_grad_norm=0.5
        )
        model = engine(params, cfg, lcfg, jnp.float64, method)
        trainer = Trainer.create(model, opt, dropout_seed=5)
        scale = 0.0 if lcfg is None else lcfg.scale
        data = batches(rng, 3)
        state = None
        for step, batch in enumerate(data):
            metrics = trainer.step(batch)
            whole = {k: v.reshape(A * B, T) for k, v in batch.items()}  # one big batch
            loss, grads = loss_and_grads(
                params,
                cfg,
                whole["input_ids"],
                whole["labels"],
                attention_mask_2d=whole["attention_mask"],
                lora_scale=scale,
                dropout=step_masks(params, cfg, rate, 5, step),
            )
            assert float(metrics["loss"]) == pytest.approx(loss, rel=1e-10)
            grads, norm = clip_by_global_norm(grads, opt.max_grad_norm)
            assert float(metrics["grad_norm"]) == pytest.approx(norm, rel=1e-10)
            trainable = sub_tree(params, grads)
            state = adamw_init(trainable) if state is None else state
            lr = warmup_cosine(step, opt.lr, opt.warmup_steps, opt.total_steps)
            assert float(metrics["lr"]) == pytest.approx(lr, rel=1e-12, abs=1e-15)
            trainable, state = adamw_update(
                grads, state, trainable, lr, weight_decay=opt.weight_decay
            )
            put_tree(params, trainable)
        got = dict(leaves(to_spec(trainer.model())))
        moved = 0
        for path, want in leaves(params):
            if isinstance(want, np.ndarray):
                err = np.linalg.norm(got[path] - want) / max(np.linalg.norm(want), 1e-300)
                assert err <= 1e-9, (path, err)
                moved += path.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "kernel")
        assert moved > 0


def test_accumulation_equals_one_big_batch() -> None:
    rng = np.random.default_rng(22)
    params, cfg, lcfg = make_case("gpt2", "lora", rng, spread=0.3)
    batch = batches(rng, 1)[0]
    opt = OptimConfig(lr=1e-2, total_steps=2, max_grad_norm=None)
    split = Trainer.create(engine(params, cfg, lcfg, jnp.float32, "lora"), opt)
    whole = Trainer.create(engine(params, cfg, lcfg, jnp.float32, "lora"), opt)
    m1 = split.step(batch)
    m2 = whole.step({k: v.reshape(1, A * B, T) for k, v in batch.items()})
    assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-6)
    assert int(m1["tokens"]) == int(m2["tokens"]) == int((batch["labels"][..., 1:] != -100).sum())
    a, b = to_spec(split.model()), to_spec(whole.model())
    for (pa, x), (_, y) in zip(leaves(a), leaves(b), strict=True):
        if isinstance(x, np.ndarray):
            np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-7, err_msg=pa)


def test_frozen_base_does_not_move_and_loss_falls() -> None:
    rng = np.random.default_rng(23)
    params, cfg, lcfg = make_case("qwen2-tied", "lora", rng, spread=0.3)
    trainer = Trainer.create(
        engine(params, cfg, lcfg, jnp.float32, "lora"), OptimConfig(lr=3e-2, total_steps=30)
    )
    batch = batches(rng, 1)[0]
    losses = [float(trainer.step(batch)["loss"]) for _ in range(30)]
    assert losses[-1] < 0.7 * losses[0], losses
    after = dict(leaves(to_spec(trainer.model())))
    for path, before in leaves(params):
        if not path.endswith(("lora_A", "lora_B")):
            np.testing.assert_array_equal(after[path], before.astype(np.float32), err_msg=path)


@pytest.mark.slow
def test_fit_steps_on_arrays_and_calls_the_hooks() -> None:
    """``fit`` takes batches of arrays and returns each step's metrics: the same steps as
    calling ``Trainer.step`` by hand, every hook called once per step with the metrics it and
    earlier hooks wrote, stopping at ``steps`` without drawing another batch, and a non-finite
    loss raising before the hooks see that step."""
    rng = np.random.default_rng(29)
    params, cfg, lcfg = make_case("qwen2-tied", "lora", rng, spread=0.3)
    data = batches(rng, 3)

    def make() -> Trainer:
        model = engine(params, cfg, lcfg, jnp.float32, "lora")
        return Trainer.create(model, OptimConfig(lr=3e-2, total_steps=5))

    by_hand = make()
    hand = [float(by_hand.step(b)["loss"]) for b in [*data, *data[:2]]]
    seen: list[tuple[int, float]] = []

    def note(trainer: Trainer, batch: dict, m: dict) -> None:
        assert batch["input_ids"].shape == (A, B, T) and trainer.step_count == m["step"]
        m["double"] = 2 * m["loss"]

    def check(trainer: Trainer, batch: dict, m: dict) -> None:
        seen.append((m["step"], m["double"]))

    drawn = []

    def stream() -> Any:
        while True:
            for b in data:
                drawn.append(1)
                yield b

    trainer = make()
    history = fit(trainer, stream(), steps=5, hooks=[note, check])
    assert [m["step"] for m in history] == [1, 2, 3, 4, 5] and len(drawn) == 5
    np.testing.assert_allclose([m["loss"] for m in history], hand, rtol=1e-6)
    assert seen == [(m["step"], 2 * m["loss"]) for m in history]
    assert set(history[0]) == {"loss", "grad_norm", "lr", "tokens", "step", "double"}
    assert trainer.step_count == 5 and fit(trainer, stream(), steps=5) == []
    np.testing.assert_allclose(  # the state is the trained one: same eval loss as by hand
        eval_loss(trainer.model(), [data[0]])[0], eval_loss(by_hand.model(), [data[0]])[0]
    )
    assert eval_loss(trainer.model(), [data[0]])[0] != eval_loss(make().model(), [data[0]])[0]
    bad = {**data[0], "input_ids": data[0]["input_ids"]}
    broken = make()
    broken.params = jax.tree.map(lambda x: x * jnp.nan, broken.params)
    with pytest.raises(TrainingDiverged, match="step 1: non-finite loss"):
        fit(broken, [bad], hooks=[check])
    assert len(seen) == 5  # the hooks never saw the diverged step


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_bf16_loss_curve_follows_the_spec(method: str) -> None:
    """Eight steps with bf16 compute: each step's loss within 2e-2 of the spec's float64 run."""
    rng = np.random.default_rng(24)
    params, cfg, lcfg = make_case("gpt2", method, rng, spread=0.3, lora_spread=0.03)
    opt = OptimConfig(lr=1e-2, warmup_steps=2, total_steps=8, max_grad_norm=1.0)
    model = engine(params, cfg, lcfg, jnp.float32, method, compute=jnp.bfloat16)
    trainer = Trainer.create(model, opt)
    state = None
    for step, batch in enumerate(batches(rng, 8)):
        got = float(trainer.step(batch)["loss"])
        whole = {k: v.reshape(A * B, T) for k, v in batch.items()}
        loss, grads = loss_and_grads(
            params,
            cfg,
            whole["input_ids"],
            whole["labels"],
            attention_mask_2d=whole["attention_mask"],
            lora_scale=lcfg.scale,
        )
        assert abs(got - loss) <= 2e-2 * abs(loss), (step, got, loss)
        grads, _ = clip_by_global_norm(grads, opt.max_grad_norm)
        trainable = sub_tree(params, grads)
        state = adamw_init(trainable) if state is None else state
        lr = warmup_cosine(step, opt.lr, opt.warmup_steps, opt.total_steps)
        trainable, state = adamw_update(grads, state, trainable, lr)
        put_tree(params, trainable)


@pytest.mark.slow
def test_prompts_take_no_loss_and_segments_see_nothing_of_each_other() -> None:
    """A hand-built packed row: two examples, each a 3-token prompt and a completion."""
    from flax import nnx

    from jax_impl.train.data import Encoded, batches, pack
    from jax_impl.train.trainer import token_loss_sum

    p = np.int32
    ex1 = Encoded(np.array([5, 6, 7, 8, 9], p), np.array([-100, -100, -100, 8, 9], p))
    ex2 = Encoded(np.array([1, 2, 3, 4], p), np.array([-100, -100, -100, 4], p))
    (row,) = pack([ex1, ex2], 12)
    np.testing.assert_array_equal(row.segment_ids, [1] * 5 + [2] * 4)
    np.testing.assert_array_equal(row.positions, [0, 1, 2, 3, 4, 0, 1, 2, 3])
    batch = next(batches([row], 1, 1, [12], seed=0, epoch=0))
    b = {k: jnp.asarray(v[0]) for k, v in batch.items()}
    params, cfg, lcfg = make_case("llama-gqa-rope3", "lora", np.random.default_rng(25))
    model = engine(params, cfg, lcfg, jnp.float32, "lora")
    graphdef, trainable, rest = nnx.split(model, nnx.Param, ...)

    def loss_of_logits(logits: jax.Array) -> jax.Array:
        from jax_impl.layers import cross_entropy

        return cross_entropy(logits[:, :-1], b["labels"][:, 1:])[0]

    logits = nnx.merge(graphdef, trainable, rest)(
        b["input_ids"],
        positions=b["positions"],
        attention_mask_2d=b["attention_mask"],
        segment_ids=b["segment_ids"],
    )
    dlogits = np.asarray(jax.grad(loss_of_logits)(logits))[0]  # [L, V]
    counted = [2, 3, 7]  # positions whose next token is a completion token of its own segment
    for t in range(12):
        assert np.any(dlogits[t] != 0) == (t in counted), t
    _, count = token_loss_sum(graphdef, trainable, rest, b, None)
    assert int(count) == 3
    # changing every token of the first example leaves the second one's logits unchanged
    other = b["input_ids"].at[0, :5].set(jnp.array([11, 12, 0, 3, 2]))
    logits2 = nnx.merge(graphdef, trainable, rest)(
        other,
        positions=b["positions"],
        attention_mask_2d=b["attention_mask"],
        segment_ids=b["segment_ids"],
    )
    np.testing.assert_array_equal(np.asarray(logits2)[0, 5:9], np.asarray(logits)[0, 5:9])
    assert not np.allclose(np.asarray(logits2)[0, :5], np.asarray(logits)[0, :5])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_chunked_loss_steps_equal_the_whole_loss(method: str) -> None:
    """Three steps with the loss in chunks of 3 positions (T - 1 = 6 predicted positions; a
    chunk of 512, the default, or 0 takes the whole row) give the losses and parameters of the
    whole-row loss, in float64, dropout and padding included."""
    from jax_impl.model import EngineConfig, from_spec

    with jax.enable_x64(True):
        rng = np.random.default_rng(31)
        params, cfg, lcfg = make_case("llama-gqa-rope3", method, rng, dropout=0.2, spread=0.3)
        data = batches(rng, 3)
        opt = OptimConfig(lr=3e-2, total_steps=4)
        runs = {}
        for chunk in (0, 3, 512):
            eng = EngineConfig(
                param_dtype="float64", dtype="float64", quantize=method == "qlora", loss_chunk=chunk
            )
            trainer = Trainer.create(from_spec(params, cfg, lcfg, eng), opt, dropout_seed=2)
            losses = [float(trainer.step(b)["loss"]) for b in data]
            runs[chunk] = (losses, dict(leaves(to_spec(trainer.model()))))
        for chunk in (3, 512):
            np.testing.assert_allclose(runs[chunk][0], runs[0][0], rtol=1e-12)
            for path, want in runs[0][1].items():
                if isinstance(want, np.ndarray):
                    np.testing.assert_allclose(runs[chunk][1][path], want, rtol=1e-9, atol=1e-14)
    with pytest.raises(ValueError, match="EngineConfig.loss_chunk: expected >= 0, got -1"):
        EngineConfig(loss_chunk=-1)
