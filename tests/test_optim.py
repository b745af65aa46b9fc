"""AdamW, clipping and the warmup-cosine schedule: hand-computed cases, then optax.

The hand cases pin the formulas (bias correction, decoupled decay from the pre-step param,
clip threshold, schedule end points); the optax cases hold the spec to the library the JAX
engine trains with, in float64, over several steps.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from ref_numpy.optim import (
    AdamWState,
    adamw_init,
    adamw_update,
    clip_by_global_norm,
    global_norm,
    tree_leaves,
    tree_map,
    warmup_cosine,
)
from tests.helpers import rel_err

# The optimizer is elementwise arithmetic with no long reductions, so float64 agreement with
# optax / torch is much tighter than the model-level RTOL["float64"].
OPT_RTOL = 1e-12


def _tree(rng: np.random.Generator) -> dict:
    """A small nested param tree with odd sizes (D=5, F=7, V=11, R=3)."""
    return {
        "embed": {"embedding": rng.normal(size=(11, 5))},
        "layers": [
            {
                "attn": {"q_proj": {"kernel": rng.normal(size=(5, 5))}},
                "lora_A": rng.normal(size=(5, 3)),
            },
            {
                "attn": {"q_proj": {"kernel": rng.normal(size=(5, 5))}},
                "lora_A": rng.normal(size=(5, 3)),
            },
        ],
        "mlp": {"up": rng.normal(size=(5, 7)), "bias": rng.normal(size=(7,))},
    }


def _tree_rel_err(a, b) -> float:
    """The largest per-leaf relative error between two trees of the same structure."""
    return max(rel_err(x, y) for x, y in zip(tree_leaves(a), tree_leaves(b), strict=True))


# ----------------------------------------------------------------------------- tree helpers


def test_tree_map_keeps_structure_and_leaves_are_sorted_like_jax():
    tree = {"b": [np.ones(2), (np.zeros(1), np.full(3, 2.0))], "a": np.arange(2.0)}
    out = tree_map(lambda x, y: x + y, tree, tree)
    assert isinstance(out["b"], list) and isinstance(out["b"][1], tuple)
    np.testing.assert_array_equal(out["b"][1][1], np.full(3, 4.0))
    # jax.tree.leaves sorts dict keys: "a" comes before "b".
    sizes = [leaf.size for leaf in tree_leaves(tree)]
    assert sizes == [2, 2, 1, 3]


@pytest.mark.parametrize(
    "other",
    [
        {"a": np.ones(2)},  # missing key
        {"a": np.ones(2), "b": [np.ones(2)]},  # list too short
        {"a": [np.ones(2)], "b": [np.ones(2), np.ones(2)]},  # container where a leaf is
        {"a": np.ones(2), "b": (np.ones(2), np.ones(2))},  # tuple where a list is
    ],
)
def test_tree_map_rejects_mismatched_structures(other):
    tree = {"a": np.ones(2), "b": [np.ones(2), np.ones(2)]}
    with pytest.raises(ValueError, match="tree structure mismatch"):
        tree_map(lambda x, y: x + y, tree, other)


# ----------------------------------------------------------------------------- AdamW by hand


def test_first_step_moves_by_lr_times_sign_of_grad():
    # Step 1: m̂ = g and v̂ = g² exactly, so each element moves by lr·g/(|g| + ε) ≈ lr·sign(g)
    # however large or small g is. Forgetting the bias correction would give
    # m = 0.1·g, v = 0.001·g², a move of 0.1/√0.001 ≈ 3.16·lr instead.
    p = np.array([1.0, -2.0, 0.5, 3.0])
    g = np.array([0.3, -40.0, 1e-3, -2.5])
    new_p, state = adamw_update({"w": g}, adamw_init({"w": p}), {"w": p}, lr=0.1)
    # ≈ lr·sign(g): short of it by lr·ε/(|g| + ε), at most 1e-6 here (the g = 1e-3 element).
    np.testing.assert_allclose(new_p["w"], [0.9, -1.9, 0.4, 3.1], rtol=0, atol=1.01e-6)
    # ... and exactly p − lr·g/(|g| + ε).
    np.testing.assert_allclose(new_p["w"], p - 0.1 * g / (np.abs(g) + 1e-8), rtol=1e-15)
    assert state.step == 1
    np.testing.assert_allclose(state.mu["w"], 0.1 * g, rtol=1e-14)  # 1 − b1 rounds
    np.testing.assert_allclose(state.nu["w"], 0.001 * g * g, rtol=1e-14)


def test_constant_grad_moves_lr_per_step_with_eps_zero():
    # With a constant g the bias-corrected moments are exactly g and g² at every step, so
    # with ε = 0 three steps move each element by exactly 3·lr·sign(g).
    p = {"w": np.array([1.0, -1.0])}
    g = {"w": np.array([0.5, -7.0])}
    state = adamw_init(p)
    for _ in range(3):
        p, state = adamw_update(g, state, p, lr=0.01, eps=0.0)
    np.testing.assert_allclose(p["w"], [0.97, -0.97], rtol=1e-14)
    assert state.step == 3


def test_sign_flip_second_step_by_hand():
    # g = +1 then g = −1, b1 = 0.9, b2 = 0.999, ε = 0, lr = 0.1, p0 = 0:
    #   step 1: p1 = −0.1 (first step moves by lr·sign(g)).
    #   step 2: m = 0.9·0.1 − 0.1 = −0.01,   1 − b1² = 0.19    -> m̂ = −1/19
    #           v = 0.999·0.001 + 0.001 = 0.001999, 1 − b2² = 0.001999 -> v̂ = 1
    #           p2 = p1 − 0.1·(−1/19) = −0.1 + 0.1/19
    p = {"w": np.zeros(1)}
    state = adamw_init(p)
    p, state = adamw_update({"w": np.array([1.0])}, state, p, lr=0.1, eps=0.0)
    np.testing.assert_allclose(p["w"], [-0.1], rtol=1e-15)
    p, state = adamw_update({"w": np.array([-1.0])}, state, p, lr=0.1, eps=0.0)
    np.testing.assert_allclose(p["w"], [-0.1 + 0.1 / 19], rtol=1e-13)
    np.testing.assert_allclose(state.mu["w"], [-0.01], rtol=1e-13)
    np.testing.assert_allclose(state.nu["w"], [0.001999], rtol=1e-13)


def test_weight_decay_is_decoupled_and_uses_the_pre_step_param():
    # g = 0: the Adam direction is 0/(0 + ε) = 0 and only the decay acts:
    #   p ← p·(1 − lr·wd) = [4, −6]·0.95 = [3.8, −5.7].
    # Coupled L2 (torch.optim.Adam's weight_decay, g ← g + wd·p) would instead move by
    # lr·sign(p) on the first step: [3.9, −5.9].
    p = {"w": np.array([4.0, -6.0])}
    new_p, _ = adamw_update({"w": np.zeros(2)}, adamw_init(p), p, lr=0.1, weight_decay=0.5)
    np.testing.assert_allclose(new_p["w"], [3.8, -5.7], rtol=1e-15)

    # g = 1, ε = 0: p ← 4 − 0.1·(1 + 0.5·4) = 3.7. Decaying the post-Adam param instead,
    # (4 − 0.1)·0.95, would give 3.705.
    p = {"w": np.array([4.0])}
    new_p, _ = adamw_update({"w": np.ones(1)}, adamw_init(p), p, lr=0.1, eps=0.0, weight_decay=0.5)
    np.testing.assert_allclose(new_p["w"], [3.7], rtol=1e-15)


def test_update_is_pure_and_keeps_structure_and_dtype(rng):
    params = _tree(rng)
    params["mlp"]["bias"] = params["mlp"]["bias"].astype(np.float32)
    grads = tree_map(lambda x: rng.normal(size=x.shape).astype(x.dtype), params)
    before = tree_map(np.copy, params)
    state = adamw_init(params)
    new_params, new_state = adamw_update(grads, state, params, lr=1e-2, weight_decay=0.1)
    # Inputs untouched, state frozen, step counted.
    assert _tree_rel_err(params, before) == 0.0
    assert state.step == 0 and new_state.step == 1
    with pytest.raises(AttributeError):
        new_state.step = 5  # type: ignore[misc]
    # Same structure and dtypes everywhere; float32 leaves stay float32.
    for tree in (new_params, new_state.mu, new_state.nu):
        tree_map(lambda a, b: None, tree, params)  # raises on a structure mismatch
        assert [x.dtype for x in tree_leaves(tree)] == [x.dtype for x in tree_leaves(params)]
    assert new_params["mlp"]["bias"].dtype == np.float32


def test_adamw_init_is_zeros_like():
    params = {"a": np.ones((2, 3)), "b": [np.ones(4, dtype=np.float32)]}
    state = adamw_init(params)
    assert isinstance(state, AdamWState) and state.step == 0
    for tree in (state.mu, state.nu):
        assert tree["a"].shape == (2, 3) and tree["b"][0].dtype == np.float32
        assert all(not x.any() for x in tree_leaves(tree))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"lr": -1e-3}, "lr"),
        ({"b1": 1.0}, "b1"),
        ({"b1": -0.1}, "b1"),
        ({"b2": 1.0}, "b2"),
        ({"eps": -1e-8}, "eps"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"lr": float("nan")}, "lr"),
    ],
)
def test_adamw_rejects_bad_hyperparameters(kwargs, name):
    p = {"w": np.ones(2)}
    args = {"lr": 1e-3, **kwargs}
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        adamw_update(p, adamw_init(p), p, **args)


# ----------------------------------------------------------------------------- clipping


def test_global_norm_by_hand():
    assert global_norm({"a": np.array([3.0]), "b": [np.array([[4.0, 0.0]])]}) == 5.0


def test_clip_below_threshold_passes_grads_through():
    grads = {"a": np.array([3.0]), "b": [np.array([[4.0]])]}
    clipped, norm = clip_by_global_norm(grads, max_norm=10.0)
    assert norm == 5.0
    np.testing.assert_array_equal(clipped["a"], [3.0])
    np.testing.assert_array_equal(clipped["b"][0], [[4.0]])


def test_clip_above_threshold_scales_to_max_norm():
    grads = {"a": np.array([3.0]), "b": [np.array([[4.0]])]}
    clipped, norm = clip_by_global_norm(grads, max_norm=1.0)
    assert norm == 5.0  # the norm before clipping, as training loops log it
    np.testing.assert_allclose(clipped["a"], [0.6], rtol=1e-15)
    np.testing.assert_allclose(clipped["b"][0], [[0.8]], rtol=1e-15)
    assert math.isclose(global_norm(clipped), 1.0, rel_tol=1e-15)


@pytest.mark.parametrize("max_norm", [0.0, -1.0, float("nan")])
def test_clip_rejects_non_positive_max_norm(max_norm):
    with pytest.raises(ValueError, match="max_norm"):
        clip_by_global_norm({"a": np.ones(2)}, max_norm)


# ----------------------------------------------------------------------------- schedule


def test_warmup_cosine_by_hand():
    kw = {"peak_lr": 1.0, "warmup_steps": 2, "total_steps": 6, "end_lr": 0.1}
    # Warmup from init_lr = 0: 0, 1/2, then the peak at step == warmup_steps.
    assert warmup_cosine(0, **kw) == 0.0
    assert warmup_cosine(1, **kw) == 0.5
    assert warmup_cosine(2, **kw) == 1.0
    # Cosine over T − W = 4 steps from 1.0 down to 0.1: a quarter, half way, the end.
    assert math.isclose(warmup_cosine(3, **kw), 0.1 + 0.9 * 0.5 * (1 + math.sqrt(0.5)))
    assert math.isclose(warmup_cosine(4, **kw), 0.55)
    assert math.isclose(warmup_cosine(6, **kw), 0.1)
    # Held at end_lr after total_steps.
    assert math.isclose(warmup_cosine(1000, **kw), 0.1)


def test_warmup_cosine_edge_cases():
    # No warmup: step 0 is already the peak.
    assert warmup_cosine(0, peak_lr=2e-4, warmup_steps=0, total_steps=10) == 2e-4
    # init_lr > 0: step 0 starts there, half way is the mean.
    assert warmup_cosine(0, 1.0, 4, 10, init_lr=0.2) == 0.2
    assert math.isclose(warmup_cosine(2, 1.0, 4, 10, init_lr=0.2), 0.6)
    # peak_lr == 0: optax's alpha = end/peak is taken as 0, so the decay phase is 0 even
    # though end_lr > 0 (the warmup still interpolates from init_lr towards 0).
    assert warmup_cosine(10, 0.0, 4, 10, end_lr=0.5) == 0.0


@pytest.mark.parametrize(
    ("args", "name"),
    [
        ((-1, 1.0, 2, 10), "step"),
        ((1.5, 1.0, 2, 10), "step"),
        ((True, 1.0, 2, 10), "step"),
        ((0, 1.0, -1, 10), "warmup_steps"),
        ((0, 1.0, 10, 10), "total_steps"),  # optax needs decay_steps − warmup_steps > 0
        ((0, 1.0, 11, 10), "total_steps"),
        ((0, 1.0, 2, 10.0), "total_steps"),
        ((0, -1.0, 2, 10), "peak_lr"),
        ((0, float("inf"), 2, 10), "peak_lr"),
    ],
)
def test_warmup_cosine_rejects_bad_arguments(args, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        warmup_cosine(*args)


@pytest.mark.parametrize(
    ("kw", "name"), [({"end_lr": -0.1}, "end_lr"), ({"init_lr": -1}, "init_lr")]
)
def test_warmup_cosine_rejects_negative_end_points(kw, name):
    with pytest.raises(ValueError, match=name):
        warmup_cosine(0, 1.0, 2, 10, **kw)


# ----------------------------------------------------------------------------- against optax


@pytest.fixture
def jax_x64():
    """``jax`` with float64 enabled for the duration of one test only (no leak to others)."""
    jax = pytest.importorskip("jax")
    pytest.importorskip("optax")
    with jax.enable_x64(True):
        yield jax


@pytest.mark.parametrize(
    "cfg",
    [
        {"peak_lr": 3e-4, "warmup_steps": 10, "total_steps": 50, "end_lr": 3e-5, "init_lr": 0.0},
        {"peak_lr": 1.0, "warmup_steps": 0, "total_steps": 17, "end_lr": 0.0, "init_lr": 0.0},
        {"peak_lr": 2e-3, "warmup_steps": 7, "total_steps": 8, "end_lr": 1e-4, "init_lr": 5e-4},
        {"peak_lr": 1e-3, "warmup_steps": 5, "total_steps": 23, "end_lr": 2e-3, "init_lr": 0.0},
        {"peak_lr": 0.0, "warmup_steps": 3, "total_steps": 9, "end_lr": 0.5, "init_lr": 0.25},
    ],
)
def test_warmup_cosine_matches_optax(jax_x64, cfg):
    import optax

    sched = optax.warmup_cosine_decay_schedule(
        init_value=cfg["init_lr"],
        peak_value=cfg["peak_lr"],
        warmup_steps=cfg["warmup_steps"],
        decay_steps=cfg["total_steps"],
        end_value=cfg["end_lr"],
    )
    steps = range(cfg["total_steps"] + 25)  # past the end too
    ours = np.array([warmup_cosine(s, **cfg) for s in steps])
    theirs = np.array([float(sched(jax_x64.numpy.asarray(s))) for s in steps])
    np.testing.assert_allclose(ours, theirs, rtol=OPT_RTOL, atol=1e-300)


def _optax_run(params, grads_seq, schedule, max_norm, b1, b2, eps, wd):
    import optax

    jnp = __import__("jax").numpy
    tx = optax.chain(
        optax.clip_by_global_norm(max_norm),
        optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=wd),
    )
    p = tree_map(jnp.asarray, params)
    opt_state = tx.init(p)
    for g in grads_seq:
        updates, opt_state = tx.update(tree_map(jnp.asarray, g), opt_state, p)
        p = optax.apply_updates(p, updates)
    adam_state = opt_state[1][0]  # chain -> adamw chain -> ScaleByAdamState
    as_np = lambda t: tree_map(np.asarray, t)  # noqa: E731
    return as_np(p), as_np(adam_state.mu), as_np(adam_state.nu), int(adam_state.count)


def _our_run(params, grads_seq, lr_at, max_norm, b1, b2, eps, wd):
    state = adamw_init(params)
    norms = []
    for g in grads_seq:
        g, norm = clip_by_global_norm(g, max_norm)
        norms.append(norm)
        params, state = adamw_update(
            g, state, params, lr_at(state.step), b1=b1, b2=b2, eps=eps, weight_decay=wd
        )
    return params, state, norms


def test_adamw_with_clip_and_schedule_matches_optax(jax_x64, rng):
    import optax

    params = _tree(rng)
    # Grads of varying scale so that some steps are clipped and some are not.
    scales = [0.05, 3.0, 0.2, 10.0, 0.1, 1.0, 0.01]
    grads_seq = [tree_map(lambda x, s=s: s * rng.normal(size=x.shape), params) for s in scales]
    hp = {"max_norm": 1.0, "b1": 0.8, "b2": 0.99, "eps": 1e-6, "wd": 0.05}
    sched_kw = {
        "peak_lr": 0.05,
        "warmup_steps": 2,
        "total_steps": 6,
        "end_lr": 5e-3,
        "init_lr": 1e-3,
    }
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=sched_kw["init_lr"],
        peak_value=sched_kw["peak_lr"],
        warmup_steps=sched_kw["warmup_steps"],
        decay_steps=sched_kw["total_steps"],
        end_value=sched_kw["end_lr"],
    )

    # optax evaluates the schedule at its int32 count, where this schedule comes out in
    # float32 even under x64 (see the note in ref_numpy/optim.py); an int64 count keeps it
    # float64. The float32 lr would be ~1e-8 off.
    jnp = jax_x64.numpy
    schedule64 = lambda count: schedule(jnp.asarray(count, jnp.int64))  # noqa: E731
    want_p, want_mu, want_nu, want_count = _optax_run(params, grads_seq, schedule64, **hp)
    got_p, got_state, norms = _our_run(
        params, grads_seq, lambda k: warmup_cosine(k, **sched_kw), **hp
    )
    # The case really exercises both clip branches and runs past total_steps.
    assert any(n < hp["max_norm"] for n in norms) and any(n > hp["max_norm"] for n in norms)
    assert len(grads_seq) > sched_kw["total_steps"]

    assert got_state.step == want_count == len(grads_seq)
    assert _tree_rel_err(got_p, want_p) < OPT_RTOL
    assert _tree_rel_err(got_state.mu, want_mu) < OPT_RTOL
    assert _tree_rel_err(got_state.nu, want_nu) < OPT_RTOL

    # The comparison is sharp: taking the schedule one step late (lr at step + 1, the
    # off-by-one the module doc warns about) moves the params far outside the tolerance.
    late_p, _, _ = _our_run(params, grads_seq, lambda k: warmup_cosine(k + 1, **sched_kw), **hp)
    assert _tree_rel_err(late_p, want_p) > 1e3 * OPT_RTOL


def test_adamw_without_bias_correction_would_not_match_optax(jax_x64, rng):
    # A guard that the optax comparison can fail: a variant without bias correction (the
    # classic bug) disagrees with optax after a few steps far beyond the tolerance.
    params = _tree(rng)
    grads_seq = [tree_map(lambda x: rng.normal(size=x.shape), params) for _ in range(3)]
    hp = {"max_norm": 1e9, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "wd": 0.0}
    want_p, *_ = _optax_run(params, grads_seq, lambda count: 1e-2, **hp)

    got_p, _, _ = _our_run(params, grads_seq, lambda k: 1e-2, **hp)
    assert _tree_rel_err(got_p, want_p) < OPT_RTOL

    p = params
    mu = tree_map(np.zeros_like, params)
    nu = tree_map(np.zeros_like, params)
    for g in grads_seq:
        mu = tree_map(lambda m, g: 0.9 * m + 0.1 * g, mu, g)
        nu = tree_map(lambda v, g: 0.999 * v + 0.001 * g * g, nu, g)
        p = tree_map(lambda p, m, v: p - 1e-2 * m / (np.sqrt(v) + 1e-8), p, mu, nu)
    assert _tree_rel_err(p, want_p) > 1e3 * OPT_RTOL
