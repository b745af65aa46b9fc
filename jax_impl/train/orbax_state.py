"""Checkpoints of (sharded) training state with orbax-checkpoint, restorable onto any mesh.

Each step is one directory ``<dir>/<step>/`` holding the trainable ``params``, the optimizer
state ``opt_state`` (both as orbax array stores, each device writing its own shards) and a
JSON ``meta`` (step, data position, seeds). Orbax writes a step into a temporary directory and
renames it when every process has finished (or marks it committed on object stores), so a
reader sees a whole checkpoint or none; saving is asynchronous: ``save`` returns once the
arrays are copied off the devices, and the files are written in the background. Every
process of a multi-process run calls the same methods; orbax coordinates them.

Restoring reads into the shardings of the trees it is given, so a checkpoint written on one
mesh resumes on another mesh or on one device. Exported adapters and merged models are not
this: they stay the PEFT / Hugging Face files ``checkpoint.py`` writes.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def _dotted(path: tuple[Any, ...]) -> str:
    """A pytree key path as orbax names its arrays: ``layers.attn.q_proj.lora_A.value``."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return ".".join(parts)


def abstract(tree: Any) -> Any:
    """``tree`` with every array replaced by a ``jax.ShapeDtypeStruct`` carrying its sharding
    (leaves that already are ``ShapeDtypeStruct``s are kept)."""

    def one(x: Any) -> Any:
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)

    return jax.tree.map(one, tree)


class TrainCheckpoints:
    """The training-state checkpoints of one run, in ``directory``.

    Args:
      directory: where the step directories go (created if missing).
      keep: how many of the newest checkpoints to keep (older ones are deleted).
      async_save: write in the background (``wait`` blocks until written).
    """

    def __init__(
        self, directory: str | os.PathLike[str], keep: int = 2, async_save: bool = True
    ) -> None:
        if keep < 1:
            raise ValueError(f"TrainCheckpoints.keep: expected >= 1, got {keep}")
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True
            ),
            item_handlers={  # named up front, so a new process reads what another wrote
                "params": ocp.StandardCheckpointHandler(),
                "opt_state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def save(self, step: int, params: Any, opt_state: Any, meta: dict[str, Any]) -> None:
        """Start writing the state after optimizer step ``step``. ``meta`` must be JSON."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave(opt_state),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )

    def latest_step(self) -> int | None:
        """The newest step written completely, or None."""
        return self.manager.latest_step()

    def restore(
        self, params_like: Any, opt_state_like: Any, step: int | None = None
    ) -> tuple[Any, Any, dict[str, Any]]:
        """``(params, opt_state, meta)`` of ``step`` (default: the newest).

        The state is read into the structure, shapes, dtypes and shardings of the ``*_like``
        trees (arrays placed as wanted, or ``jax.ShapeDtypeStruct``s with a sharding); each
        device reads only its shards. Raises FileNotFoundError without a checkpoint and
        ValueError naming the leaf where the stored state does not fit.
        """
        self.wait()
        step = self.latest_step() if step is None else step
        if step is None or step not in self.manager.all_steps():
            raise FileNotFoundError(
                f"{self.directory}: no training-state checkpoint"
                + ("" if step is None else f" for step {step}")
                + f" (steps present: {list(self.manager.all_steps())})"
            )
        stored = self.manager.item_metadata(step)
        targets = {"params": abstract(params_like), "opt_state": abstract(opt_state_like)}
        for item, like in targets.items():
            self._check(step, item, stored[item], like)
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(targets["params"]),
                opt_state=ocp.args.StandardRestore(targets["opt_state"]),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return out.params, out.opt_state, dict(out.meta)

    def _check(self, step: int, item: str, stored: Any, like: Any) -> None:
        """Every leaf of ``like`` is stored with its shape and dtype, and nothing more."""
        have = {
            _dotted(path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(
                stored.tree if hasattr(stored, "tree") else stored
            )[0]
            if hasattr(leaf, "shape")
        }
        where = self.directory / str(step) / item
        want = {_dotted(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(like)[0]}
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        if missing or extra:
            raise ValueError(
                f"{where}: does not hold this model's {item} (missing {missing[:4]}, "
                f"unexpected {extra[:4]}); was it written for another model or LoRA config?"
            )
        for name, w in want.items():
            h = have[name]
            if tuple(h.shape) != tuple(w.shape) or np.dtype(h.dtype) != np.dtype(w.dtype):
                raise ValueError(
                    f"{where}: {name} is {np.dtype(h.dtype)}{list(h.shape)}, expected "
                    f"{np.dtype(w.dtype)}{list(w.shape)}"
                )

    def wait(self) -> None:
        """Block until every started save is written."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager's threads."""
        self.manager.close()

    def __enter__(self) -> TrainCheckpoints:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
