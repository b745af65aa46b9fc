"""The file formats the spec owns: Hugging Face checkpoints (``hf``), PEFT adapters
(``peft``), bitsandbytes NF4 checkpoints (``bnb``), and the write-whole-or-nothing helpers
every writer uses (``files``). Plain NumPy and safetensors; nothing here imports JAX."""
