"""Chat templates: found in a model directory as transformers finds them, and rendered in a
sandboxed Jinja environment with transformers' settings, filters and globals."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from .formats import DataError, _read_json_object

# Our own chat template, for models that bring none: a role header on its own line, the
# content, and the eos token ending each turn, e.g. "<|user|>\nHi</s><|assistant|>\nHello</s>".
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
BUILTIN_SOURCE = "built-in chat template"


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
