"""The jobs a user runs, thin over ``jax_impl.train`` and ``jax_impl.generate``: ``cli`` (the
``qlora-spec`` command), ``train`` (the train command, a job around ``fit``), ``evaluate``,
``pretrain``, ``corpus`` and ``demo``."""
