"""Preference tuning against TRL's ``DPOTrainer`` (TRL 1.16): the same pairs give the same
tokens and the same loss and metrics.

A tiny random Llama is saved with a SentencePiece tokenizer trained here (Zephyr chat
template, EOS ``</s>``, BOS added to texts but not by the template; see
test_tokenization.py). The pairs come in three files: text (``prompt``/``chosen``/
``rejected`` strings, one prompt ending in a space so its last token merges with the
completion's first, one completion already ending with EOS), conversations with an explicit
``prompt``, and conversations whose prompt is the messages ``chosen`` and ``rejected`` share.

1. Tokens: our ``encode_pair`` gives the ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids``
   of TRL's processed ``train_dataset``, and the rows of ``encode_pairs_file`` (and of the
   batches ``pair_batches`` makes of them) are the ``input_ids`` of TRL's collator with
   labels exactly its ``completion_mask`` (position 0, which nothing predicts, aside), also
   under ``max_length`` truncation with ``keep_start`` and ``keep_end`` (TRL's collator cuts
   each row on its own, as ours does).
2. Loss and metrics: the policy is the base with a LoRA adapter whose B is not zero, the
   reference the base itself. TRL is given the base model and a ``peft_config``, so it wraps
   a fresh adapter and takes the reference with the adapters disabled; the adapter's
   weights are then loaded into it, the state of any step after the first. (Handed an
   already wrapped ``PeftModel`` with ``ref_model=None``, TRL 1.16 copies that adapter as
   the reference instead, so the reference would be the policy.) TRL's side is its own
   ``compute_loss`` (``_compute_loss``) on one batch its collator made, in train or eval
   mode, and its metrics are read from ``trainer._metrics``; ours is the engine
   (``load_pretrained`` with the adapter, ``eval_preference`` on ``pair_batches``) and the
   numpy spec (``evaluate_preferences(backend="numpy")``: ``hf.load_model``,
   ``peft.load_adapter``, ``join_lora``, ``sequence_logps_forward``,
   ``preference_loss_forward``, ``rewards``). Loss, ``rewards/*`` and ``logps/*`` agree to
   ``TOL`` for the sigmoid (DPO) and IPO losses, text and conversations. IPO divides by the
   completion's tokens: TRL counts its unshifted ``completion_mask``, we the tokens a
   position predicts; these differ only for a completion token at position 0 (a
   ``keep_end`` cut through the whole prompt), which the IPO cases do not have (asserted).
3. Conservative DPO: TRL 1.16's ``sigmoid`` loss ignores ``label_smoothing`` (asserted
   here, so a TRL that starts applying it shows up). Its ``aot`` loss computes
   ``-(1 - eps) log sigmoid(h) - eps log sigmoid(-h)`` of sorted log-ratio differences;
   over a batch of one pair sorting is the identity, so TRL ``aot`` on single-pair batches
   is conservative DPO, and our sigmoid loss with ``label_smoothing`` is held to it pair by
   pair.
4. A wrong beta, or a label boundary off by one token, misses TRL by far more than ``TOL``.

Everything runs in float32 on the CPU (TRL with ``bf16=False``); the spec runs in float64.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jax_impl.apps.evaluate import evaluate_preferences
from jax_impl.model import EngineConfig
from jax_impl.train.checkpoint import load_pretrained
from jax_impl.train.data import Encoded, load_chat_template, load_tokenizer
from jax_impl.train.data.batches import epoch_order
from jax_impl.train.data.pairs import (
    Truncation,
    encode_pair,
    encode_pairs_file,
    pair_batches,
    pair_format,
)
from jax_impl.train.trainer import DPOConfig, eval_preference
from ref_numpy.formats.hf import copy_tokenizer, load_config
from ref_numpy.layers import IGNORE_INDEX
from tests.interop.test_tokenization import sentencepiece_dir

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")
pytestmark = [
    pytest.mark.interop,
    # transformers 5 renames gradient checkpointing, which TRL 1.16 still sets by its old name
    pytest.mark.filterwarnings("ignore:`(is_)?gradient_checkpointing` is deprecated:FutureWarning"),
]

TOL = 1e-5  # relative to max(1, |TRL's value|): float32 on both sides
BETA = 0.1
SPREAD = 0.3  # std of the random base weights: logits far from uniform
CONTEXT = 128  # the model's max_position_embeddings; no sequence here comes near it
BUCKETS = (CONTEXT,)  # one padded length for all our batches: one compile per objective
PAIRS_PER_BATCH = 2
LORA = dict(
    r=2,
    lora_alpha=5,
    lora_dropout=0.0,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
)
METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def _msgs(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in turns]


DATA: dict[str, list[dict[str, Any]]] = {
    "text": [
        {
            "prompt": "Question: what is 2 + 2? Answer: ",  # ends in a space: merges
            "chosen": "4.",
            "rejected": "5, I am fine.",
        },
        {"prompt": "Say hi in French.", "chosen": " Bonjour !", "rejected": " hello world</s>"},
        {
            "prompt": "### Instruction:\nAdd the numbers.\n\n### Input:\n1 2\n\n### Response:\n",
            "chosen": "3",
            "rejected": "12 and two spaces",
        },
        {
            "prompt": "hello world, how are you?",
            "chosen": " I am fine thanks.",
            "rejected": " Привет мир",
        },
    ],
    "chat": [
        {
            "prompt": _msgs(("system", "be brief"), ("user", "what is 2 + 2?")),
            "chosen": _msgs(("assistant", "4")),
            "rejected": _msgs(("assistant", "5, I am fine.")),
        },
        {
            "prompt": _msgs(("user", "Say hi in French.")),
            "chosen": _msgs(("assistant", "Bonjour !")),
            "rejected": _msgs(("assistant", "hello world, how are you?")),
        },
        {
            "prompt": _msgs(("user", "Add the numbers. 1 2")),
            "chosen": _msgs(("assistant", "3")),
            "rejected": _msgs(("assistant", "12")),
        },
    ],
    "chat_implicit": [
        {
            "chosen": _msgs(("user", "what is 2 + 2?"), ("assistant", "Answer: 4")),
            "rejected": _msgs(("user", "what is 2 + 2?"), ("assistant", "Answer: 5")),
        },
        {
            "chosen": _msgs(
                ("system", "be brief"),
                ("user", "Say hi in French."),
                ("assistant", "Bonjour !"),
                ("user", "how are you?"),
                ("assistant", "I am fine thanks."),
            ),
            "rejected": _msgs(
                ("system", "be brief"),
                ("user", "Say hi in French."),
                ("assistant", "Bonjour !"),
                ("user", "how are you?"),
                ("assistant", "hello world"),
            ),
        },
        {
            "chosen": _msgs(("user", "Add the numbers. 1 2"), ("assistant", "3")),
            "rejected": _msgs(("user", "Add the numbers. 1 2"), ("assistant", "two")),
        },
    ],
}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The base (model + tokenizer), the adapter, and one JSONL file per format."""
    root = tmp_path_factory.mktemp("dpo_trl")
    tok_dir = sentencepiece_dir(root, legacy=False)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    config = transformers.LlamaConfig(
        vocab_size=len(hf_tok),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=24,
        max_position_embeddings=CONTEXT,
        tie_word_embeddings=False,
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
    )
    model = transformers.LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:  # norm gains around 1
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(SPREAD * torch.randn(p.shape, generator=gen))
    out = {"base": root / "base", "adapter": root / "adapter"}
    model.save_pretrained(out["base"])
    copy_tokenizer(tok_dir, out["base"])
    policy = peft.get_peft_model(model, peft.LoraConfig(**LORA))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_" in name:  # B non-zero: the policy is not the base
                p.copy_(SPREAD * torch.randn(p.shape, generator=gen))
    policy.save_pretrained(out["adapter"])
    for fmt, rows in DATA.items():
        out[fmt] = root / f"{fmt}.jsonl"
        lines = [json.dumps(r, ensure_ascii=False) for r in rows]
        out[fmt].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


Trainer = Any  # trl.DPOTrainer


@pytest.fixture(scope="module")
def trl_trainer(files: dict[str, Path]) -> Callable[..., Trainer]:
    """``make(fmt, loss_type="sigmoid", max_length=None, truncation_mode="keep_start",
    label_smoothing=0.0, beta=BETA)``: a DPOTrainer of the base + adapter on ``fmt``'s pairs
    (cached; no training)."""
    hf_tok = transformers.AutoTokenizer.from_pretrained(files["base"])
    adapter = peft.utils.load_peft_weights(str(files["adapter"]))
    made: dict[tuple, Trainer] = {}

    def make(
        fmt: str,
        loss_type: str = "sigmoid",
        max_length: int | None = None,
        truncation_mode: str = "keep_start",
        label_smoothing: float = 0.0,
        beta: float = BETA,
    ) -> Trainer:
        key = (fmt, loss_type, max_length, truncation_mode, label_smoothing, beta)
        if key in made:
            return made[key]
        model = transformers.AutoModelForCausalLM.from_pretrained(files["base"])
        with warnings.catch_warnings():  # deprecated in TRL 1.16, still supported
            warnings.filterwarnings("ignore", "The `'keep_end'` truncation mode", FutureWarning)
            args = trl.DPOConfig(
                output_dir=str(files["base"].parent / "trl" / "-".join(map(str, key))),
                report_to="none",
                use_cpu=True,
                bf16=False,
                beta=beta,
                loss_type=loss_type,
                label_smoothing=label_smoothing,
                max_length=max_length,
                truncation_mode=truncation_mode,
            )
            trainer = trl.DPOTrainer(
                model=model,
                args=args,
                train_dataset=datasets.Dataset.from_list(DATA[fmt]),
                processing_class=hf_tok,
                peft_config=peft.LoraConfig(**LORA),
            )
        assert list(trainer.model.peft_config) == ["default"]  # no "ref" copy: the base is
        loaded = peft.set_peft_model_state_dict(trainer.model, adapter)
        assert not loaded.unexpected_keys
        made[key] = trainer
        return trainer

    return make


@pytest.fixture(scope="module")
def engine_model(files: dict[str, Path]) -> Any:
    """Our engine's base + adapter (float32 on the CPU)."""
    return load_pretrained(files["base"], None, EngineConfig(), adapter_dir=files["adapter"])[1]


def _examples(trainer: Trainer) -> list[dict[str, list[int]]]:
    keys = ("prompt_ids", "chosen_ids", "rejected_ids")
    return [{k: row[k] for k in keys} for row in trainer.train_dataset]


def _trl_metrics(trainer: Trainer, examples: list[dict], mode: str) -> dict[str, float]:
    """TRL's loss and metrics of one batch its collator makes of ``examples``."""
    inputs = trainer.data_collator(examples)
    trainer.model.train(mode == "train")
    with torch.set_grad_enabled(mode == "train"):
        loss = trainer.compute_loss(trainer.model, inputs)
    got = {k: v[-1] for k, v in trainer._metrics[mode].items() if k in METRICS}
    return {"loss": float(loss.detach()), **got}


def _ours_jax(
    model: Any, pairs: list, objective: DPOConfig, pad_id: int | None
) -> dict[str, float]:
    """The engine's figures over ``pairs``, two pairs a batch (the last one filled up with a
    pair that takes no part when they are odd)."""
    made = pair_batches(pairs, PAIRS_PER_BATCH, 1, BUCKETS, seed=0, epoch=0, pad_id=pad_id)
    return eval_preference(model, made, objective)


def _assert_close(got: dict[str, float], want: dict[str, float], what: str) -> None:
    for k in ("loss", *METRICS):
        assert abs(got[k] - want[k]) <= TOL * max(1.0, abs(want[k])), (what, k, got[k], want[k])


# --- 1. tokens and masks ---------------------------------------------------------------


@pytest.mark.parametrize("fmt", sorted(DATA))
def test_pair_ids_are_trls(
    files: dict[str, Path], trl_trainer: Callable[..., Trainer], fmt: str
) -> None:
    trainer = trl_trainer(fmt)
    theirs = _examples(trainer)
    assert len(theirs) == len(DATA[fmt])
    tok, template = load_tokenizer(files["base"]), load_chat_template(files["base"])
    vocab = load_config(files["base"]).vocab_size
    for i, (ex, want) in enumerate(zip(DATA[fmt], theirs, strict=True)):
        kind = pair_format(ex, f"{fmt}:{i}")
        ids = encode_pair(ex, kind, tok, template, vocab_size=vocab, where=f"{fmt}:{i}")
        assert list(ids) == [want["prompt_ids"], want["chosen_ids"], want["rejected_ids"]], i
    # Untruncated, the rows are prompt + completion and the labels the completion's ids.
    pairs, n_cut, _, _ = encode_pairs_file(files["base"], files[fmt], vocab, CONTEXT)
    assert n_cut == 0
    for pair, want in zip(pairs, theirs, strict=True):
        p = want["prompt_ids"]
        for row, c in ((pair.chosen, want["chosen_ids"]), (pair.rejected, want["rejected_ids"])):
            assert row.input_ids.tolist() == p + c
            assert row.labels.tolist() == [IGNORE_INDEX] * len(p) + c


# Cuts that shorten some rows of every file and leave every prompt shorter than the cut
# under keep_start (TRL drops such a pair, we refuse it); under keep_end the text cut goes
# through a whole prompt, so a completion token lands on position 0.
CUTS = {
    "text": {"keep_start": 10, "keep_end": 8},
    "chat": {"keep_start": 36, "keep_end": 30},
    "chat_implicit": {"keep_start": 64, "keep_end": 64},
}


def _ours_pairs(files: dict[str, Path], fmt: str, mode: Truncation | None) -> tuple[list, int]:
    """Our pairs of ``fmt`` cut as ``mode`` (None: uncut) says, and how many were cut."""
    length = CONTEXT if mode is None else CUTS[fmt][mode]
    vocab = load_config(files["base"]).vocab_size
    pairs, n_cut, _, _ = encode_pairs_file(
        files["base"], files[fmt], vocab, length, truncation_mode=mode or "keep_start"
    )
    return pairs, n_cut


def _trl_for(
    trl_trainer: Callable[..., Trainer], fmt: str, mode: Truncation | None, **kw: Any
) -> Any:
    if mode is None:
        return trl_trainer(fmt, **kw)
    return trl_trainer(fmt, max_length=CUTS[fmt][mode], truncation_mode=mode, **kw)


@pytest.mark.parametrize("mode", [None, "keep_start", "keep_end"])
@pytest.mark.parametrize("fmt", sorted(DATA))
def test_rows_and_labels_are_trls_collator(
    files: dict[str, Path],
    trl_trainer: Callable[..., Trainer],
    fmt: str,
    mode: Truncation | None,
) -> None:
    trainer = _trl_for(trl_trainer, fmt, mode)
    examples = _examples(trainer)
    assert len(examples) == len(DATA[fmt])  # TRL dropped no pair
    batch = {k: v.numpy() for k, v in trainer.data_collator(examples).items()}  # [2P,T]
    n = len(examples)
    pairs, n_cut = _ours_pairs(files, fmt, mode)
    assert (n_cut > 0) == (mode is not None)

    def trl_row(r: int) -> tuple[list[int], list[int]]:
        t = int(batch["attention_mask"][r].sum())
        ids, counted = batch["input_ids"][r, :t], batch["completion_mask"][r, :t] == 1
        counted[0] = False  # position 0 is no position's target
        return ids.tolist(), np.where(counted, ids, IGNORE_INDEX).tolist()

    for i, pair in enumerate(pairs):  # TRL: chosen rows first, then rejected rows
        for row, r in ((pair.chosen, i), (pair.rejected, n + i)):
            assert (row.input_ids.tolist(), row.labels.tolist()) == trl_row(r), (i, r)
    if fmt == "text" and mode == "keep_end":  # the cut took a whole prompt
        assert batch["completion_mask"][:, 0].any()

    # The batches the engine takes: pair order[j] in rows 2j (chosen) and 2j + 1 (rejected).
    tok = load_tokenizer(files["base"])
    (made,) = pair_batches(pairs, n, 1, BUCKETS, seed=0, epoch=0, pad_id=tok.pad_id)
    for j, i in enumerate(epoch_order(n, seed=0, epoch=0)):
        for row, r in ((2 * j, i), (2 * j + 1, n + i)):
            t = int(made["attention_mask"][0, row].sum())
            ids, labels = trl_row(r)
            assert made["input_ids"][0, row, :t].tolist() == ids
            assert made["labels"][0, row].tolist() == labels + [IGNORE_INDEX] * (CONTEXT - t)


# --- 2. loss and metrics -------------------------------------------------------------------

LOSS_CASES = [  # (format, loss, TRL's mode, truncation)
    ("text", "sigmoid", "train", None),
    ("text", "ipo", "eval", None),
    ("chat", "sigmoid", "eval", None),
    ("chat", "ipo", "train", None),
    ("chat_implicit", "sigmoid", "train", None),
    ("chat_implicit", "ipo", "eval", None),
    ("text", "sigmoid", "eval", "keep_end"),
    ("chat", "ipo", "eval", "keep_start"),
]


@pytest.mark.parametrize(("fmt", "loss_type", "mode", "cut"), LOSS_CASES)
def test_loss_and_metrics_are_trls(
    files: dict[str, Path],
    trl_trainer: Callable[..., Trainer],
    engine_model: Any,
    fmt: str,
    loss_type: str,
    mode: str,
    cut: Truncation | None,
) -> None:
    trainer = _trl_for(trl_trainer, fmt, cut, loss_type=loss_type)
    examples = _examples(trainer)
    if loss_type == "ipo":  # no completion token on position 0 (see the module docstring)
        assert not trainer.data_collator(examples)["completion_mask"][:, 0].any()
    want = _trl_metrics(trainer, examples, mode)
    assert abs(want["rewards/margins"]) > 1e-2  # the adapter moves the policy off the base

    objective = DPOConfig(beta=BETA, loss_type=loss_type)  # type: ignore[arg-type]
    pairs, _ = _ours_pairs(files, fmt, cut)
    pad_id = load_tokenizer(files["base"]).pad_id
    jax_out = _ours_jax(engine_model, pairs, objective, pad_id)
    assert jax_out["pairs"] == len(examples)
    _assert_close(jax_out, want, "jax")
    numpy_out = evaluate_preferences(
        files["base"],
        files[fmt],
        objective,
        adapter=files["adapter"],
        backend="numpy",
        max_length=CONTEXT if cut is None else CUTS[fmt][cut],
        truncation_mode=cut or "keep_start",
        batch_size=3,
    )
    _assert_close(numpy_out, want, "numpy")


# --- 3. conservative DPO -------------------------------------------------------------------

EPS = 0.2


@pytest.mark.parametrize("fmt", ["text", "chat_implicit"])
def test_label_smoothing_is_trls_aot_on_single_pairs(
    files: dict[str, Path], trl_trainer: Callable[..., Trainer], engine_model: Any, fmt: str
) -> None:
    pairs, _ = _ours_pairs(files, fmt, None)
    pad_id = load_tokenizer(files["base"]).pad_id
    conservative = DPOConfig(beta=BETA, label_smoothing=EPS)
    aot = trl_trainer(fmt, loss_type="aot", label_smoothing=EPS)
    losses = []
    for pair, example in zip(pairs, _examples(aot), strict=True):
        want = _trl_metrics(aot, [example], "eval")
        _assert_close(_ours_jax(engine_model, [pair], conservative, pad_id), want, "jax")
        losses.append(want["loss"])
    numpy_out = evaluate_preferences(
        files["base"], files[fmt], conservative, adapter=files["adapter"], backend="numpy"
    )
    assert abs(numpy_out["loss"] - np.mean(losses)) <= TOL

    # TRL 1.16's sigmoid loss drops label_smoothing: it is plain DPO, which ours with
    # label_smoothing is not.
    smoothed = _trl_metrics(trl_trainer(fmt, label_smoothing=EPS), _examples(aot), "eval")
    plain = _ours_jax(engine_model, pairs, DPOConfig(beta=BETA), pad_id)
    assert abs(smoothed["loss"] - plain["loss"]) <= TOL
    ours = _ours_jax(engine_model, pairs, conservative, pad_id)
    assert abs(ours["loss"] - smoothed["loss"]) > 100 * TOL


# --- 4. perturbations are caught -----------------------------------------------------------


def test_a_wrong_beta_or_label_boundary_misses_trl(
    files: dict[str, Path], trl_trainer: Callable[..., Trainer], engine_model: Any
) -> None:
    trainer = trl_trainer("text")
    want = _trl_metrics(trainer, _examples(trainer), "eval")
    pairs, _ = _ours_pairs(files, "text", None)
    pad_id = load_tokenizer(files["base"]).pad_id
    right = _ours_jax(engine_model, pairs, DPOConfig(beta=BETA), pad_id)
    _assert_close(right, want, "jax")
    wrong = evaluate_preferences(
        files["base"],
        files["text"],
        DPOConfig(beta=1.5 * BETA),
        adapter=files["adapter"],
        backend="numpy",
    )
    assert abs(wrong["loss"] - want["loss"]) > 100 * TOL
    assert abs(wrong["rewards/margins"] - want["rewards/margins"]) > 100 * TOL

    # The last prompt token counted as the completion's first.
    def widen(row: Encoded) -> Encoded:
        labels = row.labels.copy()
        first = int(np.argmax(labels != IGNORE_INDEX))
        labels[first - 1] = row.input_ids[first - 1]
        return dataclasses.replace(row, labels=labels)

    shifted = [dataclasses.replace(p, chosen=widen(p.chosen)) for p in pairs]
    off = _ours_jax(engine_model, shifted, DPOConfig(beta=BETA), pad_id)
    assert abs(off["logps/chosen"] - want["logps/chosen"]) > 100 * TOL
    assert abs(off["loss"] - want["loss"]) > 100 * TOL
