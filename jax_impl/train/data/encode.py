"""Encoding: examples of one format become token ids and labels (the loss mask), cut to a
maximum length; ``encode_file`` runs the whole way from a JSONL file and a model directory.

Labels follow Hugging Face: ``labels[t]`` is the token at ``t`` (not shifted) and the loss
uses ``logits[t]`` to predict ``labels[t + 1]`` (``jax_impl.train.token_loss_sum``).
``IGNORE_INDEX`` (-100) marks tokens that take no part in the loss: prompts, padding, BOS, and
the first token of every packed segment (so no loss crosses from one example into the next).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from ref_numpy.layers import IGNORE_INDEX

from .formats import DataError, Format, check_example, load_dataset
from .templates import (
    BUILTIN_SOURCE,
    DEFAULT_CHAT_TEMPLATE,
    ChatTemplate,
    load_chat_template,
    render_chat,
)
from .tokenizers import Span, Tokenizer, load_tokenizer

IntArray = npt.NDArray[np.int32]
OnOverflow = Literal["truncate", "error"]
# The prompt an Alpaca example becomes; the ``output`` follows the last line.
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = (
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


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
    template: ChatTemplate | str | None,
    *,
    vocab_size: int | None,
    train_on_prompt: bool,
    add_eos: bool,
    where: str,
) -> Encoded:
    """One example as ``Encoded``; see ``encode`` (which holds the defaults)."""
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


# --- a JSONL file for a model -----------------------------------------------------


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
