"""Files written whole or not at all: the helpers every writer in the project uses.

A model, adapter or run directory is built in a temporary directory beside its destination
and renamed into place only when complete, so a crash or an error never leaves a
half-written output, and a file is never partly overwritten.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """A temporary directory beside ``out_dir`` that becomes ``out_dir`` on success.

    Raises FileExistsError if ``out_dir`` exists and ``overwrite`` is off. On an exception
    the temporary directory is removed and ``out_dir`` is untouched.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: exists (pass overwrite / --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented, key-sorted JSON (a newline at the end)."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
