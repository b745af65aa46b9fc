"""Training data: tokenizers, chat templates, JSONL examples, label masks, packing, batches.

The pipeline runs one way, NumPy only (the trainer turns the batches into device arrays)::

    load_dataset(path)        Dataset: the examples of one JSONL file, its format, line numbers
    encode(...)               Encoded: input_ids [T], labels [T] per example
    fit(..., max_length)      truncate, or refuse, examples longer than max_length
    pack(...) / unpacked_rows Row: input_ids, labels, positions, segment_ids [L <= max_length]
    batches(...)              dicts of int32 arrays [A, B, L] (A gradient-accumulation steps,
                              B rows per step, L a bucket length)

Labels follow Hugging Face: ``labels[t]`` is the token at ``t`` (not shifted) and the loss
uses ``logits[t]`` to predict ``labels[t + 1]`` (``jax_impl.train.token_loss_sum``).
``IGNORE_INDEX`` (-100) marks tokens that take no part in the loss: prompts, padding, BOS, and
the first token of every packed segment (so no loss crosses from one example into the next).

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

import bisect
import functools
import json
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import numpy as np
import numpy.typing as npt
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from tokenizers import decoders, models, pre_tokenizers, processors

from ref_numpy.layers import IGNORE_INDEX

IntArray = npt.NDArray[np.int32]
Format = Literal["chat", "tokens", "prompt_completion", "alpaca", "text"]
OnOverflow = Literal["truncate", "error"]

ROLES = ("system", "user", "assistant")
# Detection order, with each format's required and optional keys.
FORMATS: dict[Format, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "chat": (("messages",), ()),
    "tokens": (("input_ids",), ("labels",)),
    "prompt_completion": (("prompt", "completion"), ()),
    "alpaca": (("instruction", "output"), ("input",)),
    "text": (("text",), ()),
}
# The prompt an Alpaca example becomes; the ``output`` follows the last line.
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = (
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
# Our own chat template, for models that bring none: a role header on its own line, the
# content, and the eos token ending each turn, e.g. "<|user|>\nHi</s><|assistant|>\nHello</s>".
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
BUILTIN_SOURCE = "built-in chat template"


class DataError(ValueError):
    """Training data (or a tokenizer / chat template) that cannot be used; names FILE:LINE."""


# --- tokenizers -----------------------------------------------------------------------

Span = tuple[int, int]  # [start, end) character offsets into a text
# Tokenizer classes whose transformers 5 constructor rebuilds the pipeline of tokenizer.json:
# no normalizer, a Metaspace pre-tokenizer whose prefix "▁" follows ``legacy`` and
# ``add_prefix_space`` (tokenization_llama.py); the model, added tokens and post-processor stay.
LLAMA_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")
# The byte tokenizer's special tokens, ids 256, 257, 258 after the 256 bytes.
BYTE_SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>")


class Tokenizer:
    """A Hugging Face ``tokenizer.json`` configured as transformers configures it.

    ``encode(text, add_special_tokens=True)`` equals transformers' ``tokenizer(text).input_ids``
    (the post-processor adds BOS / EOS as the tokenizer's own files say); with
    ``add_special_tokens=False`` (the default) it adds nothing, but special-token strings in the
    text (such as the eos token a chat template writes) still become their ids.
    """

    def __init__(
        self,
        tok: tokenizers.Tokenizer,
        *,
        bos: tuple[int | None, str | None] = (None, None),
        eos: tuple[int | None, str | None] = (None, None),
        pad: tuple[int | None, str | None] = (None, None),
        source: str = "tokenizer.json",
    ) -> None:
        self.tok = tok
        self.source = source
        self.vocab_size: int = tok.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.bos_token = bos
        self.eos_id, self.eos_token = eos
        self.pad_id = pad[0]
        # Whether the post-processor starts every text with BOS (Llama's do, GPT-2's do not).
        ids, spans = self.encode_offsets("a", add_special_tokens=True)
        self.adds_bos: bool = bos[0] is not None and ids[:1] == [bos[0]] and spans[:1] == [None]

    def encode_offsets(
        self, text: str, *, add_special_tokens: bool = False
    ) -> tuple[list[int], list[Span | None]]:
        """``(ids, spans)``: each token's characters ``text[start:end]``, or None for a token
        the post-processor added (BOS, EOS), which stands for no character of the text."""
        try:
            enc = self.tok.encode(text, add_special_tokens=add_special_tokens)
        except Exception as e:  # the tokenizers library raises TypeError / plain Exceptions
            raise DataError(f"{self.source}: cannot encode {text[:40]!r}... ({e})") from None
        spans: list[Span | None] = [
            (int(o[0]), int(o[1])) if s is not None else None
            for o, s in zip(enc.offsets, enc.sequence_ids, strict=True)
        ]
        return list(enc.ids), spans

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        return self.encode_offsets(text, add_special_tokens=add_special_tokens)[0]

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tok.decode([int(i) for i in ids], skip_special_tokens=False))


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


def _special(
    tok: tokenizers.Tokenizer,
    name: str,
    model_dir: Path,
    sources: list[tuple[Path, dict[str, Any]]],
) -> tuple[int | None, str | None]:
    """``(id, string)`` of the special token ``name`` (bos / eos / pad).

    The first of tokenizer_config.json / special_tokens_map.json that has ``{name}_token``
    decides (null there means "none"); otherwise config.json's ``{name}_token_id`` (the first
    entry when it is a list).
    """
    key = f"{name}_token"
    for path, obj in sources:
        if key not in obj:
            continue
        value = obj[key]
        if isinstance(value, dict):
            value = value.get("content")
        if value is None:
            return None, None
        if not isinstance(value, str):
            raise DataError(f"{path}: field {key!r} must be a string or {{'content': str}}")
        tid = tok.token_to_id(value)
        if tid is None:
            raise DataError(f"{path}: {key} {value!r} is not in the vocabulary of tokenizer.json")
        return int(tid), value
    cfg_path = model_dir / "config.json"
    cfg = _read_json_object(cfg_path) or {}
    value = cfg.get(f"{key}_id")
    size = tok.get_vocab_size(with_added_tokens=True)
    for tid in value if isinstance(value, list) else [value]:  # Llama-3 lists several eos
        if tid is None:
            continue
        if isinstance(tid, bool) or not isinstance(tid, int):
            raise DataError(
                f"{cfg_path}: field '{key}_id' must be an int or a list of ints, got {value!r}"
            )
        if 0 <= tid < size:
            return tid, tok.id_to_token(tid)
        # transformers loads such configs (GPT2Config keeps 50256 with any vocab_size)
        warnings.warn(
            f"{cfg_path}: field '{key}_id' = {tid} is outside the vocabulary [0, {size}) of "
            "tokenizer.json; treated as absent",
            stacklevel=2,
        )
    return None, None


def _configure_as_transformers(
    tok: tokenizers.Tokenizer, config: dict[str, Any]
) -> tokenizers.Tokenizer:
    """``tok`` with the pipeline transformers 5 runs for these tokenizer files.

    ``tokenizer_class`` Llama (Llama-2, Mistral, TinyLlama): the BPE model rebuilt as
      transformers rebuilds it (byte fallback, no unknown token), no normalizer and a Metaspace
      pre-tokenizer that prepends "▁" to the first piece of the text only (``legacy: false``,
    transformers' default) or to every piece between special tokens (``legacy: true``), or
    never (``add_prefix_space: false``).

    The post-processor of tokenizer.json alone decides which BOS / EOS a text gets (none when
    it has none): transformers 5 drops ``add_bos_token`` / ``add_eos_token`` of
    tokenizer_config.json whenever tokenizer.json exists.
    """
    if config.get("tokenizer_class") in LLAMA_CLASSES:
        spec = json.loads(tok.to_str())
        if spec["model"].get("type") == "BPE":
            spec["model"].update(
                unk_token=None, fuse_unk=True, byte_fallback=True, dropout=None, ignore_merges=False
            )
            spec["model"].update(continuing_subword_prefix=None, end_of_word_suffix=None)
            tok = tokenizers.Tokenizer.from_str(json.dumps(spec))
        add_prefix_space = config.get("add_prefix_space")
        add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
        scheme = (
            ("always" if config.get("legacy", False) else "first") if add_prefix_space else "never"
        )
        tok.normalizer = None
        tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme=scheme, split=False
        )
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if add_prefix_space:
            steps.append(decoders.Strip(content=" ", left=1))
        tok.decoder = decoders.Sequence(steps)
    return tok


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """The tokenizer of a model directory: its ``tokenizer.json`` as transformers runs it.

    Special tokens come from tokenizer_config.json / special_tokens_map.json (else
    config.json's ids); the pipeline and the post-processor follow
    ``_configure_as_transformers``. A directory without ``tokenizer.json`` is refused, naming
    the file (a slow-only tokenizer, ``tokenizer.model`` or ``vocab.json``, gets the command
    that writes one); data in the ``tokens`` format needs no tokenizer at all.
    """
    d = Path(model_dir)
    path = d / "tokenizer.json"
    if not path.is_file():
        for other in ("tokenizer.model", "vocab.json"):
            if (d / other).is_file():
                raise DataError(
                    f"{path}: missing; {d / other} is a tokenizer without tokenizer.json, "
                    "write one with transformers "
                    "(AutoTokenizer.from_pretrained(dir).save_pretrained(dir))"
                )
        raise DataError(
            f"{path}: missing; text data needs the model's tokenizer (copy tokenizer.json and "
            "tokenizer_config.json into the model directory), or give token ids (input_ids)"
        )
    try:
        tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises plain Exceptions
        raise DataError(f"{path}: cannot be read by the tokenizers library ({e})") from None
    config_path = d / "tokenizer_config.json"
    config = _read_json_object(config_path) or {}
    sources = [(config_path, config)] if config_path.is_file() else []
    if (smap := _read_json_object(d / "special_tokens_map.json")) is not None:
        sources.append((d / "special_tokens_map.json", smap))
    bos, eos, pad = (_special(tok, name, d, sources) for name in ("bos", "eos", "pad"))
    tok = _configure_as_transformers(tok, config)
    return Tokenizer(tok, bos=bos, eos=eos, pad=pad, source=str(path))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for every byte (the ByteLevel alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    out, extra = {}, 0
    for byte in range(256):
        if byte in keep:
            out[byte] = chr(byte)
        else:
            out[byte] = chr(256 + extra)
            extra += 1
    return out


def save_byte_tokenizer(model_dir: str | Path) -> None:
    """Write a byte tokenizer into a model directory (``tokenizer.json`` and
    ``tokenizer_config.json``, which transformers loads too).

    Ids 0-255 are the UTF-8 bytes of the text, then ``<|bos|>`` 256, ``<|eos|>`` 257,
    ``<|pad|>`` 258; the post-processor starts every text with BOS. For small models made for
    it (a vocabulary of at least 259 ids): any text encodes, and decodes back unchanged.
    """
    d = Path(model_dir)
    vocab = {ch: byte for byte, ch in _bytes_to_unicode().items()}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(BYTE_SPECIALS))
    bos = BYTE_SPECIALS[0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, 256)]
    )
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BYTE_SPECIALS[0],
        "eos_token": BYTE_SPECIALS[1],
        "pad_token": BYTE_SPECIALS[2],
    }
    (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


# --- chat templates -------------------------------------------------------------------


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template and where it came from (named in every error it causes)."""

    text: str
    source: str


def load_chat_template(model_dir: str | Path) -> ChatTemplate:
    """The chat template of a model directory.

    In the order transformers uses: ``chat_template.jinja``; tokenizer_config.json's
    ``chat_template`` (a string, or a list of ``{name, template}`` of which "default" is
    taken); else ``DEFAULT_CHAT_TEMPLATE``.
    """
    d = Path(model_dir)
    jinja_file = d / "chat_template.jinja"
    if jinja_file.is_file():
        return ChatTemplate(jinja_file.read_text(encoding="utf-8"), str(jinja_file))
    cfg_path = d / "tokenizer_config.json"
    cfg = _read_json_object(cfg_path) or {}
    value = cfg.get("chat_template")
    where = f"{cfg_path} (chat_template)"
    if value is None:
        return ChatTemplate(DEFAULT_CHAT_TEMPLATE, BUILTIN_SOURCE)
    if isinstance(value, str):
        return ChatTemplate(value, where)
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        text = named.get("default")
        if not isinstance(text, str):
            raise DataError(f"{where}: no template named 'default' among {sorted(map(str, named))}")
        return ChatTemplate(text, f"{where}[default]")
    raise DataError(f"{where}: must be a string or a list of {{name, template}}")


def chat_template(model_dir: str | Path) -> str:
    """The text of ``load_chat_template(model_dir)``."""
    return load_chat_template(model_dir).text


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, stricter in one way: touching an unsafe attribute (``__class__``,
    ``list.append``) raises at once instead of yielding an undefined value that prints as ""."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object")


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask tag), rendered as
    its body, so templates that use it parse."""

    tags = {"generation"}  # noqa: RUF012  (jinja2's own class attribute)

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_body")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return str(caller())


class _Namespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore attributes (as transformers does)."""

    def __setitem__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            raise SecurityError(f"namespace attribute {name!r} starts with an underscore")
        super().__setitem__(name, value)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    """transformers' ``tojson``: no HTML escaping (Jinja's own escapes ``<``, ``&``, ...)."""
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    """The Jinja environment transformers renders chat templates in, our stricter sandbox."""
    env = _Sandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = _Namespace
    return env


@functools.lru_cache(maxsize=16)
def _compile(text: str, source: str) -> jinja2.Template:
    try:
        return _environment().from_string(text)
    except jinja2.TemplateSyntaxError as e:
        raise DataError(f"{source}: chat template syntax error at line {e.lineno}: {e}") from None


def render_chat(
    template: ChatTemplate | str,
    messages: Sequence[Mapping[str, str]],
    *,
    add_generation_prompt: bool = False,
    bos_token: str | None = None,
    eos_token: str | None = None,
) -> str:
    """Render ``messages`` with a chat template, as ``tokenizer.apply_chat_template`` would.

    A template that tries an unsafe operation (``''.__class__``, ``messages.append``) or fails
    (``raise_exception``, an undefined value) raises ``DataError`` naming the template source.
    """
    if isinstance(template, str):
        template = ChatTemplate(template, "chat template string")
    tpl = _compile(template.text, template.source)
    variables: dict[str, Any] = {
        "messages": [dict(m) for m in messages],
        "add_generation_prompt": add_generation_prompt,
    }
    if bos_token is not None:  # left undefined (renders as "") when the tokenizer has none
        variables["bos_token"] = bos_token
    if eos_token is not None:
        variables["eos_token"] = eos_token
    try:
        return tpl.render(**variables)
    except SecurityError as e:
        raise DataError(
            f"{template.source}: chat template refused, unsafe operation: {e}"
        ) from None
    except jinja2.TemplateError as e:
        raise DataError(f"{template.source}: chat template raised: {e}") from None
    except Exception as e:  # a template is code: TypeError, KeyError, ... from its expressions
        raise DataError(
            f"{template.source}: chat template failed: {type(e).__name__}: {e}"
        ) from None


# --- JSONL ----------------------------------------------------------------------------


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


# --- encoding -------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoded:
    """One tokenised example. ``input_ids``, ``labels``: int32 [T]; ``where``: FILE:LINE."""

    input_ids: IntArray
    labels: IntArray
    where: str = ""

    def __post_init__(self) -> None:
        if self.input_ids.shape != self.labels.shape or self.input_ids.ndim != 1:
            raise DataError(
                f"{self.where}: input_ids {self.input_ids.shape} and labels "
                f"{self.labels.shape} must be equal 1-D shapes"
            )

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def _chat_spans(
    messages: Sequence[Mapping[str, str]], template: ChatTemplate, tok: Tokenizer
) -> tuple[str, list[Span]]:
    """The rendered conversation and the character spans of its assistant turns.

    The span of assistant turn i is what ``render(messages[:i+1])`` adds to
    ``render(messages[:i], add_generation_prompt=True)``: the reply and the template's
    end-of-turn marker, without the role header.
    """

    def render(msgs: Sequence[Mapping[str, str]], gen: bool) -> str:
        return render_chat(
            template,
            msgs,
            add_generation_prompt=gen,
            bos_token=tok.bos_token,
            eos_token=tok.eos_token,
        )

    full = render(messages, False)
    spans: list[Span] = []
    pos = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], True)
        upto = render(messages[: i + 1], False)
        start, end = len(before), len(upto)
        if not (full.startswith(upto) and upto.startswith(before) and start >= pos):
            raise DataError(
                f"{template.source}: chat template does not render messages[{i}] as an "
                "extension of the turns before it (needed to find the assistant tokens)"
            )
        spans.append((start, end))
        pos = end
    return full, spans


def _encode_chat_text(
    text: str, template: ChatTemplate, tok: Tokenizer
) -> tuple[list[int], list[Span | None]]:
    """A rendered conversation's ids and spans, as ``apply_chat_template(tokenize=True)``: no
    special tokens added, the template writes those it wants. The built-in template writes no
    BOS, so its conversations start with BOS when the tokenizer starts every text with it."""
    ids, offsets = tok.encode_offsets(text, add_special_tokens=False)
    bos = tok.bos_id
    if template.source == BUILTIN_SOURCE and tok.adds_bos and bos is not None and ids[:1] != [bos]:
        ids, offsets = [bos, *ids], [None, *offsets]
    return ids, offsets


def chat_prompt_ids(
    messages: Sequence[Mapping[str, str]], template: ChatTemplate, tok: Tokenizer
) -> list[int]:
    """The ids of ``messages`` followed by the assistant's header, for generation: the
    conversation as training encodes it (``encode``), with ``add_generation_prompt``."""
    text = render_chat(
        template,
        messages,
        add_generation_prompt=True,
        bos_token=tok.bos_token,
        eos_token=tok.eos_token,
    )
    return _encode_chat_text(text, template, tok)[0]


def _counts(token: Span, spans: Sequence[Span]) -> bool:
    """Whether a token with characters ``token`` overlaps one of ``spans`` (transformers'
    assistant-mask rule): a token that straddles a boundary counts."""
    return any(token[0] < end and token[1] > start for start, end in spans)


def encode_example(
    ex: Mapping[str, Any],
    fmt: Format,
    tokenizer: Tokenizer | None,
    template: ChatTemplate | str | None = None,
    *,
    vocab_size: int | None = None,
    train_on_prompt: bool = False,
    add_eos: bool = True,
    where: str = "",
) -> Encoded:
    """One example as ``Encoded``; see ``encode``."""
    check_example(ex, fmt, where)
    if fmt == "tokens":
        size = vocab_size if vocab_size is not None else getattr(tokenizer, "vocab_size", None)
        if size is None:
            raise DataError(f"{where}: token ids need a vocab_size (or a tokenizer) to check them")
        ids = list(ex["input_ids"])
        labels = list(ex.get("labels", ids))
        for key, values, allowed in (("input_ids", ids, ()), ("labels", labels, (IGNORE_INDEX,))):
            bad = next((v for v in values if not 0 <= v < size and v not in allowed), None)
            if bad is not None:
                raise DataError(
                    f"{where}: field {key!r} holds {bad}, outside the vocabulary [0, {size})"
                )
        return Encoded(np.asarray(ids, np.int32), np.asarray(labels, np.int32), where)
    if tokenizer is None:
        raise DataError(f"{where}: format {fmt!r} is text and needs a tokenizer (tokenizer.json)")
    tok = tokenizer
    if fmt == "chat":
        tpl = template if template is not None else DEFAULT_CHAT_TEMPLATE
        if isinstance(tpl, str):
            tpl = ChatTemplate(
                tpl, BUILTIN_SOURCE if tpl == DEFAULT_CHAT_TEMPLATE else "chat template string"
            )
        try:
            text, spans = _chat_spans(ex["messages"], tpl, tok)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        ids, offsets = _encode_chat_text(text, tpl, tok)
    else:
        if fmt == "prompt_completion":
            prompt, answer = ex["prompt"], ex["completion"]
        elif fmt == "alpaca":
            form = ALPACA_PROMPT_WITH_INPUT if ex.get("input") else ALPACA_PROMPT
            prompt = form.format(instruction=ex["instruction"], input=ex.get("input", ""))
            answer = ex["output"]
        else:
            prompt, answer = "", ex["text"]
        text, spans = prompt + answer, [(len(prompt), len(prompt) + len(answer))]
        ids, offsets = tok.encode_offsets(text, add_special_tokens=True)
    if train_on_prompt:
        spans = [(0, len(text))]
    first = next((i for i, o in enumerate(offsets) if o is not None), len(ids))
    ends = bool(spans) and spans[-1][1] == len(text)  # tokens added after the text count too
    labels = [
        t if (_counts(o, spans) if o is not None else i > first and ends) else IGNORE_INDEX
        for i, (t, o) in enumerate(zip(ids, offsets, strict=True))
    ]
    # EOS ends a document or completion, and counts, so the model learns to stop; a chat gets
    # one only when it ends with an assistant turn whose tokens do not already hold it.
    if add_eos and tok.eos_id is not None:
        if fmt == "chat":
            last = [t for t, o in zip(ids, offsets, strict=True) if o and _counts(o, spans[-1:])]
            wanted = ex["messages"][-1]["role"] == "assistant" and tok.eos_id not in last
        else:
            wanted = ids[-1:] != [tok.eos_id]
        if wanted:
            ids.append(tok.eos_id)
            labels.append(tok.eos_id)
    if labels:  # token 0 is never a target (nothing precedes it): say so in the labels
        labels[0] = IGNORE_INDEX
    return Encoded(np.asarray(ids, np.int32), np.asarray(labels, np.int32), where)


def encode(
    examples: Sequence[Mapping[str, Any]],
    fmt: Format,
    tokenizer: Tokenizer | None,
    template: ChatTemplate | str | None = None,
    *,
    vocab_size: int | None = None,
    train_on_prompt: bool = False,
    add_eos: bool = True,
    where: Sequence[str] | None = None,
) -> list[Encoded]:
    """Tokenise examples of one format, with labels masked to ``IGNORE_INDEX`` on prompts.

    Every example becomes one string that is encoded once, so the ids are exactly the
    tokenizer's own: ``tokenizer(prompt + completion)`` in transformers for ``text``,
    ``prompt_completion`` and ``alpaca`` (with the BOS / EOS the tokenizer's post-processor
    adds, and only those), ``apply_chat_template(messages, tokenize=True)`` for ``chat``. The
    loss mask comes from character offsets: a token counts when its characters overlap the
    completion (the assistant turns of a chat), so a token that straddles the boundary, such as
    Llama's "▁4" of prompt "Answer: " and completion "4", counts.

    Args:
      examples: objects of format ``fmt`` (checked again here).
      tokenizer: needed by every format but ``tokens``.
      template: the chat template (``chat`` only); None is ``DEFAULT_CHAT_TEMPLATE``, which
        writes no BOS itself: its conversations start with BOS when the tokenizer starts every
        text with it (``Tokenizer.adds_bos``).
      vocab_size: the model's; ``tokens`` ids must lie in [0, vocab_size) (default: the
        tokenizer's vocabulary).
      train_on_prompt: count prompt tokens too (system/user turns, prompts, instructions).
      add_eos: end with EOS, counted so the model learns to stop, unless the tokens already
        end with it. A chat gets one only when its last turn is the assistant's and that
        turn's tokens do not already hold it (templates end turns with their own marker).
      where: ``FILE:LINE`` of each example (``Dataset.where``) for error messages; by default
        ``examples[i]``.
    Returns:
      One ``Encoded`` per example, ``input_ids`` and ``labels`` int32 [T]; ``labels[0]`` is
      always ``IGNORE_INDEX`` (no token precedes it), and so is every token the post-processor
      puts before the text (BOS). The ``tokens`` format is used exactly as given: no BOS/EOS,
      labels as given or equal to input_ids.
    """
    names = list(where) if where is not None else [f"examples[{i}]" for i in range(len(examples))]
    if len(names) != len(examples):
        raise DataError(f"encode: {len(names)} locations for {len(examples)} examples")
    return [
        encode_example(
            ex,
            fmt,
            tokenizer,
            template,
            vocab_size=vocab_size,
            train_on_prompt=train_on_prompt,
            add_eos=add_eos,
            where=w,
        )
        for ex, w in zip(examples, names, strict=True)
    ]


# --- length ---------------------------------------------------------------------------


def fit(
    encoded: Sequence[Encoded], max_length: int, on_overflow: OnOverflow = "truncate"
) -> tuple[list[Encoded], int]:
    """Examples cut to ``max_length`` tokens (the first ones kept); returns ``(examples,
    how many were cut)``. With ``on_overflow="error"`` the first longer example raises,
    naming its index, its FILE:LINE and its length."""
    if max_length < 1:
        raise DataError(f"max_length must be positive, got {max_length}")
    if on_overflow not in ("truncate", "error"):
        raise DataError(f"on_overflow must be 'truncate' or 'error', got {on_overflow!r}")
    out: list[Encoded] = []
    n_cut = 0
    for i, e in enumerate(encoded):
        if len(e) <= max_length:
            out.append(e)
            continue
        if on_overflow == "error":
            name = f"examples[{i}]"
            at = f"{e.where}: " if e.where and e.where != name else ""
            raise DataError(
                f"{at}{name} has {len(e)} tokens, more than max_length {max_length} "
                "(raise max_length, or use on_overflow='truncate')"
            )
        out.append(Encoded(e.input_ids[:max_length], e.labels[:max_length], e.where))
        n_cut += 1
    return out, n_cut


# --- packing --------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One training row before padding: examples side by side, all int32 [L].

    ``segment_ids`` number the examples 1, 2, 3, ... (0 is left for padding); ``positions``
    restart at 0 in each segment; ``labels`` are the examples' labels with the first token of
    every segment set to ``IGNORE_INDEX`` (the token before it belongs to another example).
    """

    input_ids: IntArray
    labels: IntArray
    positions: IntArray
    segment_ids: IntArray

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def _row(parts: Sequence[Encoded]) -> Row:
    lengths = [len(e) for e in parts]
    labels = np.concatenate([e.labels for e in parts]).astype(np.int32)  # [L]
    starts = np.cumsum([0, *lengths[:-1]])
    labels[starts] = IGNORE_INDEX  # no loss across a segment boundary
    return Row(
        input_ids=np.concatenate([e.input_ids for e in parts]).astype(np.int32),
        labels=labels,
        positions=np.concatenate([np.arange(n, dtype=np.int32) for n in lengths]),
        segment_ids=np.repeat(np.arange(1, len(parts) + 1, dtype=np.int32), lengths),
    )


def pack(encoded: Sequence[Encoded], max_length: int) -> list[Row]:
    """Pack examples into rows of at most ``max_length`` tokens (best fit, longest first).

    Each example goes, whole, into the fullest row that still has room for it, or starts a
    new row; examples of length 0 are dropped. Raises ``DataError`` for an example longer
    than ``max_length`` (``fit`` first).
    """
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    members: list[list[int]] = []
    for i in order:
        n = len(encoded[i])
        if n == 0:
            continue
        if n > max_length:
            raise DataError(
                f"{encoded[i].where or f'examples[{i}]'}: {n} tokens do not fit max_length "
                f"{max_length} (call fit first)"
            )
        k = bisect.bisect_left(free, (n, -1))  # the row with the least room that fits
        if k < len(free):
            room, r = free.pop(k)
            members[r].append(i)
        else:
            room, r = max_length, len(members)
            members.append([i])
        if room - n > 0:
            bisect.insort(free, (room - n, r))
    return [_row([encoded[i] for i in m]) for m in members]


def unpacked_rows(encoded: Sequence[Encoded]) -> list[Row]:
    """One row per example (no packing); examples of length 0 are dropped."""
    return [_row([e]) for e in encoded if len(e)]


# --- batches --------------------------------------------------------------------------


def bucket_lengths(max_length: int, smallest: int = 32) -> list[int]:
    """Row lengths batches are padded to: ``smallest``, doubling, below ``max_length``, then
    ``max_length`` itself. A bounded set, so a jitted step compiles a few shapes only."""
    if max_length < 1 or smallest < 1:
        raise DataError(f"bucket_lengths: need positive lengths, got {max_length}, {smallest}")
    out = []
    n = smallest
    while n < max_length:
        out.append(n)
        n *= 2
    return [*out, max_length]


def num_batches(n_rows: int, batch_size: int, grad_accum: int = 1) -> int:
    """Batches per epoch: every row once, the last batch padded."""
    return math.ceil(n_rows / (batch_size * grad_accum))


def epoch_order(n_rows: int, *, seed: int, epoch: int) -> npt.NDArray[np.int64]:
    """The row order of one epoch, a function of ``(seed, epoch)`` only. [n_rows]"""
    return np.random.default_rng([seed, epoch]).permutation(n_rows)


def batches(
    rows: Sequence[Row],
    batch_size: int,
    grad_accum: int,
    buckets: Sequence[int],
    *,
    seed: int,
    epoch: int,
    start: int = 0,
    pad_id: int | None = None,
) -> Iterator[dict[str, IntArray]]:
    """The batches of one epoch, in an order fixed by ``(seed, epoch)``.

    Args:
      rows: from ``pack`` or ``unpacked_rows``.
      batch_size, grad_accum: each batch holds ``grad_accum * batch_size`` rows.
      buckets: allowed row lengths (``bucket_lengths``); a batch is padded to the smallest one
        that holds its longest row.
      start: the first batch to yield (resuming mid-epoch); the same batches as skipping.
      pad_id: the id written at padding (default 0; it is masked everywhere).
    Yields:
      dicts of int32 arrays [A, B, L] (A = grad_accum, B = batch_size): ``input_ids``,
      ``labels`` (IGNORE_INDEX at padding), ``attention_mask`` (1 real, 0 padding),
      ``positions`` and ``segment_ids`` (0 at padding). The last batch of an epoch is filled
      up with fully masked rows, so every batch has the same A and B.
    """
    if batch_size < 1 or grad_accum < 1:
        raise DataError(
            f"batch_size and grad_accum must be positive, got {batch_size}, {grad_accum}"
        )
    sizes = sorted(set(buckets))
    if not sizes or sizes[0] < 1:
        raise DataError(f"buckets must be positive lengths, got {list(buckets)}")
    longest = max((len(r) for r in rows), default=0)
    if longest > sizes[-1]:
        raise DataError(f"a row of {longest} tokens is longer than the largest bucket {sizes[-1]}")
    total = num_batches(len(rows), batch_size, grad_accum)
    if not 0 <= start <= total:
        raise DataError(f"start={start} outside the {total} batches of the epoch")
    per_batch = batch_size * grad_accum
    order = epoch_order(len(rows), seed=seed, epoch=epoch)
    fill = 0 if pad_id is None else pad_id
    for b in range(start, total):
        chosen = [rows[i] for i in order[b * per_batch : (b + 1) * per_batch]]
        length = sizes[bisect.bisect_left(sizes, max(len(r) for r in chosen))]
        out = {
            "input_ids": np.full((per_batch, length), fill, np.int32),
            "labels": np.full((per_batch, length), IGNORE_INDEX, np.int32),
            "attention_mask": np.zeros((per_batch, length), np.int32),
            "positions": np.zeros((per_batch, length), np.int32),
            "segment_ids": np.zeros((per_batch, length), np.int32),
        }  # [A*B, L]
        for j, r in enumerate(chosen):
            n = len(r)
            out["input_ids"][j, :n] = r.input_ids
            out["labels"][j, :n] = r.labels
            out["attention_mask"][j, :n] = 1
            out["positions"][j, :n] = r.positions
            out["segment_ids"][j, :n] = r.segment_ids
        yield {k: v.reshape(grad_accum, batch_size, length) for k, v in out.items()}  # [A,B,L]


def encode_file(
    model_dir: str | Path,
    data: str | Path,
    vocab_size: int,
    max_length: int,
    *,
    train_on_prompt: bool = False,
    on_overflow: OnOverflow = "truncate",
) -> tuple[list[Encoded], int, Tokenizer | None, Format]:
    """A JSONL file tokenised for a model: ``(examples, n_truncated, tokenizer, format)``.

    The model directory supplies the tokenizer and chat template; examples longer than
    ``max_length`` are cut (or refused, with ``on_overflow="error"``). Token ids (the
    ``tokens`` format) need no tokenizer: they are checked against the model's ``vocab_size``,
    and the tokenizer is None when the directory has no ``tokenizer.json``.
    """
    ds = load_dataset(data)
    needs_tokenizer = ds.fmt != "tokens" or (Path(model_dir) / "tokenizer.json").is_file()
    tok = load_tokenizer(model_dir) if needs_tokenizer else None
    encoded = encode(
        ds.examples,
        ds.fmt,
        tok,
        load_chat_template(model_dir) if ds.fmt == "chat" else None,
        vocab_size=vocab_size,
        train_on_prompt=train_on_prompt,
        where=ds.where,
    )
    encoded, truncated = fit(encoded, max_length, on_overflow)
    return encoded, truncated, tok, ds.fmt
