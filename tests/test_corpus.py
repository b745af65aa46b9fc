"""The demo's generated data: reproducible from its seed, the shipped task files equal to a
fresh generation, and a corpus that never pairs a date in words with its ISO form."""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path

from jax_impl.apps import corpus
from jax_impl.apps.demo import PAIRS_HELDOUT, PAIRS_TRAIN, TASK_HELDOUT, TASK_TRAIN, write_task
from jax_impl.apps.pretrain import train_tokenizer

ISO = re.compile(r"\b(\d{4})-(\d{2})-(\d{2})\b")


def test_corpus_is_a_function_of_its_seed() -> None:
    a = list(corpus.corpus(300, seed=0))
    assert a == list(corpus.corpus(300, seed=0))
    assert a != list(corpus.corpus(300, seed=1))
    assert len(set(a)) > 250  # varied documents, not a few repeated


def test_corpus_never_pairs_the_two_date_forms() -> None:
    docs = list(corpus.corpus(5000, seed=0))
    iso = sum(bool(ISO.search(d)) for d in docs)
    words = sum(any(f" {m} " in d or f" {m}," in d for m in corpus.MONTHS) for d in docs)
    assert iso > 500 and words > 500  # both forms are common
    for d in docs:
        for y, m, day in ISO.findall(d):
            date = datetime.date(int(y), int(m), int(day))
            assert corpus.in_words(date, 0) not in d and corpus.in_words(date, 1) not in d
        assert corpus.QUESTION not in d and "YYYY" not in d  # the question is never seen


def test_shipped_task_files_are_the_generated_ones(tmp_path: Path) -> None:
    write_task(tmp_path)
    assert (tmp_path / "train.jsonl").read_bytes() == TASK_TRAIN.read_bytes()
    assert (tmp_path / "heldout.jsonl").read_bytes() == TASK_HELDOUT.read_bytes()
    assert (tmp_path / "pairs_train.jsonl").read_bytes() == PAIRS_TRAIN.read_bytes()
    assert (tmp_path / "pairs_heldout.jsonl").read_bytes() == PAIRS_HELDOUT.read_bytes()


def test_preference_pairs_prefer_the_iso_date() -> None:
    pairs = [json.loads(x) for x in PAIRS_HELDOUT.read_text().splitlines()]
    held = [json.loads(x) for x in TASK_HELDOUT.read_text().splitlines()]
    assert len(pairs) == len(held)
    for p, e in zip(pairs, held, strict=True):
        assert p["prompt"] == e["prompt"] and p["chosen"] == e["completion"]
        # the rejected answer is the sentence's own date, in words: the wrong format
        assert e["sentence"].endswith(f" on{p['rejected']}.") and not ISO.search(p["rejected"])


def test_task_examples_and_split() -> None:
    train = [json.loads(x) for x in TASK_TRAIN.read_text().splitlines()]
    held = [json.loads(x) for x in TASK_HELDOUT.read_text().splitlines()]
    assert (len(train), len(held)) == (2000, 200)
    assert not {e["completion"] for e in held} & {e["completion"] for e in train}
    for e in train[:50] + held:
        assert e["prompt"] == corpus.prompt(e["sentence"])
        y, m, d = (int(x) for x in e["completion"].strip().split("-"))
        date = datetime.date(y, m, d)
        assert (
            corpus.in_words(date, 0) in e["sentence"] or corpus.in_words(date, 1) in e["sentence"]
        )
    styles = {
        corpus.in_words(datetime.date.fromisoformat(e["completion"].strip()), 0) in e["sentence"]
        for e in held
    }
    assert styles == {True, False}  # both ways of writing the date are asked


def test_few_shot_prompt_ends_with_the_question() -> None:
    train = [json.loads(x) for x in TASK_TRAIN.read_text().splitlines()][:2]
    p = corpus.few_shot_prompt(train, "Ada visited Lowmoor on 1 May 1990.")
    assert p.startswith(train[0]["prompt"] + train[0]["completion"] + "\n\n")
    assert p.endswith("\n\n" + corpus.prompt("Ada visited Lowmoor on 1 May 1990."))


def test_tokenizer_spells_digits_and_round_trips() -> None:
    tok = train_tokenizer(list(corpus.corpus(2000, seed=0)), 400)
    assert tok.get_vocab_size() <= 400
    assert [tok.id_to_token(i) for i in range(3)] == ["<|bos|>", "<|eos|>", "<|pad|>"]
    text = "Nora moved to Port Ellis on 5 March 2021.\nDate as YYYY-MM-DD: 2021-03-05 ünï"
    enc = tok.encode(text)
    assert tok.decode(enc.ids) == text
    digits = [t for t in enc.tokens if any(c.isdigit() for c in t)]
    assert all(sum(c.isdigit() for c in t) == 1 for t in digits)  # one digit per token
    assert tok.to_str() == train_tokenizer(list(corpus.corpus(2000, seed=0)), 400).to_str()
