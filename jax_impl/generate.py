"""Mirror of ``ref_numpy/generate.py``: KV-cache decoding, jitted once per shape bucket.

The spec runs a Python loop and grows its cache by one position per token. Here the whole
decode is one ``jax.jit`` program per ``(B, prompt bucket P, cache length S)``, and every
forward pass is the model's own (``Model`` with a ``KVCache``):

1. the prompt, right-padded to ``P`` (the next power of two >= T0), runs once through the
   model and writes its keys and values into a preallocated cache (a ``KVCache``);
   the padded positions come after the real ones, so causal masking already hides them
   from the real queries; the cache's length is then set back to T0, and decode steps
   overwrite the padded slots before any query can see them;
2. a ``jax.lax.while_loop`` feeds one token per iteration: the model writes the token's keys
   and values at the cache's length and attends over the cache's slots, masking those past
   it. Every step attends over the whole buffer, so the buffer grows with the text: the
   first loop runs on half of S (``cache_sizes``) and the cache is copied once into S slots
   when it fills. With a 32-token prompt and 128 new tokens (S = 256), 96 of the steps
   attend over 128 slots instead of 256; ``bench/decode.py`` gained about 5% at B = 1 and
   15% at B = 8, at the cost of compiling the step twice.
3. under float32 compute on a CPU the loop reads every float32 kernel, the blocks'
   projections and the head, from a copy stored transposed, ``[O, I]``, made once as it
   slices each layer's kernels out of the stack (``_kernels_transposed``): XLA's CPU
   dot of a few rows runs faster with the weight's input axis innermost. On a 2-core AMD EPYC
   (Zen 3) the B = 8 step's products ran 20% faster that way; on a Xeon the same chain of
   products ran as fast in either layout. The prompt's pass reads the model's own kernels:
   had it read the copy too, XLA would have made the copy twice, once more for the loops.

Prompt length, token budget, temperature, top-k, top-p and the eos id are traced values, so
changing them inside a bucket does not recompile.
"""

from __future__ import annotations

import collections
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .attention import KVCache, cache_dtype
from .model import Model

Array = jax.Array

# How often the decode program was traced, per (B, P, S) bucket: a test hook (each trace is
# one compilation; generating again inside a bucket must not add one).
TRACES: collections.Counter[tuple[int, int, int]] = collections.Counter()


def bucket(n: int) -> int:
    """The next power of two >= n (n >= 1)."""
    return 1 << max(n - 1, 0).bit_length()


# The most decoding loops one program runs (each compiles the model's step once more: a 30-layer
# model's decode program took about 13 s to compile on a 2-core CPU with two, 15 s with three
# and 9 s with one) and the smallest buffer worth a loop of its own.
MAX_PHASES = 2
MIN_PHASE = 64


def cache_sizes(p: int, cache_len: int) -> tuple[int, ...]:
    """The cache's sizes, smallest first and ending at ``cache_len``, for a prompt bucket p.

    Each size is half the next, at least ``MIN_PHASE`` and at least 2p (the prefill writes p
    slots, so the first loop has room for p steps or more); at most ``MAX_PHASES`` sizes.
    """
    sizes = [cache_len]
    while len(sizes) < MAX_PHASES and sizes[0] // 2 >= max(2 * p, MIN_PHASE):
        sizes.insert(0, sizes[0] // 2)
    return tuple(sizes)


# --- sampling --------------------------------------------------------------------------


def sample_token(
    logits: Array,
    key: Array,
    temperature: Array,
    top_k: Array,
    top_p: Array,
    *,
    greedy: bool,
    use_top_k: bool,
    use_top_p: bool,
) -> Array:
    """One token per row, as the spec's ``sample_token``. logits [B, V] -> int32 [B].

    Greedy is argmax (ties to the lowest id). Otherwise logits / temperature, cut to the
    ``top_k`` largest, then to the smallest most-likely set reaching ``top_p``, sampled with
    ``jax.random.categorical``. The knobs are traced; only which filters apply is static.
    """
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    v = logits.shape[-1]
    z = logits / temperature.astype(logits.dtype)  # [B,V]
    if use_top_k:
        k = jnp.clip(top_k, 1, v)
        kth = jnp.take(jnp.sort(z, axis=-1), v - k, axis=-1)[:, None]  # [B,1]
        z = jnp.where(z < kth, -jnp.inf, z)
    if use_top_p:
        p = jax.nn.softmax(z, axis=-1)  # [B,V]
        order = jnp.argsort(-p, axis=-1, stable=True)  # [B,V] most likely first
        sorted_p = jnp.take_along_axis(p, order, axis=-1)
        before = jnp.cumsum(sorted_p, axis=-1) - sorted_p  # mass of the likelier tokens
        keep_sorted = before < top_p.astype(p.dtype)  # the first token always stays
        rows = jnp.arange(p.shape[0])[:, None]
        keep = jnp.zeros_like(keep_sorted).at[rows, order].set(keep_sorted)  # vocab order
        z = jnp.where(keep, z, -jnp.inf)
    return jax.random.categorical(key, z, axis=-1).astype(jnp.int32)


# --- the decode program ------------------------------------------------------------------


def reads_transposed(dtype: Any, platform: str) -> bool:
    """Whether the decode program reads its float32 kernels from an ``[O, I]`` copy under
    compute ``dtype`` on ``platform`` (``"cpu"``, ``"gpu"``, ``"tpu"``): on a CPU under
    float32 only (module docstring, 3.). GPU and TPU compilers pick their own layouts."""
    return platform == "cpu" and jnp.dtype(dtype) == jnp.float32


def _kernels_transposed(tree: Any, stored: bool) -> Any:
    """``tree`` with each float32 kernel leaf (a 2-D leaf named ``kernel``) transposed:
    [I, O] -> [O, I]. ``stored=True`` puts the copy behind ``optimization_barrier``, which
    keeps XLA from folding the transpose away, so the copy is made once, in memory;
    ``stored=False`` (inside the loop) turns it back into the [I, O] view the model reads,
    a transpose XLA folds into each product's dimension numbers."""

    def flip(path: tuple[Any, ...], a: Array) -> Array:
        names = [getattr(k, "key", None) for k in path[-2:]]
        if "kernel" not in names or a.ndim != 2 or a.dtype != jnp.float32:
            return a
        return jax.lax.optimization_barrier(a.T) if stored else a.T

    return jax.tree_util.tree_map_with_path(flip, tree)


@functools.partial(
    jax.jit,
    static_argnames=(
        "graphdef",
        "cache_len",
        "cache_dtype",
        "transposed",
        "greedy",
        "use_top_k",
        "use_top_p",
    ),
)
def _decode(
    graphdef: Any,
    state: Any,
    prompt: Array,
    t0: Array,
    n_new: Array,
    key: Array,
    temperature: Array,
    top_k: Array,
    top_p: Array,
    eos: Array,
    pad: Array,
    stops: Array,
    stop_valid: Array,
    *,
    cache_len: int,
    cache_dtype: Any,
    transposed: bool,
    greedy: bool,
    use_top_k: bool,
    use_top_p: bool,
) -> tuple[Array, Array]:
    """Prefill ``prompt`` [B, P] (first ``t0`` real), then decode up to ``n_new`` tokens.

    ``eos`` < 0 means no eos; ``stops`` [N_stop, W] holds stop sequences right-aligned,
    ``stop_valid`` marks their real entries. Returns the tokens [B, S + 1] (prompt, then the
    generated ones from ``t0``) and the number n of generated tokens.
    """
    b, p = prompt.shape
    TRACES[(b, p, cache_len)] += 1  # runs only while tracing
    model = nnx.merge(graphdef, state)
    sizes = cache_sizes(p, cache_len)
    cache = KVCache.zeros(model.cfg, b, sizes[0], cache_dtype)  # L x [C,H,S], [C,S,H]
    # Each layer's state sliced out of the stack once, not on every token, and with the head
    # its float32 kernels stored [O, I] for the loop where ``transposed`` (module docstring,
    # 3.); the prompt's pass reads ``kernels``.
    kernels = {"layers": model.layer_states(), "head": {"kernel": model.head_kernel()}}
    stored = _kernels_transposed(kernels, stored=True) if transposed else kernels

    def forward(ids: Array, cache: KVCache, last: Array | None, read: Any) -> tuple[Array, KVCache]:
        """Logits [B, V] at position ``last`` of ``ids`` [B, T] (the only one when None),
        with the kernels ``read`` ({"layers": ..., "head": {"kernel": [D, V]}})."""
        x, cache = model.hidden_states(ids, cache=cache, layer_states=read["layers"])  # [B,T,D]
        if last is not None:
            x = jax.lax.dynamic_index_in_dim(x, last, axis=1)  # [B,1,D]
        logits = model.logits(x, read["head"]["kernel"])  # [B,1,V]: that one position only
        return logits[:, 0], cache

    logits, cache = forward(prompt, cache, t0 - 1, kernels)  # [B,V] at the last real token
    cache = cache._replace(length=t0)  # the padded slots are written over from here
    zero = jnp.zeros((), jnp.int32)

    out = jnp.zeros((b, cache_len + 1), jnp.int32)
    out = jax.lax.dynamic_update_slice(out, prompt, (zero, zero))
    width = stops.shape[1]
    window = jnp.full((b, width), -1, jnp.int32)  # the last W generated tokens

    def pick(
        logits: Array, i: Array, out: Array, done: Array, window: Array
    ) -> tuple[Array, Array, Array, Array]:
        tok = sample_token(
            logits,
            jax.random.fold_in(key, i),
            temperature,
            top_k,
            top_p,
            greedy=greedy,
            use_top_k=use_top_k,
            use_top_p=use_top_p,
        )  # [B]
        tok = jnp.where(done, pad, tok)
        done = done | (tok == eos)
        window = jnp.concatenate([window[:, 1:], tok[:, None]], axis=1)  # [B,W]
        hit = (window[:, None, :] == stops[None]) | ~stop_valid[None]  # [B,N_stop,W]
        done = done | (hit.all(axis=-1) & stop_valid.any(axis=-1)[None]).any(axis=-1)
        out = jax.lax.dynamic_update_slice(out, tok[:, None], (zero, t0 + i))
        return tok, out, done, window

    done0 = jnp.zeros((b,), bool)
    tok, out, done, window = pick(logits, zero, out, done0, window)

    def cond(carry: tuple[Any, ...]) -> Array:
        i, _, cache, done, _, _ = carry
        room = cache.length < cache.size  # a step writes one slot
        return (i < n_new) & ~done.all() & room

    def step(carry: tuple[Any, ...]) -> tuple[Any, ...]:
        i, tok, cache, done, out, window = carry
        read = _kernels_transposed(stored, stored=False) if transposed else stored
        logits, cache = forward(tok[:, None], cache, None, read)  # [B,V]
        tok, out, done, window = pick(logits, i, out, done, window)
        return i + 1, tok, cache, done, out, window

    carry = (jnp.ones((), jnp.int32), tok, cache, done, out, window)
    for size in sizes:  # one loop per size; the last has room for every step
        i, tok, cache, done, out, window = carry
        carry = jax.lax.while_loop(cond, step, (i, tok, cache.grow(size), done, out, window))
    n, *_, out, _ = carry
    return out, n


def generate(
    model: Model,
    prompt_ids: Any,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    eos_id: int | None = None,
    stop: list[list[int]] | None = None,
) -> np.ndarray:
    """Continue each prompt row by up to ``max_new_tokens`` tokens, as the spec's ``generate``.

    Args:
      model: an engine model (full, LoRA or QLoRA; adapters are applied, without dropout).
      prompt_ids: int [B, T0], rows of equal length.
      temperature: 0 is greedy (argmax, ties to the lowest id); > 0 samples.
      top_k, top_p: sampling filters (see ``sample_token``).
      seed: the sampling key is ``jax.random.key(seed)``, folded with the step.
      eos_id: a row that produced it keeps producing it; generation stops early when every
        row is done.
      stop: token sequences; a row whose generated tokens end with one of them is done (the
        sequence is kept), and pads with ``eos_id`` (or 0 without one) from then on.
    Returns:
      int32 [B, T0 + n], the prompt followed by the n generated tokens.
    """
    cfg = model.cfg
    prompt = np.asarray(prompt_ids)
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt: expected int [B, T0] with T0 >= 1, got shape {prompt.shape}")
    if temperature < 0:
        raise ValueError(f"temperature: expected >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k: expected >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p: expected 0 < top_p <= 1, got {top_p}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected >= 0, got {max_new_tokens}")
    b, t0 = prompt.shape
    fed = t0 + max(max_new_tokens, 1) - 1  # positions that run through the model
    if fed > cfg.max_seq_len:
        raise ValueError(f"ids: position {fed - 1} exceeds max_seq_len={cfg.max_seq_len}")
    if max_new_tokens == 0:
        return prompt.astype(np.int32)
    cache_len = min(bucket(fed), cfg.max_seq_len)
    p = min(bucket(t0), cache_len)
    padded = np.zeros((b, p), np.int32)
    padded[:, :t0] = prompt

    stop = [list(s) for s in (stop or []) if len(s) > 0]
    width = max(4, bucket(max((len(s) for s in stop), default=1)))  # bucketed: no recompiles
    stops = np.full((max(4, bucket(max(len(stop), 1))), width), -1, np.int32)
    valid = np.zeros(stops.shape, bool)
    for i, s in enumerate(stop):
        stops[i, width - len(s) :] = s  # right-aligned with the newest token
        valid[i, width - len(s) :] = True

    graphdef, state = nnx.split(model)
    platform = next(iter(jax.tree.leaves(state)[0].devices())).platform  # where it decodes
    i32 = functools.partial(jnp.asarray, dtype=jnp.int32)
    out, n = _decode(
        graphdef,
        state,
        jnp.asarray(padded),
        i32(t0),
        i32(max_new_tokens),
        jax.random.key(seed),
        jnp.asarray(max(temperature, 1e-30), jnp.float32),
        i32(top_k or 1),
        jnp.asarray(top_p or 1.0, jnp.float32),
        i32(-1 if eos_id is None else eos_id),
        i32(0 if eos_id is None else eos_id),
        jnp.asarray(stops),
        jnp.asarray(valid),
        cache_len=cache_len,
        cache_dtype=cache_dtype(model.eng.dtype, platform),
        transposed=reads_transposed(model.eng.dtype, platform),
        greedy=temperature == 0,
        use_top_k=top_k is not None,
        use_top_p=top_p is not None,
    )
    return np.asarray(out)[:, : t0 + int(n)]


def generate_many(
    model: Model,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    batch_size: int = 32,
    eos_id: int | None = None,
    stop: list[list[int]] | None = None,
    **sampling: Any,
) -> list[list[int]]:
    """Continue prompts of any lengths; returns each one's new tokens (eos not included).

    Prompts of equal length are decoded together, ``batch_size`` rows at a time (a short
    group is filled up with copies of its first row), so every call shares the one compiled
    program of its ``(batch_size, prompt bucket, cache bucket)`` and no prompt is ever padded
    on the left: each row decodes exactly as it would alone. ``sampling`` takes
    ``generate``'s ``temperature``, ``top_k``, ``top_p`` and ``seed``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    by_length: dict[int, list[int]] = collections.defaultdict(list)
    for i, p in enumerate(prompts):
        by_length[len(p)].append(i)
    out: list[list[int]] = [[] for _ in prompts]
    for t0, members in sorted(by_length.items()):
        for k in range(0, len(members), batch_size):
            rows = members[k : k + batch_size]
            ids = np.asarray([prompts[i] for i in rows], np.int32)  # [b, T0]
            ids = np.concatenate([ids, np.repeat(ids[:1], batch_size - len(rows), axis=0)])
            tokens = generate(
                model, ids, max_new_tokens, eos_id=eos_id, stop=stop, **sampling
            )  # [batch_size, T0 + n]
            for r, i in enumerate(rows):
                new = [int(t) for t in tokens[r, t0:]]
                out[i] = new[: new.index(eos_id)] if eos_id in new else new
    return out
