"""The training path: ``data`` (JSONL to token batches; no JAX), ``trainer`` (the jitted step
and ``fit``), ``checkpoint`` (param trees on and off devices), ``sharding`` and
``orbax_state`` (device meshes and sharded training state)."""
