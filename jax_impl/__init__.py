"""qlora-spec's JAX/Flax engine: the model of ``ref_numpy``, compiled, trained and served."""
