"""Preference data: formats, TRL-style encoding, truncation, and pair batches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jax_impl.train.data import DataError, load_chat_template, load_tokenizer, save_byte_tokenizer
from jax_impl.train.data.pairs import encode_pairs_file, make_pair, pair_batches

EOS = "<|eos|>"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the byte tokenizer (ids 0-255 are bytes; eos 257)."""
    out = tmp_path_factory.mktemp("tok")
    save_byte_tokenizer(out)
    return out


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_text_pairs_are_prompt_then_completion_with_eos(model_dir: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(model_dir)
    data = write(tmp_path / "p.jsonl", [{"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"}])
    (pair,), cut, _, fmt = encode_pairs_file(model_dir, data, 300, 64)
    assert fmt == "pair_text" and cut == 0
    prompt = tok.encode("Q: 2+2?", add_special_tokens=True)
    for row, answer in ((pair.chosen, " 4"), (pair.rejected, " 5")):
        want = tok.encode("Q: 2+2?" + answer + EOS, add_special_tokens=True)
        assert row.input_ids.tolist() == want and want[-1] == tok.eos_id
        counted = [t for t, label in zip(want, row.labels, strict=True) if label != -100]
        assert counted == want[len(prompt) :]  # the completion and its EOS, nothing else


def test_chat_pairs_share_or_name_their_prompt(model_dir: Path, tmp_path: Path) -> None:
    user = {"role": "user", "content": "Sky?"}
    good, bad = (
        {"role": "assistant", "content": "Blue."},
        {"role": "assistant", "content": "Green."},
    )
    implicit = write(tmp_path / "a.jsonl", [{"chosen": [user, good], "rejected": [user, bad]}])
    explicit = write(
        tmp_path / "b.jsonl", [{"prompt": [user], "chosen": [good], "rejected": [bad]}]
    )
    (a,), _, _, fmt = encode_pairs_file(model_dir, implicit, 300, 128)
    (b,), _, _, _ = encode_pairs_file(model_dir, explicit, 300, 128)
    assert fmt == "pair_chat"
    np.testing.assert_array_equal(a.chosen.input_ids, b.chosen.input_ids)
    np.testing.assert_array_equal(a.rejected.labels, b.rejected.labels)
    tok = load_tokenizer(model_dir)
    from jax_impl.train.data import chat_prompt_ids

    prompt = chat_prompt_ids([user], load_chat_template(model_dir), tok)
    assert a.chosen.input_ids[: len(prompt)].tolist() == prompt
    assert (a.chosen.labels[: len(prompt)] == -100).all()
    assert "Blue." in tok.decode([t for t in a.chosen.labels.tolist() if t != -100])


def test_token_pairs_are_taken_as_given(model_dir: Path, tmp_path: Path) -> None:
    data = write(
        tmp_path / "t.jsonl",
        [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]}],
    )
    (pair,), _, _, fmt = encode_pairs_file(model_dir, data, 300, 64)
    assert fmt == "pair_tokens"
    assert pair.chosen.input_ids.tolist() == [1, 2, 3, 4, 5]
    assert pair.chosen.labels.tolist() == [-100, -100, -100, 4, 5]
    assert pair.rejected.labels.tolist() == [-100, -100, -100, 6]


def test_truncation_keeps_start_or_end() -> None:
    prompt, chosen, rejected = [1, 2, 3, 4], [5, 6, 7], [8]
    p, cut = make_pair(prompt, chosen, rejected, 6, mode="keep_start")
    assert cut and p.chosen.input_ids.tolist() == [1, 2, 3, 4, 5, 6]
    assert p.rejected.input_ids.tolist() == [1, 2, 3, 4, 8]  # short enough: untouched
    p, cut = make_pair(prompt, chosen, rejected, 5, mode="keep_end")
    assert p.chosen.input_ids.tolist() == [3, 4, 5, 6, 7]
    assert p.chosen.labels.tolist() == [-100, -100, 5, 6, 7]
    assert p.rejected.input_ids.tolist() == [1, 2, 3, 4, 8]
    p, cut = make_pair(prompt, chosen, rejected, 8, max_prompt_length=2, mode="keep_end")
    assert cut and p.chosen.input_ids.tolist() == [3, 4, 5, 6, 7]
    p, cut = make_pair(prompt, chosen, rejected, 8, max_prompt_length=2, mode="keep_start")
    assert p.chosen.input_ids.tolist() == [1, 2, 5, 6, 7]
    _, cut = make_pair(prompt, chosen, rejected, 8)
    assert not cut
    with pytest.raises(DataError, match=r"f:3: the prompt has 4 tokens, leaving no room"):
        make_pair(prompt, chosen, rejected, 4, mode="keep_start", where="f:3")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "a", "chosen": "b"}, r":1: field 'rejected' is missing"),
        ({"prompt": "a", "chosen": "", "rejected": "c"}, r":1: field 'chosen' is empty"),
        (
            {"prompt": "a", "chosen": "b", "rejected": "b"},
            r":1: fields 'chosen' and 'rejected' are identical",
        ),
        (
            {"prompt": "a", "completion": "b"},
            r":1: a supervised example \(prompt_completion\), not a preference pair",
        ),
        ({"text": "a"}, r":1: a supervised example \(text\), not a preference pair"),
        ({"prompt": "a", "chosen": 3, "rejected": "b"}, r":1: field 'chosen' must be a string"),
        (
            {"prompt_ids": [1], "chosen_ids": [], "rejected_ids": [2]},
            r":1: field 'chosen_ids' is empty",
        ),
        (
            {"prompt_ids": [1], "chosen_ids": [999], "rejected_ids": [2]},
            r"holds 999, outside the vocabulary",
        ),
        (
            {
                "chosen": [{"role": "user", "content": "q"}],
                "rejected": [{"role": "user", "content": "r"}],
            },
            r":1: field 'chosen' must end with an assistant message",
        ),
    ],
)
def test_bad_pairs_are_named(model_dir: Path, tmp_path: Path, row: dict, message: str) -> None:
    data = write(tmp_path / "bad.jsonl", [row])
    with pytest.raises(DataError, match=message):
        encode_pairs_file(model_dir, data, 300, 64)


def test_mixed_formats_name_the_line(model_dir: Path, tmp_path: Path) -> None:
    data = write(
        tmp_path / "mixed.jsonl",
        [
            {"prompt": "a", "chosen": "b", "rejected": "c"},
            {"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3]},
        ],
    )
    with pytest.raises(DataError, match=r"mixed.jsonl:2: mixed formats"):
        encode_pairs_file(model_dir, data, 300, 64)


def test_pair_batches_put_a_pair_in_adjacent_rows() -> None:
    pairs = [make_pair([9, i], [i, 1], [i, 2, 3], 16)[0] for i in range(5)]
    ref = np.arange(10, dtype=np.float64).reshape(5, 2)
    got = list(pair_batches(pairs, 2, 1, [8], seed=0, epoch=0, pad_id=0, ref_logps=ref))
    assert len(got) == 3 and got[0]["input_ids"].shape == (1, 4, 8)
    seen = []
    for b in got:
        for j in range(0, 4, 2):
            c, r = b["input_ids"][0, j], b["input_ids"][0, j + 1]
            if not b["attention_mask"][0, j].any():  # the last batch's padding pair
                assert not b["attention_mask"][0, j + 1].any() and (b["labels"][0, j] == -100).all()
                continue
            i = int(c[1])
            assert c[:4].tolist() == [9, i, i, 1] and r[:5].tolist() == [9, i, i, 2, 3]
            assert b["ref_logps"][0, j : j + 2].tolist() == ref[i].tolist()
            seen.append(i)
    assert sorted(seen) == list(range(5))
    half = list(pair_batches(pairs, 2, 1, [8], seed=0, epoch=0, part=(2, 4)))
    np.testing.assert_array_equal(half[0]["input_ids"][0], got[0]["input_ids"][0, 2:])
    with pytest.raises(DataError, match="whole pairs"):
        list(pair_batches(pairs, 2, 1, [8], seed=0, epoch=0, part=(1, 3)))
