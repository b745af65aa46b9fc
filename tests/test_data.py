"""The data pipeline: tokenizers, chat templates, JSONL formats, label masks, packing, batches.

Tokenizers are built here, offline: the byte tokenizer (``save_byte_tokenizer``), a WordLevel
``tokenizer.json`` whose ids are easy to check by hand, and a byte-level BPE trained on a few
multilingual strings.
"""

from __future__ import annotations

import functools
import itertools
import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTok
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from jax_impl.train.data import (
    DEFAULT_CHAT_TEMPLATE,
    ChatTemplate,
    DataError,
    Encoded,
    batches,
    bucket_lengths,
    chat_template,
    detect_format,
    encode,
    fit,
    load_chat_template,
    load_dataset,
    load_tokenizer,
    num_batches,
    pack,
    read_jsonl,
    render_chat,
    save_byte_tokenizer,
    unpacked_rows,
)
from jax_impl.train.data import Tokenizer as DataTokenizer

IGNORE = -100
BOS, EOS, PAD = 256, 257, 258  # the byte tokenizer's specials
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MULTILINGUAL = {
    "japanese": "こんにちは、世界！今日はいい天気ですね。",  # noqa: RUF001
    "arabic": "مرحبا بالعالم، كيف حالك؟",
    "hindi": "नमस्ते दुनिया, आप कैसे हैं?",
    "mixed": "Hello 世界 مرحبا नमस्ते Привет 123",
    "emoji": "👋🏽 family 👨‍👩‍👧‍👦 flag 🇯🇵 ✨",
}


def b(text: str) -> list[int]:
    """UTF-8 bytes of ``text``: the byte tokenizer's ids, written out for hand checks."""
    return list(text.encode("utf-8"))


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    """One line per item: dicts/lists as JSON, strings written verbatim."""
    text = "\n".join(x if isinstance(x, str) else json.dumps(x, ensure_ascii=False) for x in lines)
    path.write_text(text + "\n", encoding="utf-8")
    return path


@functools.cache
def byte_tok() -> DataTokenizer:
    """The byte tokenizer as ``load_tokenizer`` reads it from a model directory."""
    with tempfile.TemporaryDirectory() as d:
        save_byte_tokenizer(d)
        return load_tokenizer(d)


def counted(e: Encoded) -> list[int]:
    return [int(x) for x in e.labels if x != IGNORE]


# --- tokenizers built for the tests ----------------------------------------------------

WORDS = {
    "<s>": 0,
    "</s>": 1,
    "<pad>": 2,
    "<unk>": 3,
    "hello": 4,
    "world": 5,
    "<|user|>": 6,
    "<|assistant|>": 7,
    "<|system|>": 8,
    "fine": 9,
    "thanks": 10,
    "be": 11,
    "brief": 12,
    "how": 13,
    "are": 14,
    "you": 15,
}
# A template in WordLevel-friendly form: every token separated by spaces.
WORD_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|> {{ m.content }} {{ eos_token }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def wordlevel_dir(tmp_path: Path, tokenizer_config: dict[str, Any] | None = None) -> Path:
    tok = HFTok(models.WordLevel(WORDS, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>"])
    # Like Llama's: BOS/EOS added by encode(add_special_tokens=True), which we must not use.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)]
    )
    d = tmp_path / "wordlevel"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    if tokenizer_config is not None:
        (d / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return d


def bpe_tokenizer() -> HFTok:
    """A byte-level BPE (GPT-2 style) trained on a few multilingual strings."""
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = ["hello world, how are you?", "user assistant system", *MULTILINGUAL.values()]
    tok.train_from_iterator(corpus * 4, trainer)
    return tok


def bpe_dir(tmp_path: Path, **config: Any) -> Path:
    d = tmp_path / "bpe"
    d.mkdir()
    bpe_tokenizer().save(str(d / "tokenizer.json"))
    cfg = {"bos_token": {"content": "<s>", "special": True}, "eos_token": "<|im_end|>", **config}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


# --- byte tokenizer ---------------------------------------------------------------------


def test_byte_tokenizer_ids(tmp_path):
    tok = byte_tok()
    assert tok.encode("A<|eos|>é") == [65, EOS, 0xC3, 0xA9]
    assert tok.encode("<|bos|><|pad|>") == [BOS, PAD]
    assert tok.encode("ab", add_special_tokens=True) == [BOS, 97, 98]  # BOS starts every text
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (BOS, EOS, PAD, 259)
    assert tok.adds_bos
    assert tok.decode([72, 105, EOS]) == "Hi<|eos|>"
    save_byte_tokenizer(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["eos_token"] == "<|eos|>"


@given(st.text())
@settings(max_examples=200, deadline=None)
def test_byte_tokenizer_round_trips_any_text(text):
    tok = byte_tok()
    ids = tok.encode(text)
    assert ids == b(text) or any(s in text for s in ("<|bos|>", "<|eos|>", "<|pad|>"))
    assert tok.decode(ids) == text


@pytest.mark.parametrize("name", sorted(MULTILINGUAL))
def test_byte_tokenizer_round_trips_multilingual(name):
    tok = byte_tok()
    text = MULTILINGUAL[name]
    assert tok.encode(text) == b(text)
    assert tok.decode(tok.encode(text)) == text


def test_a_lone_surrogate_is_a_data_error():
    text = json.loads('"a\\ud800b"')  # legal JSON, not encodable as UTF-8
    with pytest.raises(DataError, match=r"tokenizer\.json: cannot encode 'a\\ud800b'"):
        byte_tok().encode(text)


# --- load_tokenizer ---------------------------------------------------------------------


def test_load_tokenizer_without_tokenizer_json_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 320}))
    with pytest.raises(DataError, match=r"tokenizer\.json: missing.*input_ids"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(DataError, match=r"tokenizer\.json: missing; .*tokenizer\.model.*save_pre"):
        load_tokenizer(tmp_path)


def test_load_tokenizer_specials_from_tokenizer_config(tmp_path):
    d = wordlevel_dir(
        tmp_path,
        {
            "bos_token": {"content": "<s>", "lstrip": False},
            "eos_token": "</s>",
            "pad_token": "<pad>",
        },
    )
    tok = load_tokenizer(d)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
    assert tok.vocab_size == len(WORDS)
    assert tok.encode("hello world </s>") == [4, 5, 1]  # no specials added, specials parsed


def test_load_tokenizer_specials_from_config_json(tmp_path):
    d = wordlevel_dir(tmp_path)
    (d / "config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [1, 7]}))
    tok = load_tokenizer(d)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, None)
    assert tok.eos_token == "</s>"


def test_tokenizer_config_null_bos_wins_over_config_json(tmp_path):
    d = wordlevel_dir(tmp_path, {"bos_token": None, "eos_token": "</s>"})
    (d / "config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 4}))
    tok = load_tokenizer(d)
    assert (tok.bos_id, tok.eos_id) == (None, 1)
    # tokenizer.json's post-processor ("<s> $A </s>") still decides, as in transformers
    assert encode([{"text": "hello"}], "text", tok)[0].input_ids.tolist() == [0, 4, 1]


def test_load_tokenizer_unknown_special_is_an_error(tmp_path):
    d = wordlevel_dir(tmp_path, {"eos_token": "<eot>"})
    with pytest.raises(DataError, match=r"tokenizer_config\.json: eos_token '<eot>'"):
        load_tokenizer(d)


@pytest.fixture(scope="module")
def shared_bpe(tmp_path_factory):
    return load_tokenizer(bpe_dir(tmp_path_factory.mktemp("shared")))


@given(text=st.text(max_size=40))
@settings(max_examples=60, deadline=None)
def test_byte_level_bpe_round_trips(shared_bpe, text):
    ids = shared_bpe.encode(text)
    assert shared_bpe.decode(ids) == text


# --- chat templates ---------------------------------------------------------------------


CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello world"},
    {"role": "assistant", "content": "fine thanks"},
    {"role": "user", "content": "how are you"},
    {"role": "assistant", "content": "fine"},
]


def test_builtin_template_renders_our_format():
    text = render_chat(DEFAULT_CHAT_TEMPLATE, CONVERSATION[:3], eos_token="</s>")
    assert text == "<|system|>\nbe brief</s><|user|>\nhello world</s><|assistant|>\nfine thanks</s>"
    prompt = render_chat(
        DEFAULT_CHAT_TEMPLATE, CONVERSATION[:2], add_generation_prompt=True, eos_token="</s>"
    )
    assert prompt == "<|system|>\nbe brief</s><|user|>\nhello world</s><|assistant|>\n"


def test_chat_template_sources(tmp_path):
    (tmp_path / "a").mkdir()
    assert load_chat_template(tmp_path / "a").text == DEFAULT_CHAT_TEMPLATE
    assert load_chat_template(tmp_path / "a").source == "built-in chat template"

    d = wordlevel_dir(tmp_path, {"chat_template": WORD_TEMPLATE})
    assert chat_template(d) == WORD_TEMPLATE
    assert "tokenizer_config.json" in load_chat_template(d).source

    listed = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": CHATML}]
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": listed}))
    assert chat_template(d) == CHATML

    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": listed[:1]}))
    with pytest.raises(DataError, match=r"no template named 'default' among \['tool_use'\]"):
        chat_template(d)

    (d / "chat_template.jinja").write_text("{{ 'jinja file' }}")  # wins, as in transformers
    assert chat_template(d) == "{{ 'jinja file' }}"
    assert load_chat_template(d).source.endswith("chat_template.jinja")


@pytest.mark.parametrize(
    "evil",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__ }}",
        "{{ messages.append(1) }}",
        "{{ cycler.__init__.__globals__ }}",
        "{% set ns = namespace() %}{% set ns.__dict__ = 1 %}",
    ],
)
def test_sandbox_refuses_unsafe_templates(tmp_path, evil):
    d = wordlevel_dir(tmp_path, {"chat_template": evil})
    tpl = load_chat_template(d)
    with pytest.raises(DataError, match=r"tokenizer_config\.json \(chat_template\).*unsafe"):
        render_chat(tpl, CONVERSATION)


def test_template_errors_name_the_data_line_and_the_template(tmp_path):
    refuse = (
        "{% if messages[0].role == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    )
    d = wordlevel_dir(tmp_path, {"chat_template": refuse, "eos_token": "</s>"})
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": CONVERSATION[1:3]}, {"messages": CONVERSATION}],
    )
    ds = load_dataset(path)
    with pytest.raises(DataError, match=r"chat\.jsonl:2: .*tokenizer_config.*no system role"):
        encode(ds.examples, ds.fmt, load_tokenizer(d), load_chat_template(d), where=ds.where)


def test_template_syntax_error_names_the_source():
    with pytest.raises(DataError, match=r"my-template: chat template syntax error at line 1"):
        render_chat(ChatTemplate("{% for %}", "my-template"), CONVERSATION)


def test_template_extras_transformers_provides():
    tpl = (
        "{% generation %}{{ messages[0] | tojson }}{% endgeneration %}"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{{ m.role }}{% endfor %}"
        "{{ bos_token }}|{{ strftime_now('%Y')|length }}"
    )
    out = render_chat(tpl, [{"role": "user", "content": "é"}], bos_token="<s>")
    assert out == '{"role": "user", "content": "é"}user<s>|4'


# --- formats ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("example", "fmt"),
    [
        ({"text": "hi"}, "text"),
        ({"prompt": "a", "completion": "b"}, "prompt_completion"),
        ({"instruction": "a", "output": "b"}, "alpaca"),
        ({"instruction": "a", "input": "c", "output": "b", "text": "x"}, "alpaca"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "chat"),
        ({"input_ids": [1, 2]}, "tokens"),
        ({"input_ids": [1, 2], "labels": [-100, 2], "id": 7}, "tokens"),
    ],
)
def test_formats_are_detected(tmp_path, example, fmt):
    path = write_jsonl(tmp_path / "d.jsonl", ["", example, "   ", example])
    ds = load_dataset(path)
    assert ds.fmt == fmt
    assert ds.lines == [2, 4]  # blank lines skipped, numbering kept
    assert read_jsonl(path) == [example, example]


def test_jsonl_keeps_line_separators_inside_strings(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a\u2028b\u0085c\rd"}, {"text": "e"}])
    assert read_jsonl(path)[0]["text"] == "a\u2028b\u0085c\rd"
    assert load_dataset(path).lines == [1, 2]


# --- encoding, hand-checked --------------------------------------------------------------


def test_encode_text():
    (e,) = encode([{"text": "ab"}], "text", byte_tok())
    assert e.input_ids.tolist() == [BOS, 97, 98, EOS]
    assert e.labels.tolist() == [IGNORE, 97, 98, EOS]
    assert e.input_ids.dtype == np.int32 and e.labels.dtype == np.int32
    (e,) = encode([{"text": "ab"}], "text", byte_tok(), add_eos=False)
    assert e.input_ids.tolist() == [BOS, 97, 98]
    (e,) = encode([{"text": "<|bos|>ab<|eos|>"}], "text", byte_tok())
    assert e.input_ids.tolist() == [BOS, BOS, 97, 98, EOS]  # as tokenizer(text); EOS not doubled
    assert e.labels.tolist() == [IGNORE, BOS, 97, 98, EOS]


def test_encode_text_needs_a_tokenizer_tokens_do_not():
    with pytest.raises(DataError, match=r"examples\[0\]: format 'text' .*tokenizer\.json"):
        encode([{"text": "ab"}], "text", None)
    (e,) = encode([{"input_ids": [3, 210]}], "tokens", None, vocab_size=211)
    assert e.input_ids.tolist() == [3, 210]
    with pytest.raises(DataError, match=r"holds 211, outside the vocabulary \[0, 211\)"):
        encode([{"input_ids": [3, 211]}], "tokens", None, vocab_size=211)


def test_encode_prompt_completion():
    ex = [{"prompt": "ab", "completion": "cd"}]
    (e,) = encode(ex, "prompt_completion", byte_tok())
    assert e.input_ids.tolist() == [BOS, 97, 98, 99, 100, EOS]
    assert e.labels.tolist() == [IGNORE, IGNORE, IGNORE, 99, 100, EOS]
    (e,) = encode(ex, "prompt_completion", byte_tok(), train_on_prompt=True)
    assert e.labels.tolist() == [IGNORE, 97, 98, 99, 100, EOS]


def test_encode_alpaca():
    tok = byte_tok()
    ex = [
        {"instruction": "Add", "input": "1 2", "output": "3"},
        {"instruction": "Say hi", "input": "", "output": "hi"},
    ]
    e1, e2 = encode(ex, "alpaca", tok)
    prompt1 = "### Instruction:\nAdd\n\n### Input:\n1 2\n\n### Response:\n"
    assert e1.input_ids.tolist() == [BOS, *b(prompt1), *b("3"), EOS]
    assert e1.labels.tolist() == [IGNORE] * (1 + len(b(prompt1))) + [*b("3"), EOS]
    prompt2 = "### Instruction:\nSay hi\n\n### Response:\n"  # no Input section when empty
    assert e2.input_ids.tolist() == [BOS, *b(prompt2), *b("hi"), EOS]
    assert counted(e2) == [*b("hi"), EOS]


def test_encode_pretokenized_exactly_as_given():
    ex = [{"input_ids": [5, 6, 7]}, {"input_ids": [5, 6, 7], "labels": [-100, 6, -100]}]
    e1, e2 = encode(ex, "tokens", byte_tok())
    assert e1.input_ids.tolist() == [5, 6, 7] and e1.labels.tolist() == [5, 6, 7]
    assert e2.input_ids.tolist() == [5, 6, 7] and e2.labels.tolist() == [-100, 6, -100]


def test_encode_pretokenized_checks_the_vocabulary(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"input_ids": [1]}, {"input_ids": [1, 259]}])
    ds = load_dataset(path)
    with pytest.raises(DataError, match=r"t\.jsonl:2: field 'input_ids' holds 259"):
        encode(ds.examples, ds.fmt, byte_tok(), where=ds.where)


def test_encode_with_a_tokenizer_json(tmp_path):
    tok = load_tokenizer(wordlevel_dir(tmp_path, {"bos_token": "<s>", "eos_token": "</s>"}))
    (e,) = encode([{"text": "hello world"}], "text", tok)
    assert e.input_ids.tolist() == [0, 4, 5, 1]
    assert e.labels.tolist() == [IGNORE, 4, 5, 1]
    (e,) = encode([{"prompt": "how are you ", "completion": "fine"}], "prompt_completion", tok)
    assert e.input_ids.tolist() == [0, 13, 14, 15, 9, 1]
    assert e.labels.tolist() == [IGNORE, IGNORE, IGNORE, IGNORE, 9, 1]


# --- chat masking -----------------------------------------------------------------------


def test_chat_masking_with_tokenizer_config_template(tmp_path):
    cfg = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": WORD_TEMPLATE}
    d = wordlevel_dir(tmp_path, cfg)
    (e,) = encode([{"messages": CONVERSATION}], "chat", load_tokenizer(d), load_chat_template(d))
    S, U, A, E = 8, 6, 7, 1  # <|system|> <|user|> <|assistant|> </s>
    assert e.input_ids.tolist() == [  # as apply_chat_template: no BOS the template does not write
        *(S, 11, 12, E),  # system: be brief
        *(U, 4, 5, E),  # user: hello world
        *(A, 9, 10, E),  # assistant: fine thanks
        *(U, 13, 14, 15, E),  # user: how are you
        *(A, 9, E),  # assistant: fine
    ]
    assert e.labels.tolist() == [
        *[IGNORE] * 4,
        *[IGNORE] * 4,
        *(IGNORE, 9, 10, E),  # the role header is prompt, the reply and its end count
        *[IGNORE] * 5,
        *(IGNORE, 9, E),
    ]


def test_chat_masking_builtin_template_multi_turn():
    tok = byte_tok()
    (e,) = encode([{"messages": CONVERSATION}], "chat", tok)  # no template: the built-in one
    full = render_chat(DEFAULT_CHAT_TEMPLATE, CONVERSATION, eos_token="<|eos|>")
    assert e.input_ids.tolist() == [BOS, *tok.encode(full)]
    assert tok.decode(counted(e)) == "fine thanks<|eos|>fine<|eos|>"
    prompt1 = "<|system|>\nbe brief<|eos|><|user|>\nhello world<|eos|><|assistant|>\n"
    prompt2 = "<|user|>\nhow are you<|eos|><|assistant|>\n"
    assert full == prompt1 + "fine thanks<|eos|>" + prompt2 + "fine<|eos|>"
    assert e.labels.tolist() == [
        IGNORE,
        *[IGNORE] * len(tok.encode(prompt1)),
        *b("fine thanks"),
        EOS,
        *[IGNORE] * len(tok.encode(prompt2)),
        *b("fine"),
        EOS,
    ]
    (t,) = encode([{"messages": CONVERSATION}], "chat", tok, train_on_prompt=True)
    assert counted(t) == e.input_ids.tolist()[1:]


def test_chat_eos_added_only_after_a_final_assistant_turn():
    tpl = (  # no end-of-turn marker
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    tok = byte_tok()
    (e,) = encode([{"messages": CONVERSATION[1:3]}], "chat", tok, tpl)
    assert e.input_ids.tolist()[-1] == EOS and e.labels.tolist()[-1] == EOS
    (e,) = encode([{"messages": CONVERSATION[1:4]}], "chat", tok, tpl)  # ends with the user
    assert e.input_ids.tolist()[-1] != EOS
    assert tok.decode(counted(e)) == "fine thanks"


@pytest.mark.parametrize("name", sorted(MULTILINGUAL))
def test_multilingual_chat_byte_fallback(name):
    tok = byte_tok()
    text = MULTILINGUAL[name]
    msgs = [
        {"role": "system", "content": "Reply in the user's language."},
        {"role": "user", "content": text},
        {"role": "assistant", "content": text[::-1]},
        {"role": "user", "content": text + " ?"},
        {"role": "assistant", "content": "✓ " + text},
    ]
    (e,) = encode([{"messages": msgs}], "chat", tok)
    assert tok.decode(counted(e)) == text[::-1] + "<|eos|>" + "✓ " + text + "<|eos|>"
    full = render_chat(DEFAULT_CHAT_TEMPLATE, msgs, eos_token="<|eos|>")
    assert tok.decode(e.input_ids.tolist()) == "<|bos|>" + full
    assert tok.decode(tok.encode(full)) == full


@pytest.mark.parametrize("name", sorted(MULTILINGUAL))
def test_multilingual_chat_byte_level_bpe(tmp_path, name):
    d = bpe_dir(tmp_path, chat_template=CHATML)
    tok, tpl = load_tokenizer(d), load_chat_template(d)
    text = MULTILINGUAL[name]
    msgs = [{"role": "user", "content": text}, {"role": "assistant", "content": text + "!"}]
    (e,) = encode([{"messages": msgs}], "chat", tok, tpl)
    full = render_chat(tpl, msgs, bos_token="<s>", eos_token="<|im_end|>")
    # the whole rendering, encoded once; this tokenizer adds no BOS
    assert e.input_ids.tolist() == tok.encode(full) and not tok.adds_bos
    assert tok.decode(counted(e)) == text + "!<|im_end|>\n"
    assert tok.decode(tok.encode(text)) == text


def test_chat_template_that_is_not_incremental_is_refused():
    tpl = "{{ messages | length }}{% for m in messages %}{{ m.content }}{% endfor %}"
    with pytest.raises(DataError, match=r"examples\[0\]: .*messages\[2\].*extension"):
        encode([{"messages": CONVERSATION[:3]}], "chat", byte_tok(), tpl)


@pytest.mark.interop
def test_chat_matches_transformers_apply_chat_template(tmp_path):
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe_tokenizer(),
        bos_token="<s>",
        eos_token="<|im_end|>",
        chat_template=CHATML,
    )
    d = tmp_path / "saved"
    fast.save_pretrained(
        str(d)
    )  # writes tokenizer.json, tokenizer_config.json, chat_template.jinja
    tok, tpl = load_tokenizer(d), load_chat_template(d)
    msgs = [*CONVERSATION, {"role": "user", "content": MULTILINGUAL["mixed"]}]
    for gen in (False, True):
        ours = render_chat(
            tpl, msgs, add_generation_prompt=gen, bos_token="<s>", eos_token="<|im_end|>"
        )
        assert ours == fast.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    (e,) = encode([{"messages": CONVERSATION}], "chat", tok, tpl)
    theirs = fast.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    assert e.input_ids.tolist() == list(theirs)


# --- errors that name FILE:LINE ------------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "pattern"),
    [
        (['{"text": "a"}', '{"text": "b"}', '{"text": "c"'], r"d\.jsonl:3: not valid JSON"),
        (['{"text": "a"}', "[1, 2]"], r"d\.jsonl:2: expected a JSON object, got array"),
        (
            [{"text": "a"}, {"foo": 1, "bar": 2}],
            r"d\.jsonl:2: unknown format, keys \['bar', 'foo'\]; accepted: messages; .*text",
        ),
        ([{"prompt": "a"}], r"d\.jsonl:1: unknown format.*has prompt but not completion"),
        (
            [{"text": "a"}, {"text": "b"}, "", {"messages": [{"role": "user", "content": "x"}]}],
            r"d\.jsonl:4: mixed formats, this line is 'chat' but line 1 is 'text'",
        ),
        (
            [{"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}]}],
            r"d\.jsonl:1: field 'messages\[1\]\.role' is 'tool'; roles are system, user, assistant",
        ),
        ([{"messages": [{"role": "user", "content": "x"}]}], r"d\.jsonl:1: .*no assistant turn"),
        (
            [{"messages": [{"role": "assistant", "content": None}]}],
            r"d\.jsonl:1: field 'messages\[0\]\.content' must be a string, got null",
        ),
        ([{"text": "a"}, {"text": 5}], r"d\.jsonl:2: field 'text' must be a string, got int"),
        (
            [{"instruction": "a", "output": ["b"]}],
            r"d\.jsonl:1: field 'output' must be a string, got array",
        ),
        (
            [{"input_ids": [1, 2, 3], "labels": [1, 2]}],
            r"d\.jsonl:1: field 'labels' has 2 entries but 'input_ids' has 3",
        ),
        ([{"input_ids": [1, "2"]}], r"d\.jsonl:1: field 'input_ids'\[1\] must be an integer"),
        ([{"input_ids": [1, True]}], r"d\.jsonl:1: field 'input_ids'\[1\] must be an integer"),
        ([{"input_ids": []}], r"d\.jsonl:1: field 'input_ids' must be a non-empty array"),
        (["", "  "], r"d\.jsonl: empty file"),
    ],
)
def test_bad_data_names_file_and_line(tmp_path, lines, pattern):
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    with pytest.raises(DataError, match=pattern):
        load_dataset(path)


def test_empty_and_invalid_utf8_files(tmp_path):
    (tmp_path / "e.jsonl").write_bytes(b"")
    with pytest.raises(DataError, match=r"e\.jsonl: empty file"):
        read_jsonl(tmp_path / "e.jsonl")
    (tmp_path / "u.jsonl").write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"u\.jsonl:2: not valid UTF-8"):
        read_jsonl(tmp_path / "u.jsonl")
    with pytest.raises(DataError, match=r"missing\.jsonl: cannot read"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_detect_format_without_a_file():
    with pytest.raises(DataError, match=r"<examples>:2: mixed formats"):
        detect_format([{"text": "a"}, {"prompt": "a", "completion": "b"}])


# --- fit --------------------------------------------------------------------------------


def test_fit_truncates_or_refuses(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "ab"}, "", {"text": "abcdefgh"}])
    ds = load_dataset(path)
    enc = encode(ds.examples, ds.fmt, byte_tok(), where=ds.where)  # lengths 4, 10
    out, n_cut = fit(enc, 6)
    assert n_cut == 1
    assert [len(e) for e in out] == [4, 6]
    assert out[1].input_ids.tolist() == [BOS, *b("abcde")]
    assert out[1].labels.tolist() == [IGNORE, *b("abcde")]
    assert fit(enc, 10)[1] == 0
    with pytest.raises(
        DataError, match=r"d\.jsonl:3: examples\[1\] has 10 tokens, more than max_length 6"
    ):
        fit(enc, 6, on_overflow="error")


# --- packing ----------------------------------------------------------------------------


def make_examples(lengths: list[int]) -> list[Encoded]:
    """Example i holds ids 1000*i + t, so every token says where it came from."""
    out = []
    for i, n in enumerate(lengths):
        ids = np.arange(n, dtype=np.int32) + 1000 * i
        labels = ids.copy()
        labels[: n // 3] = IGNORE  # a prompt
        out.append(Encoded(ids, labels, f"f:{i + 1}"))
    return out


def test_pack_by_hand():
    rows = pack(make_examples([5, 3, 2, 4, 1]), 5)
    assert [r.input_ids.tolist() for r in rows] == [
        [0, 1, 2, 3, 4],
        [3000, 3001, 3002, 3003, 4000],
        [1000, 1001, 1002, 2000, 2001],
    ]
    assert rows[1].segment_ids.tolist() == [1, 1, 1, 1, 2]
    assert rows[2].segment_ids.tolist() == [1, 1, 1, 2, 2]
    assert rows[2].positions.tolist() == [0, 1, 2, 0, 1]
    assert rows[2].labels.tolist() == [IGNORE, 1001, 1002, IGNORE, 2001]


@given(
    st.lists(st.integers(1, 40), min_size=1, max_size=30),
    st.integers(40, 100),
)
@settings(max_examples=100, deadline=None)
def test_pack_loses_nothing_and_keeps_segments_apart(lengths, max_length):
    enc = make_examples(lengths)
    rows = pack(enc, max_length)
    assert sum(len(r) for r in rows) == sum(lengths)
    assert len(rows) <= 2 * -(-sum(lengths) // max_length)  # reasonably full rows
    seen: Counter[int] = Counter()
    for r in rows:
        assert 0 < len(r) <= max_length
        segs = r.segment_ids.tolist()
        assert segs[0] == 1 and all(y - x in (0, 1) for x, y in itertools.pairwise(segs))
        for s in range(1, max(segs) + 1):
            at = np.flatnonzero(r.segment_ids == s)
            i = int(r.input_ids[at[0]]) // 1000
            assert r.input_ids[at].tolist() == enc[i].input_ids.tolist()  # whole and in order
            assert r.positions[at].tolist() == list(range(len(at)))  # restart at 0
            assert r.labels[at[0]] == IGNORE  # no loss across the boundary
            assert r.labels[at[1:]].tolist() == enc[i].labels[1:].tolist()
            seen[i] += 1
    assert seen == Counter(range(len(lengths)))  # every example exactly once


def test_pack_refuses_overlong_and_drops_empty():
    with pytest.raises(DataError, match=r"f:2: 9 tokens do not fit max_length 8"):
        pack(make_examples([3, 9]), 8)
    empty = Encoded(np.zeros(0, np.int32), np.zeros(0, np.int32))
    assert len(pack([*make_examples([3]), empty], 8)) == 1
    assert len(unpacked_rows([*make_examples([3]), empty])) == 1


def test_unpacked_rows_one_per_example():
    enc = make_examples([4, 2])
    rows = unpacked_rows(enc)
    assert [r.input_ids.tolist() for r in rows] == [[0, 1, 2, 3], [1000, 1001]]
    assert rows[0].segment_ids.tolist() == [1, 1, 1, 1]
    assert rows[0].positions.tolist() == [0, 1, 2, 3]
    assert rows[0].labels.tolist() == [IGNORE, 1, 2, 3]


# --- batches ----------------------------------------------------------------------------


def test_bucket_lengths():
    assert bucket_lengths(512) == [32, 64, 128, 256, 512]
    assert bucket_lengths(100) == [32, 64, 100]
    assert bucket_lengths(64) == [32, 64]
    assert bucket_lengths(20) == [20]
    assert bucket_lengths(100, smallest=16) == [16, 32, 64, 100]


def test_batches_shapes_padding_and_partial_batch():
    rows = unpacked_rows(make_examples([5, 3, 7, 2, 6, 4, 1]))
    out = list(batches(rows, 2, 2, [4, 8, 16], seed=0, epoch=0, pad_id=PAD))
    assert len(out) == num_batches(7, 2, 2) == 2
    keys = {"input_ids", "labels", "attention_mask", "positions", "segment_ids"}
    for batch in out:
        assert set(batch) == keys
        for v in batch.values():
            assert v.shape == (2, 2, 8) and v.dtype == np.int32  # longest row 7 -> bucket 8
        pad = batch["attention_mask"] == 0
        assert (batch["input_ids"][pad] == PAD).all()
        assert (batch["labels"][pad] == IGNORE).all()
        assert (batch["segment_ids"][pad] == 0).all() and (batch["positions"][pad] == 0).all()
        assert (batch["segment_ids"][~pad] == 1).all()
    last = out[1]["attention_mask"].reshape(4, 8).sum(axis=1)
    assert sorted(last.tolist())[0] == 0  # 7 rows in 2 batches of 4: one fully masked row
    real = [
        tuple(out[k]["input_ids"][a, j, : int(out[k]["attention_mask"][a, j].sum())].tolist())
        for k in range(2)
        for a in range(2)
        for j in range(2)
    ]
    assert sorted(t for t in real if t) == sorted(tuple(r.input_ids.tolist()) for r in rows)


def test_batches_no_loss_crosses_a_segment():
    rows = pack(make_examples([9, 7, 5, 3, 3, 2, 8, 1]), 16)
    for batch in batches(rows, 3, 1, bucket_lengths(16, 4), seed=1, epoch=0):
        seg = batch["segment_ids"].reshape(-1, batch["segment_ids"].shape[-1])
        lab = batch["labels"].reshape(seg.shape)
        t = np.nonzero(lab[:, 1:] != IGNORE)  # logits[t] predicts labels[t + 1]
        assert (seg[:, :-1][t] == seg[:, 1:][t]).all()
        assert (seg[:, 1:][t] > 0).all()


@given(st.lists(st.integers(1, 200), min_size=1, max_size=60), st.integers(0, 5))
@settings(max_examples=50, deadline=None)
def test_bucketing_gives_a_bounded_set_of_shapes(lengths, seed):
    buckets = bucket_lengths(200)
    rows = unpacked_rows(make_examples(lengths))
    shapes = set()
    for batch in batches(rows, 2, 3, buckets, seed=seed, epoch=0):
        length = batch["input_ids"].shape[-1]
        longest = int(batch["attention_mask"].sum(axis=-1).max())
        assert length == min(x for x in buckets if x >= longest)
        shapes.add(batch["input_ids"].shape)
    assert shapes <= {(3, 2, n) for n in buckets}


def _as_lists(it):
    return [{k: v.tolist() for k, v in batch.items()} for batch in it]


def test_shuffling_is_deterministic_by_seed_and_epoch():
    rows = unpacked_rows(make_examples(list(range(1, 40))))
    run = lambda seed, epoch: _as_lists(batches(rows, 4, 1, [64], seed=seed, epoch=epoch))  # noqa: E731
    assert run(3, 0) == run(3, 0)
    assert run(3, 0) != run(4, 0)
    assert run(3, 0) != run(3, 1)
    firsts = [b["input_ids"][0][0][0] for b in run(3, 0)]
    assert firsts != sorted(firsts)  # actually shuffled


def test_resume_start_equals_skipping():
    rows = pack(make_examples([5, 9, 3, 12, 7, 2, 8, 4, 6, 1, 11]), 16)
    full = _as_lists(batches(rows, 2, 1, [8, 16], seed=7, epoch=2))
    assert len(full) == num_batches(len(rows), 2, 1) >= 3
    for k in range(len(full) + 1):
        assert _as_lists(batches(rows, 2, 1, [8, 16], seed=7, epoch=2, start=k)) == full[k:]
    with pytest.raises(DataError, match="start="):
        next(batches(rows, 2, 1, [8, 16], seed=7, epoch=2, start=len(full) + 1))


def test_batches_refuse_rows_longer_than_the_buckets():
    rows = unpacked_rows(make_examples([40]))
    with pytest.raises(DataError, match="40 tokens is longer than the largest bucket 32"):
        next(batches(rows, 1, 1, [16, 32], seed=0, epoch=0))


# --- the whole pipeline -------------------------------------------------------------------


def test_pipeline_end_to_end(tmp_path):
    d = bpe_dir(tmp_path, chat_template=CHATML)
    convs = [
        {"messages": [{"role": "user", "content": v}, {"role": "assistant", "content": k}]}
        for k, v in MULTILINGUAL.items()
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", convs * 3)
    ds = load_dataset(path)
    tok = load_tokenizer(d)
    enc, _ = fit(encode(ds.examples, ds.fmt, tok, load_chat_template(d), where=ds.where), 64)
    rows = pack(enc, 64)
    assert len(rows) < len(enc)
    got = list(batches(rows, 2, 2, bucket_lengths(64), seed=0, epoch=0, pad_id=tok.pad_id))
    n_counted = sum(int((bt["labels"] != IGNORE).sum()) for bt in got)
    # every counted label reaches a batch (each segment starts with BOS, ignored anyway)
    assert n_counted == sum(len(counted(e)) for e in enc) > 0
