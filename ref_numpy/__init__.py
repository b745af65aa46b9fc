"""qlora-spec's NumPy specification of a decoder transformer, LoRA, NF4 and AdamW.

Plain NumPy in float64, every forward op beside its hand-derived backward. Read it to learn
what the engine in ``jax_impl`` computes; the tests use it as the oracle. Modules:

- ``config``: the model and adapter configurations (and the project's conventions).
- ``layers``: embedding, linear, norms, activations, softmax, cross-entropy.
- ``positional``: sinusoidal, learned and rotary positions.
- ``attention``: scaled dot-product and multi-head attention with grouped-query heads.
- ``lora``: the projection every linear layer goes through, with LoRA and NF4 bases.
- ``nf4``: 4-bit NormalFloat with double quantization, byte-compatible with bitsandbytes.
- ``model``: the whole decoder, forward and backward, and the causal LM loss.
- ``optim``: AdamW, gradient clipping, the warmup + cosine schedule.
- ``generate``: greedy and sampled decoding with a KV cache.
- ``formats``: the files the spec reads and writes: ``formats.hf`` (Hugging Face configs and
  safetensors checkpoints), ``formats.peft`` (PEFT adapters, merging), ``formats.bnb``
  (bitsandbytes NF4 checkpoints) and ``formats.files`` (atomic directories, JSON).
"""
