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

**Checksums.** Once a step is written, ``checksums.json`` is added to its directory: the size
and sha256 of every file, and a sha256 of each array's stored chunks (read back through
tensorstore's OCDBT store), so that a damaged file can be traced to the arrays it holds. It is
written as soon as the background save is seen to be done (``poll`` between steps, or the next
``save``, ``wait``, ``restore`` or ``close``). Every restore verifies it first;
``restore_intact`` falls back from a step that fails (torn by a kill before its checksums, or a
file truncated or changed since) to the newest one that passes. A save that fails (a full or
read-only disk) is an OSError naming the step's directory, its temporary directory removed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from ref_numpy.formats import files
from ref_numpy.formats.files import fault_point

CHECKSUMS = "checksums.json"
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's name for a step (or item) being written
ARRAY_ITEMS = ("params", "opt_state")


class CorruptCheckpoint(ValueError):
    """A step directory that is torn or has changed since it was written; the message names
    the file (and the arrays it holds)."""


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
        self._unsealed: int | None = None  # a step saved whose checksums are not written yet
        self._failed = False
        try:
            self.manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=keep,
                    enable_async_checkpointing=async_save,
                    create=True,
                    cleanup_tmp_directories=True,  # what a killed save left
                ),
                item_handlers={  # named up front, so a new process reads what another wrote
                    "params": ocp.StandardCheckpointHandler(),
                    "opt_state": ocp.StandardCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler(),
                },
            )
        except OSError as e:
            raise files.named(e, self.directory) from None

    def save(self, step: int, params: Any, opt_state: Any, meta: dict[str, Any]) -> None:
        """Start writing the state after optimizer step ``step``. ``meta`` must be JSON.

        Waits for the previous save first (and writes its checksums). Raises OSError naming
        the step's directory when the previous save or this one cannot be written."""
        self.wait()
        fault_point("save")
        self._unsealed = step
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardSave(params),
                    opt_state=ocp.args.StandardSave(opt_state),
                    meta=ocp.args.JsonSave(meta),
                ),
                force=True,
            )
        except Exception as e:
            raise self._failure(e) from None
        fault_point("saving")

    def poll(self) -> None:
        """Write the checksums of a save that has finished in the background (nothing when
        none has): cheap, meant to be called between steps. In a multi-process run it does
        nothing (the processes might see the save end at different steps and wait apart);
        the next ``save`` or ``close``, which every process calls, writes them."""
        if jax.process_count() > 1:
            return
        if self._unsealed is not None and not self.manager.is_saving_in_progress():
            self.wait()

    def latest_step(self) -> int | None:
        """The newest step written completely, or None."""
        return self.manager.latest_step()

    def restore(
        self, params_like: Any, opt_state_like: Any, step: int | None = None
    ) -> tuple[Any, Any, dict[str, Any]]:
        """``(params, opt_state, meta)`` of ``step`` (default: the newest).

        The state is read into the structure, shapes, dtypes and shardings of the ``*_like``
        trees (arrays placed as wanted, or ``jax.ShapeDtypeStruct``s with a sharding); each
        device reads only its shards. The step's checksums are verified first. Raises
        FileNotFoundError without a checkpoint, CorruptCheckpoint naming the file that fails
        its checksum, and ValueError naming the leaf where the stored state does not fit.
        """
        self.wait()
        step = self.latest_step() if step is None else step
        if step is None or step not in self.manager.all_steps():
            raise FileNotFoundError(
                f"{self.directory}: no training-state checkpoint"
                + ("" if step is None else f" for step {step}")
                + f" (steps present: {list(self.manager.all_steps())})"
            )
        self.verify(step)
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

    def restore_intact(
        self, params_like: Any, opt_state_like: Any, report: Callable[[str], None]
    ) -> tuple[Any, Any, dict[str, Any]] | None:
        """``restore`` of the newest checkpoint that passes ``verify``, or None if none does.

        Each one skipped is passed to ``report`` with the reason, and removed with any newer
        one (training after the restored step writes them again)."""
        self.wait()
        steps = sorted(self.manager.all_steps(), reverse=True)
        for i, step in enumerate(steps):
            try:
                self.verify(step)
            except CorruptCheckpoint as e:
                report(f"skipping the checkpoint of step {step}: {e}")
                continue
            out = self.restore(params_like, opt_state_like, step)
            for newer in steps[:i]:
                self.manager.delete(newer)
            return out
        for step in steps:
            self.manager.delete(step)
        return None

    def verify(self, step: int) -> None:
        """Check every file of the step's directory against its ``checksums.json``. Raises
        CorruptCheckpoint naming the file, and the arrays whose stored chunks changed."""
        root = self.directory / str(step)
        path = root / CHECKSUMS
        if not path.is_file():
            raise CorruptCheckpoint(
                f"{root}: no {CHECKSUMS} (the run stopped before this checkpoint was complete)"
            )
        try:
            recorded = json.loads(path.read_text())
            table = {
                str(k): (int(v["bytes"]), str(v["sha256"])) for k, v in recorded["files"].items()
            }
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            raise CorruptCheckpoint(f"{path}: damaged (not the checksums written)") from None
        for rel, (size, digest) in table.items():
            file = root / rel
            if not file.is_file():
                problem = "missing"
            elif file.stat().st_size != size:
                problem = f"{file.stat().st_size} bytes, {size} when written (truncated or changed)"
            elif _sha256(file) != digest:
                problem = "its sha256 differs from the one written with it (corrupted)"
            else:
                continue
            raise CorruptCheckpoint(f"{file}: {problem}{_culprits(root, rel, recorded)}")

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
        """Block until every started save is written, then write its checksums. Raises
        OSError naming the step's directory if it could not be written."""
        step = self._unsealed
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._failure(e) from None
        if step is None:
            return
        self._unsealed = None
        if jax.process_index() == 0:  # every process's files are in by now
            root = self.directory / str(step)
            fault_point("checksum")
            try:
                files.write_json(root / CHECKSUMS, checksums(root))
            except OSError as e:  # the step without its checksums would only be skipped
                shutil.rmtree(root, ignore_errors=True)
                raise self._failure(e, step) from None

    def _failure(self, e: BaseException, step: int | None = None) -> OSError:
        """The OSError for a save that failed with ``e`` (an OSError, or orbax's and
        tensorstore's wrappers of one), naming the step's directory, after removing what the
        save left (its temporary directory, or the step without its checksums)."""
        step = self._unsealed if step is None else step
        self._unsealed, self._failed = None, True
        self._remove_temporaries()
        code = _errno(e)
        if code is None:
            code, cause = errno.EIO, " ".join(str(e).split())[:300]
        else:
            cause = os.strerror(code)
        where = self.directory / str(step) if step is not None else self.directory
        note = (
            ""
            if step is None
            else f" (the checkpoint of step {step} is not written; the ones before it are kept)"
        )
        return OSError(code, cause + note, str(where))

    def _remove_temporaries(self) -> None:
        """Delete what unfinished saves left: orbax's temporary step directories."""
        for entry in list(self.directory.iterdir()) if self.directory.is_dir() else []:
            if TMP_SUFFIX in entry.name:
                shutil.rmtree(entry, ignore_errors=True)

    def close(self) -> None:
        """Finish pending saves (writing their checksums) and release the manager's threads.

        After a failed save, its temporaries are removed once more when orbax's writer threads
        have ended: one still writing an item (its arrays, its shardings, its metadata) when
        another item failed can create files after the failure's own cleanup, and closing the
        manager does not wait for it."""
        try:
            if not self._failed:
                self.wait()
        finally:
            with contextlib.suppress(Exception) if self._failed else contextlib.nullcontext():
                self.manager.close()
            if self._failed:
                for thread in threading.enumerate():
                    if type(thread).__module__.startswith("orbax.") and thread.is_alive():
                        with contextlib.suppress(Exception):  # its failure is reported already
                            thread.join(timeout=60)  # orbax's join raises what the thread raised
                self._remove_temporaries()

    def __enter__(self) -> TrainCheckpoints:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checksums(root: Path) -> dict[str, Any]:
    """What ``checksums.json`` holds for the step directory ``root``: ``files`` (each file's
    ``bytes`` and ``sha256``, by path under ``root``) and ``arrays`` (per array item, each
    array's sha256 over its stored keys and chunks, by name)."""
    table = {
        str(p.relative_to(root)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != CHECKSUMS
    }
    arrays = {}
    for item in ARRAY_ITEMS:
        with contextlib.suppress(Exception):  # a store that is not OCDBT: files only
            arrays[item] = array_digests(root / item)
    return {"files": table, "arrays": arrays}


def array_digests(item_dir: Path) -> dict[str, str]:
    """``{array name: sha256}`` over the keys and stored (compressed) chunks of each array of
    an orbax item directory, read through tensorstore's OCDBT key-value store."""
    import tensorstore as ts

    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{item_dir}/"}).result()
    out: dict[str, Any] = {}
    for key in sorted(kv.list().result()):
        h = out.setdefault(key.decode().split("/")[0], hashlib.sha256())
        h.update(key)
        h.update(bytes(kv.read(key).result().value))
    return {name: h.hexdigest() for name, h in out.items()}


def _culprits(root: Path, rel: str, recorded: dict[str, Any]) -> str:
    """``; tensors changed: params layers...`` for a damaged file of an array item, from the
    arrays whose stored chunks no longer match; what is known where they cannot be read."""
    item = Path(rel).parts[0]
    want = recorded.get("arrays", {}).get(item)
    if not want:
        return f" (in {item})"
    try:
        now = array_digests(root / item)
    except Exception as e:
        return f" (in {item}; its arrays cannot be read: {' '.join(str(e).split())[:200]})"
    changed = [name for name, digest in want.items() if now.get(name) != digest]
    if not changed:
        return f" (in {item}; its arrays read back as written)"
    return (
        f"; tensors changed: {item} "
        + ", ".join(changed[:4])
        + (" ..." if len(changed) > 4 else "")
    )


def _errno(e: BaseException) -> int | None:
    """The OS error number behind ``e``: its own, one of its causes', or the one orbax's and
    tensorstore's messages carry (``os_error_code='28'``, ``(os error 28)``)."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return seen.errno
        m = re.search(r"os_error_code='?(\d+)|\(os error (\d+)\)", str(seen))
        if m:
            return int(m[1] or m[2])
        seen = seen.__cause__ or seen.__context__
    return None
