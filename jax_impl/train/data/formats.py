"""JSONL training files: their formats, how a file's format is detected, and how every
example is checked; ``DataError``, the error every problem with the data raises.

Formats of a JSONL file (one per file; the first format whose keys are all present wins, in
this order; other keys are ignored):

========================  =======================================================  ===========
format                    keys                                                     loss on
========================  =======================================================  ===========
``chat``                  ``messages``: [{role: system|user|assistant, content}]   assistant
``tokens``                ``input_ids`` (+ ``labels``, same length): ints          as given
``prompt_completion``     ``prompt``, ``completion``: strings                      completion
``alpaca``                ``instruction``, ``output`` (+ ``input``): strings       output
``text``                  ``text``: string                                         all
========================  =======================================================  ===========

Every error about the data is a ``DataError`` (a ``ValueError``) whose message starts with
``FILE:LINE:`` and names the field.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Format = Literal["chat", "tokens", "prompt_completion", "alpaca", "text"]

ROLES = ("system", "user", "assistant")
# Detection order, with each format's required and optional keys.
FORMATS: dict[Format, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "chat": (("messages",), ()),
    "tokens": (("input_ids",), ("labels",)),
    "prompt_completion": (("prompt", "completion"), ()),
    "alpaca": (("instruction", "output"), ("input",)),
    "text": (("text",), ()),
}


class DataError(ValueError):
    """Training data (or a tokenizer / chat template) that cannot be used; names FILE:LINE."""


def _read_json_object(path: Path) -> dict[str, Any] | None:
    """The object in a JSON file, or None when the file does not exist."""
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


@dataclass(frozen=True)
class Dataset:
    """The examples of one JSONL file, their format and their 1-based line numbers."""

    path: str
    fmt: Format
    examples: list[dict[str, Any]]
    lines: list[int]

    @property
    def where(self) -> list[str]:
        """``FILE:LINE`` of each example, for error messages."""
        return [f"{self.path}:{n}" for n in self.lines]


def _read_lines(path: str | Path) -> tuple[list[dict[str, Any]], list[int]]:
    """The objects of a JSONL file with their line numbers; blank lines are skipped."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise DataError(f"{p}: cannot read ({e.strerror})") from None
    examples: list[dict[str, Any]] = []
    lines: list[int] = []
    # Split on "\n" only: str.splitlines would also split inside strings at U+2028 etc.
    for n, chunk in enumerate(raw.split(b"\n"), start=1):
        try:
            line = chunk.decode("utf-8-sig" if n == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{p}:{n}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{p}:{n}: expected a JSON object, got {_kind(obj)}")
        examples.append(obj)
        lines.append(n)
    if not examples:
        raise DataError(f"{p}: empty file (no examples)")
    return examples, lines


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file, one per non-blank line."""
    return _read_lines(path)[0]


def _kind(x: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(x), type(x).__name__)


def _format_of(ex: Mapping[str, Any], where: str) -> Format:
    for fmt, (required, _) in FORMATS.items():
        if all(k in ex for k in required):
            return fmt
    accepted = "; ".join(
        "+".join(req) + "".join(f" (+{o})" for o in opt) for req, opt in FORMATS.values()
    )
    hint = ""
    for req, _ in FORMATS.values():
        have = [k for k in req if k in ex]
        if have and len(have) < len(req):
            hint = f"; has {'+'.join(have)} but not {'+'.join(k for k in req if k not in ex)}"
    raise DataError(f"{where}: unknown format, keys {sorted(ex)}{hint}; accepted: {accepted}")


def _check_str(ex: Mapping[str, Any], key: str, where: str, *, optional: bool = False) -> None:
    if optional and ex.get(key) is None:
        return
    if not isinstance(ex[key], str):
        raise DataError(f"{where}: field {key!r} must be a string, got {_kind(ex[key])}")


def _check_ints(value: Any, key: str, where: str) -> None:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {key!r} must be a non-empty array of integers")
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, int):
            raise DataError(f"{where}: field {key!r}[{i}] must be an integer, got {_kind(v)}")


def check_example(ex: Mapping[str, Any], fmt: Format, where: str) -> None:
    """Raise ``DataError`` naming ``where`` and the field when ``ex`` is not a valid ``fmt``."""
    if fmt == "text":
        _check_str(ex, "text", where)
    elif fmt == "prompt_completion":
        _check_str(ex, "prompt", where)
        _check_str(ex, "completion", where)
    elif fmt == "alpaca":
        _check_str(ex, "instruction", where)
        _check_str(ex, "output", where)
        _check_str(ex, "input", where, optional=True)
    elif fmt == "tokens":
        _check_ints(ex["input_ids"], "input_ids", where)
        if "labels" in ex:
            _check_ints(ex["labels"], "labels", where)
            if len(ex["labels"]) != len(ex["input_ids"]):
                raise DataError(
                    f"{where}: field 'labels' has {len(ex['labels'])} entries but "
                    f"'input_ids' has {len(ex['input_ids'])}; they must match"
                )
    elif fmt == "chat":
        messages = ex["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: field 'messages' must be a non-empty array of messages")
        for i, m in enumerate(messages):
            field = f"messages[{i}]"
            if not isinstance(m, dict):
                raise DataError(f"{where}: field {field!r} must be an object, got {_kind(m)}")
            for key in ("role", "content"):
                if key not in m:
                    raise DataError(f"{where}: field {field!r} has no {key!r}")
                if not isinstance(m[key], str):
                    raise DataError(
                        f"{where}: field '{field}.{key}' must be a string, got {_kind(m[key])}"
                    )
            if m["role"] not in ROLES:
                raise DataError(
                    f"{where}: field '{field}.role' is {m['role']!r}; roles are {', '.join(ROLES)}"
                )
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: field 'messages' has no assistant turn (nothing to learn)")
    else:
        raise DataError(f"{where}: unknown format {fmt!r}; formats are {', '.join(FORMATS)}")


def detect_format(
    examples: Sequence[Mapping[str, Any]],
    *,
    path: str = "<examples>",
    lines: Sequence[int] | None = None,
) -> Format:
    """The one format of all ``examples``; checks every example's fields.

    Raises ``DataError`` at the first example that has no format, another format than the
    first one, or a field of the wrong type.
    """
    if not examples:
        raise DataError(f"{path}: empty (no examples)")
    nums = list(lines) if lines is not None else list(range(1, len(examples) + 1))
    first: Format | None = None
    for ex, n in zip(examples, nums, strict=True):
        where = f"{path}:{n}"
        fmt = _format_of(ex, where)
        if first is None:
            first = fmt
        elif fmt != first:
            raise DataError(
                f"{where}: mixed formats, this line is {fmt!r} but line {nums[0]} is {first!r} "
                "(one format per file)"
            )
        check_example(ex, fmt, where)
    assert first is not None
    return first


def load_dataset(path: str | Path) -> Dataset:
    """Read, detect and check a JSONL file (``read_jsonl`` + ``detect_format``)."""
    examples, lines = _read_lines(path)
    fmt = detect_format(examples, path=str(path), lines=lines)
    return Dataset(str(path), fmt, examples, lines)
