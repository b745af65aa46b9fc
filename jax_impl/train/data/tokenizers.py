"""Tokenizers: a model directory's ``tokenizer.json`` run as transformers runs it (special
tokens, the Llama pipeline, the post-processor), and the byte tokenizer for small models."""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

from .formats import DataError, _read_json_object

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
