"""Preference data: JSONL pairs of completions to one prompt, encoded as TRL's DPO encodes
them, cut to a length, and batched with each pair's two sequences in adjacent rows.

Formats of a preference file (one per file; other keys are ignored):

====================  ==================================================================
format                keys
====================  ==================================================================
``pair_tokens``       ``prompt_ids``, ``chosen_ids``, ``rejected_ids``: ints, used as given
``pair_chat``         ``chosen``, ``rejected``: message lists; ``prompt``: a message list,
                      or left out and taken as the messages the two lists share at the start
``pair_text``         ``prompt``, ``chosen``, ``rejected``: strings
====================  ==================================================================

Encoding follows TRL's ``DPOTrainer``: a text prompt is tokenized alone
(``tokenizer(prompt)``) and with each completion, to which the tokenizer's EOS is appended
unless it ends with it (``tokenizer(prompt + chosen + eos)``); a conversation renders the
prompt with the generation prompt and prompt + completion without it, through the model's chat
template (no EOS is added: the template ends the turn). A completion starts where the prompt's
ids and the pair's ids first differ, so a token that merges across the boundary belongs to
the completion. Only completion tokens count (labels ``IGNORE_INDEX`` elsewhere).

Truncation: ``max_prompt_length`` cuts the prompt first, ``max_length`` then each
prompt + completion; ``keep_end`` keeps the last tokens (of the prompt; of the sequence),
``keep_start`` the first (TRL's ``truncation_mode``). A prompt that leaves no room for a
completion token under ``keep_start`` is refused, naming its line.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ref_numpy.layers import IGNORE_INDEX

from .batches import epoch_order, num_batches
from .encode import Encoded, _encode_chat_text
from .formats import FORMATS, ROLES, DataError, _kind, _read_lines
from .templates import (
    BUILTIN_SOURCE,
    DEFAULT_CHAT_TEMPLATE,
    ChatTemplate,
    load_chat_template,
    render_chat,
)
from .tokenizers import Tokenizer, load_tokenizer

PairFormat = Literal["pair_tokens", "pair_chat", "pair_text"]
Truncation = Literal["keep_end", "keep_start"]
PAIR_KEYS: dict[PairFormat, tuple[str, ...]] = {
    "pair_tokens": ("prompt_ids", "chosen_ids", "rejected_ids"),
    "pair_chat": ("chosen", "rejected"),
    "pair_text": ("prompt", "chosen", "rejected"),
}


@dataclass(frozen=True)
class Pair:
    """One preference pair: ``prompt + chosen`` and ``prompt + rejected`` as rows whose labels
    are the completion's tokens (``IGNORE_INDEX`` on the prompt, and on token 0, which
    nothing predicts)."""

    chosen: Encoded
    rejected: Encoded
    where: str = ""


def make_pair(
    prompt: Sequence[int],
    chosen: Sequence[int],
    rejected: Sequence[int],
    max_length: int,
    *,
    max_prompt_length: int | None = None,
    mode: Truncation = "keep_end",
    where: str = "",
) -> tuple[Pair, bool]:
    """The pair's two rows, cut as the module docstring says; returns it and whether
    anything was cut. Each row is cut on its own (TRL's collator), so under ``keep_end`` the
    two may keep different amounts of the prompt."""
    prompt = list(prompt)
    cut = False
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        keep = slice(-max_prompt_length, None) if mode == "keep_end" else slice(max_prompt_length)
        prompt, cut = prompt[keep], True
    if mode == "keep_start" and len(prompt) >= max_length:
        raise DataError(
            f"{where}: the prompt has {len(prompt)} tokens, leaving no room in --max-length "
            f"{max_length} for a completion (raise --max-length, set --max-prompt-length, or "
            "use --truncation-mode keep_end)"
        )
    rows = []
    for completion in (chosen, rejected):
        ids = np.asarray([*prompt, *completion], np.int32)  # [T]
        counted = np.arange(len(ids)) >= len(prompt)  # [T] the completion's tokens
        if len(ids) > max_length:
            keep = slice(-max_length, None) if mode == "keep_end" else slice(max_length)
            ids, counted, cut = ids[keep], counted[keep], True
        labels = np.where(counted, ids, IGNORE_INDEX).astype(np.int32)  # [T]
        labels[0] = IGNORE_INDEX
        rows.append(Encoded(ids, labels, where))
    return Pair(rows[0], rows[1], where), cut


def pair_format(ex: Mapping[str, Any], where: str) -> PairFormat:
    """The preference format of one example; a ``DataError`` names what is missing, and says
    so when the example is supervised data instead."""
    if all(k in ex for k in PAIR_KEYS["pair_tokens"]):
        return "pair_tokens"
    if "chosen" in ex and "rejected" in ex:
        return "pair_chat" if isinstance(ex["chosen"], list) else "pair_text"
    for keys in PAIR_KEYS.values():
        have = [k for k in keys if k in ex]
        if len(have) >= 2 or (have and have != ["prompt"]):
            missing = [k for k in keys if k not in ex]
            needs = ", ".join(keys)
            raise DataError(f"{where}: field {missing[0]!r} is missing (a pair needs {needs})")
    sft = [name for name, (req, _) in FORMATS.items() if all(k in ex for k in req)]
    what = f"a supervised example ({sft[0]})" if sft else f"keys {sorted(ex)}"
    raise DataError(
        f"{where}: {what}, not a preference pair; --objective dpo needs prompt/chosen/"
        "rejected (text or messages) or prompt_ids/chosen_ids/rejected_ids"
    )


def _check_messages(value: Any, key: str, where: str) -> None:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {key!r} must be a non-empty array of messages")
    for i, m in enumerate(value):
        field = f"{key}[{i}]"
        if not isinstance(m, dict) or not all(
            isinstance(m.get(k), str) for k in ("role", "content")
        ):
            raise DataError(
                f"{where}: field {field!r} must be an object with string role and content"
            )
        if m["role"] not in ROLES:
            raise DataError(
                f"{where}: field '{field}.role' is {m['role']!r}; roles are {', '.join(ROLES)}"
            )


def check_pair(ex: Mapping[str, Any], fmt: PairFormat, where: str) -> None:
    """Raise ``DataError`` naming ``where`` and the field when ``ex`` is not a valid ``fmt``
    pair, an empty completion, or one whose chosen and rejected completions are the same."""
    if fmt == "pair_tokens":
        for key in PAIR_KEYS[fmt]:
            v = ex[key]
            if not isinstance(v, list) or any(
                isinstance(i, bool) or not isinstance(i, int) for i in v
            ):
                raise DataError(f"{where}: field {key!r} must be an array of integers")
            if key != "prompt_ids" and not v:
                raise DataError(f"{where}: field {key!r} is empty (a completion needs a token)")
    elif fmt == "pair_text":
        for key in PAIR_KEYS[fmt]:
            if not isinstance(ex[key], str):
                raise DataError(f"{where}: field {key!r} must be a string, got {_kind(ex[key])}")
        for key in ("chosen", "rejected"):
            if not ex[key]:
                raise DataError(f"{where}: field {key!r} is empty (a completion needs text)")
    else:
        for key in ("chosen", "rejected"):
            _check_messages(ex[key], key, where)
        if "prompt" in ex:
            _check_messages(ex["prompt"], "prompt", where)
    if (
        ex["chosen" if fmt != "pair_tokens" else "chosen_ids"]
        == ex["rejected" if fmt != "pair_tokens" else "rejected_ids"]
    ):
        raise DataError(
            f"{where}: fields 'chosen' and 'rejected' are identical (nothing to prefer)"
        )


def _split_chat(ex: Mapping[str, Any], where: str) -> tuple[list, list, list]:
    """``(prompt, chosen, rejected)`` message lists: an explicit ``prompt``, or the messages
    ``chosen`` and ``rejected`` share at the start (TRL's ``extract_prompt``)."""
    chosen, rejected = list(ex["chosen"]), list(ex["rejected"])
    if "prompt" in ex:
        prompt = list(ex["prompt"])
    else:
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    for key, msgs in (("chosen", chosen), ("rejected", rejected)):
        if not msgs:
            raise DataError(f"{where}: field {key!r} has no message after the prompt")
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: field {key!r} must end with an assistant message")
    if not prompt:
        raise DataError(f"{where}: no prompt (give 'prompt', or start chosen and rejected alike)")
    return prompt, chosen, rejected


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def encode_pair(
    ex: Mapping[str, Any],
    fmt: PairFormat,
    tokenizer: Tokenizer | None,
    template: ChatTemplate | None,
    *,
    vocab_size: int,
    where: str,
) -> tuple[list[int], list[int], list[int]]:
    """``(prompt, chosen, rejected)`` token ids of one pair, encoded as the module docstring
    says; checks it first (``check_pair``)."""
    check_pair(ex, fmt, where)
    if fmt == "pair_tokens":
        ids = [list(ex[k]) for k in PAIR_KEYS[fmt]]
        for key, values in zip(PAIR_KEYS[fmt], ids, strict=True):
            bad = next((v for v in values if not 0 <= v < vocab_size), None)
            if bad is not None:
                raise DataError(
                    f"{where}: field {key!r} holds {bad}, outside the vocabulary [0, {vocab_size})"
                )
        return ids[0], ids[1], ids[2]
    if tokenizer is None:
        raise DataError(f"{where}: format {fmt!r} is text and needs a tokenizer (tokenizer.json)")
    tok = tokenizer
    if fmt == "pair_text":
        eos = tok.eos_token
        if eos is None:
            raise DataError(f"{tok.source}: no eos token to end each completion with")
        prompt_ids = tok.encode(ex["prompt"], add_special_tokens=True)
        full = [
            tok.encode(ex["prompt"] + (c if c.endswith(eos) else c + eos), add_special_tokens=True)
            for c in (ex["chosen"], ex["rejected"])
        ]
    else:
        tpl = (
            template
            if template is not None
            else ChatTemplate(DEFAULT_CHAT_TEMPLATE, BUILTIN_SOURCE)
        )
        prompt, chosen, rejected = _split_chat(ex, where)

        def chat_ids(messages: list, gen: bool) -> list[int]:
            text = render_chat(
                tpl,
                messages,
                add_generation_prompt=gen,
                bos_token=tok.bos_token,
                eos_token=tok.eos_token,
            )
            return _encode_chat_text(text, tpl, tok)[0]

        prompt_ids = chat_ids(prompt, True)
        full = [chat_ids(prompt + chosen, False), chat_ids(prompt + rejected, False)]
    n = min(_common_prefix(prompt_ids, f) for f in full)
    completions = [f[n:] for f in full]
    for key, c in zip(("chosen", "rejected"), completions, strict=True):
        if not c:
            raise DataError(f"{where}: field {key!r} encodes to no token after the prompt")
    if completions[0] == completions[1]:
        raise DataError(f"{where}: fields 'chosen' and 'rejected' encode to the same tokens")
    return prompt_ids[:n], completions[0], completions[1]


def encode_pairs_file(
    model_dir: str | Path,
    data: str | Path,
    vocab_size: int,
    max_length: int,
    *,
    max_prompt_length: int | None = None,
    truncation_mode: Truncation = "keep_end",
) -> tuple[list[Pair], int, Tokenizer | None, PairFormat]:
    """A preference JSONL file encoded for a model: ``(pairs, n_truncated, tokenizer, format)``.

    Every line must hold a pair of the first line's format; errors name ``FILE:LINE`` and the
    field. Token ids need no tokenizer (the tokenizer is None where the directory has none).
    """
    examples, lines = _read_lines(data)
    where = [f"{data}:{n}" for n in lines]
    fmt = pair_format(examples[0], where[0])
    for ex, w in zip(examples, where, strict=True):
        this = pair_format(ex, w)
        if this != fmt:
            raise DataError(
                f"{w}: mixed formats, this line is {this!r} but line {lines[0]} is {fmt!r}"
            )
    needs = fmt != "pair_tokens" or (Path(model_dir) / "tokenizer.json").is_file()
    tok = load_tokenizer(model_dir) if needs else None
    template = load_chat_template(model_dir) if fmt == "pair_chat" else None
    pairs, n_cut = [], 0
    for ex, w in zip(examples, where, strict=True):
        ids = encode_pair(ex, fmt, tok, template, vocab_size=vocab_size, where=w)
        pair, cut = make_pair(
            *ids, max_length, max_prompt_length=max_prompt_length, mode=truncation_mode, where=w
        )
        pairs.append(pair)
        n_cut += cut
    return pairs, n_cut, tok, fmt


def pair_batches(
    pairs: Sequence[Pair],
    batch_size: int,
    grad_accum: int,
    buckets: Sequence[int],
    *,
    seed: int,
    epoch: int,
    start: int = 0,
    pad_id: int | None = None,
    part: tuple[int, int] | None = None,
    ref_logps: np.ndarray | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """The batches of one epoch of pairs, in an order fixed by ``(seed, epoch)``.

    Args:
      pairs: from ``encode_pairs_file``.
      batch_size: pairs per micro-batch (B); each micro-batch has ``2B`` rows, pair i's chosen
        sequence in row ``2i`` and its rejected one in row ``2i + 1``.
      grad_accum, buckets, start, pad_id: as ``batches``.
      part: ``(lo, hi)``: rows ``lo`` to ``hi - 1`` of each micro-batch's ``2B`` rows (one
        process's share; whole pairs, so both even).
      ref_logps: [n_pairs, 2] reference log-probabilities of each pair's (chosen, rejected),
        computed before training; they travel with the batch as ``ref_logps`` [A, 2B].
    Yields:
      dicts [A, 2B, L] of ``input_ids``, ``labels`` and ``attention_mask`` (and
      ``ref_logps``); the last batch is filled up with rows that count nothing (pairs that
      take no part).
    """
    rows2 = 2 * batch_size
    lo, hi = (0, rows2) if part is None else part
    if not 0 <= lo < hi <= rows2 or lo % 2 or hi % 2:
        raise DataError(f"part {part}: expected whole pairs, rows 0 <= lo < hi <= {rows2}")
    sizes = sorted(set(buckets))
    rows = [(p.chosen, p.rejected) for p in pairs]
    longest = max((max(len(c), len(r)) for c, r in rows), default=0)
    if longest > sizes[-1]:
        raise DataError(
            f"a sequence of {longest} tokens is longer than the largest bucket {sizes[-1]}"
        )
    total = num_batches(len(pairs), batch_size, grad_accum)
    if not 0 <= start <= total:
        raise DataError(f"start={start} outside the {total} batches of the epoch")
    per_batch = batch_size * grad_accum
    order = epoch_order(len(pairs), seed=seed, epoch=epoch)
    fill = 0 if pad_id is None else pad_id
    shape = (grad_accum, hi - lo)
    for b in range(start, total):
        chosen = order[b * per_batch : (b + 1) * per_batch]
        length = sizes[bisect.bisect_left(sizes, max(max(len(x) for x in rows[i]) for i in chosen))]
        out = {
            "input_ids": np.full((*shape, length), fill, np.int32),
            "labels": np.full((*shape, length), IGNORE_INDEX, np.int32),
            "attention_mask": np.zeros((*shape, length), np.int32),
        }  # [A,2B,L]
        if ref_logps is not None:
            out["ref_logps"] = np.zeros(shape, ref_logps.dtype)  # [A,2B]
        for a in range(grad_accum):
            micro = chosen[a * batch_size : (a + 1) * batch_size]
            for j in range(lo, hi):
                if j // 2 >= len(micro):
                    break
                i = micro[j // 2]
                seq = rows[i][j % 2]
                n = len(seq)
                out["input_ids"][a, j - lo, :n] = seq.input_ids
                out["labels"][a, j - lo, :n] = seq.labels
                out["attention_mask"][a, j - lo, :n] = 1
                if ref_logps is not None:
                    out["ref_logps"][a, j - lo] = ref_logps[i, j % 2]
        yield out
