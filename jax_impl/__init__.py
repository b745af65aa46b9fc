"""qlora-spec's JAX/Flax engine: the model of ``ref_numpy``, compiled, trained and served.

The model mirrors the spec file for file (``layers``, ``positional``, ``attention``, ``lora``,
``nf4``, ``model``, ``generate``); ``train`` is the training path (data, the jitted step and
``fit``, checkpoints, meshes) and ``apps`` the jobs behind the command line.
"""
