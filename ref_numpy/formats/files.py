"""Files written whole or not at all, one writer at a time: the helpers every writer in the
project uses, and the named moments the crash tests stop a run at.

A model, adapter or run directory is built in a temporary directory beside its destination
and put in place in one step only when complete, so a crash or an error never leaves a
half-written output, and a file is never partly overwritten. A temporary is named
``.<name>.tmp-<pid>-...`` after the path it becomes and the process writing it; the next writer
of that path removes those of processes that no longer run (a writer killed mid-write cannot
clean up after itself).

Errors of the file system reach the user as one line naming the path and the cause
(``describe``): a write that fails for lack of space names the file it was writing, not an
anonymous ``[Errno 28]``.

**Fault points.** ``fault_point(phase)`` marks a moment of a run where a crash must lose
nothing but the steps since the last checkpoint. It does nothing unless the environment asks:

- ``QLORA_SPEC_FAULT=phase:count[:SIGNAL][,...]``: the ``count``-th time this process passes
  ``phase`` it sends itself ``SIGNAL`` (default ``SIGKILL``; ``SIGSTOP`` holds it for a test to
  act on, then ``SIGCONT``).
- ``QLORA_SPEC_FAULT_TRACE=FILE``: every phase passed is appended to ``FILE``, one a line, so a
  test can draw points from an uninterrupted run.

The phases: ``compile`` (the train step traced for compilation), ``step`` (a step dispatched,
its results not yet read), ``save`` (a checkpoint about to start, the previous one complete),
``saving`` (a checkpoint being written in the background), ``checksum`` (a checkpoint's files
written, its checksums not yet), ``export`` (the run's output half written), ``commit`` (an
output complete in its temporary directory, not yet in place), ``cleanup`` (the run's output in
place, its work directory not yet removed).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FAULT_ENV = "QLORA_SPEC_FAULT"
TRACE_ENV = "QLORA_SPEC_FAULT_TRACE"
PHASES = ("compile", "step", "save", "saving", "checksum", "export", "commit", "cleanup")

_passed: collections.Counter[str] = collections.Counter()
_passed_lock = threading.Lock()


def fault_point(phase: str) -> None:
    """Pass the named moment ``phase`` of a run (one of ``PHASES``): a no-op unless
    ``QLORA_SPEC_FAULT`` or ``QLORA_SPEC_FAULT_TRACE`` is set (see the module docstring)."""
    spec, trace = os.environ.get(FAULT_ENV), os.environ.get(TRACE_ENV)
    if not spec and not trace:
        return
    with _passed_lock:  # checkpoints pass theirs on orbax's threads
        _passed[phase] += 1
        if trace:
            with open(trace, "a") as f:
                f.write(phase + "\n")
        for want, count, signum in _parse_faults(spec or ""):
            if want == phase and count == _passed[phase]:
                os.kill(os.getpid(), signum)


def _parse_faults(spec: str) -> list[tuple[str, int, int]]:
    """``[(phase, count, signal)]`` of a ``QLORA_SPEC_FAULT`` value; ValueError naming it."""
    out = []
    for item in filter(None, spec.split(",")):
        parts = item.split(":")
        try:
            if parts[0] not in PHASES or len(parts) not in (2, 3) or int(parts[1]) < 1:
                raise ValueError(item)
            signum = signal.Signals[parts[2]] if len(parts) == 3 else signal.SIGKILL
        except (ValueError, KeyError):
            raise ValueError(
                f"{FAULT_ENV}={spec!r}: expected phase:count[:SIGNAL] items, phases "
                f"{', '.join(PHASES)}, count >= 1, a signal name such as SIGSTOP"
            ) from None
        out.append((parts[0], int(parts[1]), int(signum)))
    return out


# --- errors that name their path ------------------------------------------------------


def describe(e: OSError) -> str:
    """One line for ``e``: ``PATH: CAUSE`` where it names a path, else its message."""
    if e.filename is None or e.strerror is None:
        return " ".join(str(e).split())
    where = os.fsdecode(e.filename)
    if e.filename2 is not None:
        where += f" -> {os.fsdecode(e.filename2)}"
    return f"{where}: {' '.join(str(e.strerror).split())}"


def named(e: OSError, path: str | os.PathLike[str]) -> OSError:
    """``e`` as the same kind of error naming ``path`` (a failed ``write`` names none)."""
    if e.errno is None:
        return e
    return OSError(e.errno, e.strerror or os.strerror(e.errno), os.fspath(path))


@contextlib.contextmanager
def naming(path: str | os.PathLike[str]) -> Iterator[None]:
    """Re-raise an OSError that names no file (a failed ``write`` or ``flush``) as one that
    names ``path``."""
    try:
        yield
    except OSError as e:
        if e.filename is not None or e.errno is None:
            raise
        raise named(e, path) from None


# --- temporaries ----------------------------------------------------------------------


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-{os.getpid()}-"


def remove_stale(path: Path) -> None:
    """Remove the temporaries of ``path`` (``.<name>.tmp-<pid>-...`` beside it) whose writer is
    no longer running: what a process killed mid-write left."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.tmp-(\d+)-")
    parent = path.parent
    for entry in list(parent.iterdir()) if parent.is_dir() else []:
        m = pattern.match(entry.name)
        if m is None or _running(int(m[1])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_tree(path: Path) -> None:
    """Remove the directory ``path`` in one step: it is renamed to a temporary first, so a
    kill during the deletion leaves no half-deleted ``path``, only a temporary that the next
    writer removes (``remove_stale``)."""
    aside = path.with_name(_temp_prefix(path) + "removed")
    path.rename(aside)
    shutil.rmtree(aside)


def check_output_dir(out: Path) -> None:
    """Refuse an output directory path that is a file, or lies under one, with
    NotADirectoryError naming the file (replacing a file with a directory would lose it)."""
    for path in (out, *out.parents):
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(
                errno.ENOTDIR,
                "a file, not a directory"
                + (" (the output directory goes here)" if path == out else ""),
                str(path),
            )


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """A temporary directory beside ``out_dir`` that becomes ``out_dir`` on success.

    An existing ``out_dir`` is replaced (with ``overwrite``) by exchanging the two in one step
    where the system can (Linux ``renameat2``), so ``out_dir`` is never missing. Raises
    FileExistsError if ``out_dir`` exists and ``overwrite`` is off, NotADirectoryError if it is
    a file or under one. On an exception the temporary directory is removed, ``out_dir`` is
    untouched, and an OSError names the path under ``out_dir`` it was writing.
    """
    out = Path(out_dir)
    check_output_dir(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: exists (pass overwrite / --overwrite to replace it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(out)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out), dir=out.parent))
    except OSError as e:
        raise named(e, out) from None
    try:
        yield tmp
        fault_point("commit")
        _put_in_place(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno is not None:
            raise _as_under(e, tmp, out) from None
        raise


def _as_under(e: OSError, tmp: Path, out: Path) -> OSError:
    """``e`` naming the paths under ``out`` that its paths under ``tmp`` were to become (``out``
    itself where it names none)."""

    def under(name: Any) -> str | None:
        if name is None:
            return None
        text = os.fsdecode(name)
        if text == str(tmp) or text.startswith(str(tmp) + os.sep):
            return str(out) + text[len(str(tmp)) :]
        return text

    first = str(out) if e.filename is None else under(e.filename)
    return OSError(e.errno, e.strerror, first, None, under(e.filename2))


def _put_in_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        tmp.rename(out)
    elif _exchange(tmp, out):  # out is the new directory now, tmp the old one
        shutil.rmtree(tmp)
    else:
        old = out.with_name(_temp_prefix(out) + "old")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` in one step (Linux ``renameat2(RENAME_EXCHANGE)``);
    False where the system or the file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc without it
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def write_text(path: Path, text: str) -> None:
    """``text`` into ``path`` whole or not at all: written beside it, then renamed over it."""
    tmp = path.with_name(_temp_prefix(path) + "file")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise named(e, path) from None


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented, key-sorted JSON (a newline at the end), whole or not at all."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


# --- one writer per output ------------------------------------------------------------


class Locked(BlockingIOError):
    """Another process holds the lock: ``filename`` is the lock file, ``strerror`` says who."""


@contextlib.contextmanager
def exclusive(lock: Path, what: str) -> Iterator[None]:
    """Hold the lock file ``lock`` (an ``flock``, with this process's pid written in it) while
    the block runs, then remove it; ``what`` says in an error what the holder is doing.

    A second process is refused at once with Locked naming the lock and the holder's pid. The
    kernel releases the lock of a process that dies, so a lock left by a killed run is free:
    the next run takes it over and writes its own pid.
    """
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise Locked(
                errno.EWOULDBLOCK,
                f"held by process {holder} ({what}); wait for it to finish, or stop it",
                str(lock),
            ) from None
        try:
            current = os.stat(lock).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            break
        os.close(fd)  # the holder removed the file as it finished: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)  # while still holding it, so no one locks a file about to go
        os.close(fd)
