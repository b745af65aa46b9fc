"""The spec's AdamW against ``torch.optim.AdamW`` in float64, step by step.

torch writes the decoupled decay as ``p ← p·(1 − lr·wd)`` before the Adam step; the spec
writes it the optax way, ``p ← p − lr·(m̂/(√v̂+ε) + wd·p)``. These tests check the two agree
to rounding over several steps, with the moments, and with a schedule driven through
``LambdaLR`` the way a torch training loop does it.
"""

from __future__ import annotations

import numpy as np
import pytest

from ref_numpy.optim import adamw_init, adamw_update, tree_leaves, tree_map, warmup_cosine
from tests.helpers import rel_err

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.interop

OPT_RTOL = 1e-12  # elementwise float64 arithmetic: only rounding separates the two
N_STEPS = 6
HP = {"lr": 3e-2, "b1": 0.85, "b2": 0.98, "eps": 1e-7, "weight_decay": 0.1}


def _tree(rng: np.random.Generator) -> dict:
    return {
        "embed": {"embedding": rng.normal(size=(11, 5))},
        "layers": [
            {"q_proj": {"kernel": rng.normal(size=(5, 7)), "bias": rng.normal(size=(7,))}},
            {"q_proj": {"kernel": rng.normal(size=(5, 7)), "bias": rng.normal(size=(7,))}},
        ],
        "norm": {"scale": 1.0 + 0.1 * rng.normal(size=(5,))},
    }


def _grads(rng: np.random.Generator, params: dict) -> list[dict]:
    # Different scales per step so |g| varies and the moments do real work.
    return [
        tree_map(lambda x, s=s: s * rng.normal(size=x.shape), params)
        for s in (1.0, 0.01, 5.0, 0.3, 2.0, 0.05)[:N_STEPS]
    ]


def _run_ours(params, grads_seq, lr_at=None, **hp):
    hp = {**HP, **hp}
    state = adamw_init(params)
    for g in grads_seq:
        lr = hp["lr"] if lr_at is None else lr_at(state.step)
        args = {k: v for k, v in hp.items() if k != "lr"}
        params, state = adamw_update(g, state, params, lr, **args)
    return params, state


def _run_torch(params, grads_seq, lr_lambda=None, foreach=False):
    """Run torch.optim.AdamW over the leaves of ``params`` (jax.tree.leaves order)."""
    leaves = [torch.tensor(x, dtype=torch.float64) for x in tree_leaves(params)]
    tensors = [torch.nn.Parameter(t) for t in leaves]
    opt = torch.optim.AdamW(
        tensors,
        lr=HP["lr"],
        betas=(HP["b1"], HP["b2"]),
        eps=HP["eps"],
        weight_decay=HP["weight_decay"],
        foreach=foreach,
    )
    sched = None if lr_lambda is None else torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    for g in grads_seq:
        for t, gl in zip(tensors, tree_leaves(g), strict=True):
            t.grad = torch.tensor(gl, dtype=torch.float64)
        opt.step()
        if sched is not None:
            sched.step()  # after optimizer.step(): update k used lr_lambda(k)
    out = [t.detach().numpy() for t in tensors]
    mu = [opt.state[t]["exp_avg"].numpy() for t in tensors]
    nu = [opt.state[t]["exp_avg_sq"].numpy() for t in tensors]
    return out, mu, nu


def _max_rel_err(ours: list, theirs: list) -> float:
    return max(rel_err(a, b) for a, b in zip(ours, theirs, strict=True))


@pytest.mark.parametrize("foreach", [False, True])
def test_adamw_matches_torch_over_several_steps(rng, foreach):
    params = _tree(rng)
    grads_seq = _grads(rng, params)
    got, state = _run_ours(params, grads_seq)
    want, want_mu, want_nu = _run_torch(params, grads_seq, foreach=foreach)
    assert state.step == N_STEPS >= 5
    assert _max_rel_err(tree_leaves(got), want) < OPT_RTOL
    assert _max_rel_err(tree_leaves(state.mu), want_mu) < OPT_RTOL
    assert _max_rel_err(tree_leaves(state.nu), want_nu) < OPT_RTOL
    # The params really moved, far beyond the tolerance, so the match is not trivial.
    assert _max_rel_err(tree_leaves(got), tree_leaves(params)) > 1e-3


@pytest.mark.parametrize(
    "perturbation",
    [
        {"weight_decay": HP["weight_decay"] * 1.01},  # wrong decay
        {"weight_decay": 0.0},  # no decay at all
        {"eps": HP["eps"] * 10},  # wrong epsilon
        {"b2": 0.99},  # wrong second-moment rate
    ],
)
def test_a_perturbed_spec_does_not_match_torch(rng, perturbation):
    params = _tree(rng)
    grads_seq = _grads(rng, params)
    got, _ = _run_ours(params, grads_seq, **perturbation)
    want, _, _ = _run_torch(params, grads_seq)
    assert _max_rel_err(tree_leaves(got), want) > 1e3 * OPT_RTOL


def test_schedule_lines_up_with_lambdalr_stepped_after_the_optimizer(rng):
    # The module doc's claim: the update taken at state.step == k uses schedule(k), which
    # is torch's LambdaLR when scheduler.step() follows optimizer.step().
    params = _tree(rng)
    grads_seq = _grads(rng, params)
    kw = {"peak_lr": HP["lr"], "warmup_steps": 2, "total_steps": 5, "end_lr": 1e-3, "init_lr": 1e-3}
    got, _ = _run_ours(params, grads_seq, lr_at=lambda k: warmup_cosine(k, **kw))
    want, _, _ = _run_torch(
        params, grads_seq, lr_lambda=lambda k: warmup_cosine(k, **kw) / HP["lr"]
    )
    assert _max_rel_err(tree_leaves(got), want) < OPT_RTOL

    # One step late (schedule(k + 1)) is a different run.
    late, _ = _run_ours(params, grads_seq, lr_at=lambda k: warmup_cosine(k + 1, **kw))
    assert _max_rel_err(tree_leaves(late), want) > 1e3 * OPT_RTOL
