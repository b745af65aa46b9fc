"""Tokenization equal to transformers': for each kind of tokenizer real checkpoints ship, the
ids of every data format are transformers' ``tokenizer(full_text)`` (plus EOS) or
``apply_chat_template(messages, tokenize=True)``, and the loss mask covers exactly the
completion / assistant tokens. The tokenizers are trained here, offline, with ``tokenizers``
and loaded by transformers from the directory they are written to."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from jax_impl.apps.cli import main
from jax_impl.train.data import (
    DEFAULT_CHAT_TEMPLATE,
    Encoded,
    encode,
    encode_file,
    load_chat_template,
    load_tokenizer,
)
from ref_numpy.layers import IGNORE_INDEX

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.interop

CORPUS = [
    "Answer: 4",
    "Question: what is 2 + 2? Answer: 4.",
    "hello world, how are you? I am fine thanks.",
    "### Instruction:\nAdd the numbers.\n\n### Input:\n1 2\n\n### Response:\n3",
    "system user assistant be brief",
    "  two spaces, a tab\there, and a line\nbreak",
    "こんにちは、世界！ Привет мир 123",  # noqa: RUF001
    "Say hi in French. Bonjour !",
]
# Llama-2's template: BOS written by the template, [INST] markers, eos after each reply.
LLAMA2_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + ' ' + eos_token }}"
    "{% else %}{{ '<<SYS>>\\n' + message['content'] + '\\n<</SYS>>\\n\\n' }}{% endif %}"
    "{% endfor %}"
)
# TinyLlama / Zephyr: no BOS in the template although the tokenizer adds one to texts.
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
CHATML_TURN = (
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
)
CHATML = (
    "{% for message in messages %}"
    f"{CHATML_TURN}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def _write(d: Path, tok: Tokenizer, config: dict[str, Any]) -> Path:
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return d


def _train(tok: Tokenizer, specials: list[str], alphabet: list[str], size: int = 300) -> None:
    trainer = trainers.BpeTrainer(
        vocab_size=size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(CORPUS * 4, trainer)


def sentencepiece_dir(tmp: Path, legacy: bool) -> Path:
    """Llama-2 / Mistral / TinyLlama: a SentencePiece BPE whose tokenizer.json prepends "▁" in
    the normalizer, as the converted Llama-2 files do; tokenizer_class Llama, add_bos_token."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    alphabet = sorted({c for text in CORPUS for c in text.replace(" ", "▁")} | {"▁"})
    _train(tok, ["<unk>", "<s>", "</s>"], alphabet)
    # Llama's byte-fallback pieces <0x00>..<0xFF> follow the three specials (ids 3..258).
    spec = json.loads(tok.to_str())
    trained = sorted(spec["model"]["vocab"], key=spec["model"]["vocab"].get)
    pieces = [*trained[:3], *(f"<0x{b:02X}>" for b in range(256)), *trained[3:]]
    spec["model"]["vocab"] = {p: i for i, p in enumerate(pieces)}
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None  # type: ignore[assignment]
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    config = {
        "tokenizer_class": "LlamaTokenizerFast",
        "legacy": legacy,
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "chat_template": LLAMA2_TEMPLATE if legacy else ZEPHYR_TEMPLATE,
    }
    return _write(tmp / f"sentencepiece-legacy-{legacy}", tok, config)


def byte_level_dir(tmp: Path) -> Path:
    """GPT-2 / Qwen2 / SmolLM: byte-level BPE, a tokenizer that adds no BOS although a bos
    token is configured (here a chat marker, as some such checkpoints do), ChatML."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    _train(tok, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], BYTES, 420)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": CHATML,
    }
    return _write(tmp / "byte-level", tok, config)


def llama3_dir(tmp: Path) -> Path:
    """Llama-3: byte-level BPE whose tokenizer.json post-processor adds BOS; the template
    writes BOS itself."""
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>"]
    _train(tok, [*specials, "<|end_header_id|>", "<|eot_id|>"], BYTES, 420)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)]
            ),
        ]
    )
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "chat_template": LLAMA3_TEMPLATE,
    }
    return _write(tmp / "llama3", tok, config)


BYTES = pre_tokenizers.ByteLevel.alphabet()
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
KINDS: dict[str, Callable[[Path], Path]] = {
    "sentencepiece-legacy": lambda tmp: sentencepiece_dir(tmp, legacy=True),
    "sentencepiece": lambda tmp: sentencepiece_dir(tmp, legacy=False),
    "byte-level": byte_level_dir,
    "llama3": llama3_dir,
}


@pytest.fixture(scope="module", params=list(KINDS))
def kind(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    d = KINDS[request.param](tmp_path_factory.mktemp(request.param))
    return request.param, d, load_tokenizer(d), transformers.AutoTokenizer.from_pretrained(d)


def expected_labels(hf: Any, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """transformers' ids of ``prompt + completion`` plus EOS, and the labels a token gets when
    its characters (transformers' offsets) overlap the completion."""
    text = prompt + completion
    out = hf(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    ids, labels = list(out["input_ids"]), []
    for i, (t, (s, e), special) in enumerate(
        zip(ids, out["offset_mapping"], out["special_tokens_mask"], strict=True)
    ):
        counted = (not special and s < len(text) and e > len(prompt)) or (special and i > 0)
        labels.append(t if counted and i > 0 else IGNORE_INDEX)
    if ids[-1:] != [hf.eos_token_id]:
        ids, labels = [*ids, hf.eos_token_id], [*labels, hf.eos_token_id]
    return ids, labels


def lists(e: Encoded) -> tuple[list[int], list[int]]:
    return e.input_ids.tolist(), e.labels.tolist()


TEXTS = ["Answer: 4", "  two spaces, a tab\there,\n and </s> a break", "こんにちは Привет 123", ""]
PAIRS = [
    ("Answer: ", "4"),
    ("Answer:", " 4"),
    ("Question: what is 2 + 2?", "\nAnswer: 4."),
    ("", "hi"),
]


def test_text_is_the_tokenizers_own_encoding_plus_eos(kind: Any) -> None:
    name, _, tok, hf = kind
    for text in TEXTS:
        (e,) = encode([{"text": text}], "text", tok)
        ids = [*hf(text)["input_ids"], hf.eos_token_id]
        assert e.input_ids.tolist() == ids, text
        assert e.labels.tolist() == [IGNORE_INDEX, *ids[1:]]
    if name == "byte-level":  # a bos token is configured, but this tokenizer adds none
        assert tok.bos_id is not None and tok.bos_id not in e.input_ids.tolist()
    else:
        assert e.input_ids.tolist()[0] == tok.bos_id


def test_the_post_processor_decides_not_tokenizer_config_flags(tmp_path: Path) -> None:
    """transformers 5 drops add_bos_token / add_eos_token when tokenizer.json exists; so do
    we: tokenizer.json's post-processor alone says what a text gets."""
    d = sentencepiece_dir(tmp_path, legacy=True)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(
        json.dumps({**cfg, "add_bos_token": False, "add_eos_token": True})
    )
    tok, hf = load_tokenizer(d), transformers.AutoTokenizer.from_pretrained(d)
    for text in TEXTS:
        ids = hf(text)["input_ids"]
        assert ids[0] == hf.bos_token_id and ids[-1:] != [hf.eos_token_id]
        assert tok.encode(text, add_special_tokens=True) == ids
        (e,) = encode([{"text": text}], "text", tok)
        assert e.input_ids.tolist() == [*ids, hf.eos_token_id]


def test_prompt_completion_ids_and_mask(kind: Any) -> None:
    _, _, tok, hf = kind
    for prompt, completion in PAIRS:
        (e,) = encode([{"prompt": prompt, "completion": completion}], "prompt_completion", tok)
        assert lists(e) == expected_labels(hf, prompt, completion), (prompt, completion)


def test_alpaca_ids_and_mask(kind: Any) -> None:
    _, _, tok, hf = kind
    ex = {"instruction": "Add the numbers.", "input": "1 2", "output": "3"}
    (e,) = encode([ex], "alpaca", tok)
    prompt = "### Instruction:\nAdd the numbers.\n\n### Input:\n1 2\n\n### Response:\n"
    assert lists(e) == expected_labels(hf, prompt, "3")
    counted = tok.decode([t for t in e.labels.tolist() if t != IGNORE_INDEX])
    assert counted.endswith(f"3{tok.eos_token}") and "Instruction" not in counted


def test_the_sentencepiece_boundary_token_counts(tmp_path: Path) -> None:
    """Prompt "Answer: " + completion "4": one "▁4", counted, not "▁" + "▁4"."""
    tok = load_tokenizer(sentencepiece_dir(tmp_path, legacy=False))
    (e,) = encode([{"prompt": "Answer: ", "completion": "4"}], "prompt_completion", tok)
    pieces = [tok.tok.id_to_token(i) for i in e.input_ids.tolist()]
    assert pieces == ["<s>", "▁Answer:", "▁4", "</s>"]
    assert e.labels.tolist() == [IGNORE_INDEX, IGNORE_INDEX, *e.input_ids.tolist()[2:]]
    separately = tok.encode("Answer: ") + tok.encode("4")  # what piece-by-piece encoding gave
    assert [tok.tok.id_to_token(i) for i in separately] == ["▁Answer:", "▁", "▁4"]


CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello world, how are you?"},
    {"role": "assistant", "content": "I am fine thanks."},
    {"role": "user", "content": "Question: what is 2 + 2?"},
    {"role": "assistant", "content": "Answer: 4"},
]


def test_chat_is_apply_chat_template(kind: Any) -> None:
    name, d, tok, hf = kind
    msgs = CONVERSATION[1:] if name == "sentencepiece-legacy" else CONVERSATION
    (e,) = encode([{"messages": msgs}], "chat", tok, load_chat_template(d))
    theirs = list(hf.apply_chat_template(msgs, tokenize=True)["input_ids"])
    got = e.input_ids.tolist()
    # EOS is appended only when the last turn's tokens lack it (ChatML, Llama-3 end turns with
    # their own marker, which is the eos token here; Llama-2 and Zephyr write eos_token).
    assert got == theirs
    counted = [t for t in e.labels.tolist() if t != IGNORE_INDEX]
    replies = "".join(m["content"] for m in msgs if m["role"] == "assistant").replace(" ", "")
    text = tok.decode(counted).replace(" ", "").replace("▁", "")
    assert replies.replace("Answer:4", "") in text and "Answer:4" in text
    assert "hello" not in text and "Question" not in text and "brief" not in text


def test_chat_mask_is_transformers_assistant_mask(tmp_path: Path) -> None:
    """With {% generation %} around the replies, transformers' assistant mask is the ground
    truth: every token it marks is counted, and nothing outside the assistant turns is."""
    tpl = CHATML.replace(
        CHATML_TURN,
        "{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{% if message['role'] == 'assistant' %}{% generation %}"
        "{{ message['content'] + '<|im_end|>' + '\\n' }}{% endgeneration %}"
        "{% else %}{{ message['content'] + '<|im_end|>' + '\\n' }}{% endif %}",
    )
    d = byte_level_dir(tmp_path)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": tpl}))
    hf = transformers.AutoTokenizer.from_pretrained(d)
    tok = load_tokenizer(d)
    (e,) = encode([{"messages": CONVERSATION}], "chat", tok, load_chat_template(d))
    out = hf.apply_chat_template(CONVERSATION, tokenize=True, return_assistant_tokens_mask=True)
    assert e.input_ids.tolist() == list(out["input_ids"])
    mask = np.asarray(out["assistant_masks"], bool)
    assert mask.sum() > 4
    assert ((e.labels != IGNORE_INDEX) == mask).all()


def test_builtin_template_starts_as_the_tokenizer_starts_texts(kind: Any) -> None:
    name, _, tok, hf = kind
    (e,) = encode([{"messages": CONVERSATION}], "chat", tok, DEFAULT_CHAT_TEMPLATE)
    theirs = list(
        hf.apply_chat_template(CONVERSATION, chat_template=DEFAULT_CHAT_TEMPLATE)["input_ids"]
    )
    adds_bos = hf("a")["input_ids"][0] == hf.bos_token_id and name != "byte-level"
    assert e.input_ids.tolist() == ([hf.bos_token_id] if adds_bos else []) + theirs


def test_tokens_format_needs_no_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 211}))
    data = tmp_path / "ids.jsonl"
    data.write_text('{"input_ids": [5, 210, 7]}\n{"input_ids": [1, 2], "labels": [-100, 2]}\n')
    encoded, _, tok, fmt = encode_file(tmp_path, data, 211, 16)
    assert tok is None and fmt == "tokens"
    assert [lists(e) for e in encoded] == [([5, 210, 7], [5, 210, 7]), ([1, 2], [-100, 2])]
    data.write_text('{"input_ids": [5, 211]}\n')
    with pytest.raises(ValueError, match=r"ids\.jsonl:1: field 'input_ids' holds 211.*211"):
        encode_file(tmp_path, data, 211, 16)
    data.write_text('{"text": "hello"}\n')
    with pytest.raises(ValueError, match=r"tokenizer\.json: missing"):
        encode_file(tmp_path, data, 211, 16)


def test_eval_loss_is_transformers_loss_on_the_tokenizers_encoding(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch = pytest.importorskip("torch")
    d = sentencepiece_dir(tmp_path, legacy=False)
    hf_tok = transformers.AutoTokenizer.from_pretrained(d)
    cfg = transformers.LlamaConfig(
        vocab_size=len(hf_tok),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(d, safe_serialization=True)
    texts = ["Answer: 4", "hello world, how are you? I am fine thanks.", "Bonjour ! 123"]
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))

    def hf_loss(encodings: list[list[int]]) -> tuple[float, int]:
        total, count = 0.0, 0
        for ids in encodings:
            x = torch.tensor([ids])
            with torch.no_grad():
                loss = float(model(x, labels=x).loss)
            total, count = total + loss * (len(ids) - 1), count + len(ids) - 1
        return total / count, count

    want, count = hf_loss([[*hf_tok(t)["input_ids"], hf_tok.eos_token_id] for t in texts])
    # the per-piece encoding the data path used to make: BOS added to "▁"-split pieces
    pieces = [[1, *hf_tok(t[:4], add_special_tokens=False)["input_ids"]] for t in texts]
    pieces = [
        p + hf_tok(t[4:], add_special_tokens=False)["input_ids"]
        for p, t in zip(pieces, texts, strict=True)
    ]
    other, _ = hf_loss([[*p, hf_tok.eos_token_id] for p in pieces])
    assert abs(other - want) > 1e-3 * want  # the check below can tell the encodings apart
    args = ["eval", "--model", str(d), "--data", str(data), "--method", "full"]
    assert main([*args, "--backend", "numpy"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["tokens"] == count
    assert abs(got["loss"] - want) <= 1e-4 * want
    assert main(args) == 0  # the engine too
    assert abs(json.loads(capsys.readouterr().out)["loss"] - want) <= 1e-4 * want
