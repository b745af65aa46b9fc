"""``qlora-spec pretrain`` from scratch on a tiny model, and the shipped base model: what
``qlora-spec pretrain`` with its defaults writes (config, tokenizer, provenance)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jax_impl.apps import corpus
from jax_impl.apps.cli import main
from jax_impl.apps.demo import BASE
from jax_impl.apps.pretrain import (
    PretrainConfig,
    model_config,
    pretrain,
    recorded_config,
    train_tokenizer,
)
from jax_impl.train.data import load_tokenizer
from ref_numpy.formats import hf as hf_io

TINY: dict[str, Any] = dict(
    docs=400,
    vocab_size=300,
    d_model=32,
    n_layers=1,
    n_heads=2,
    n_kv_heads=1,
    d_ff=64,
    max_length=64,
    steps=40,
    batch_size=4,
    lr=1e-2,
    warmup_steps=4,
)


def losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_pretrain_from_scratch(tmp_path: Path) -> None:
    out = tmp_path / "base"
    summary = pretrain(PretrainConfig(out=str(out), **TINY), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]  # no work dir left behind
    cfg, params = hf_io.load_model(out)
    assert params["embed"]["embedding"].shape == (cfg.vocab_size, 32)
    assert cfg == model_config(PretrainConfig(out="x", **TINY), cfg.vocab_size)
    assert summary["trainable_params"] == hf_io.n_params(cfg)
    tok = load_tokenizer(out)
    assert (tok.bos_token, tok.eos_token, tok.pad_id) == ("<|bos|>", "<|eos|>", 2)
    loss = losses(out)
    assert len(loss) == 40 and np.mean(loss[-5:]) < 0.8 * np.mean(loss[:3])
    assert json.loads((out / "pretrain_config.json").read_text())["steps"] == 40
    with pytest.raises(FileExistsError, match="exists"):
        pretrain(PretrainConfig(out=str(out), **TINY), progress=False)


def test_pretrain_flags_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pretrain"]) == 2
    assert "--out is required" in capsys.readouterr().err
    assert main(["pretrain", "--out", str(tmp_path / "m"), "--n-heads", "3"]) == 2
    assert "n_heads 3 must divide d_model" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    assert main(["pretrain", "--out", str(tmp_path / "m"), "--data", str(bad)]) == 2
    assert f"{bad}:2: expected an object with a string field 'text'" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_shipped_base_is_the_default_pretrain() -> None:
    recorded = json.loads((BASE / "pretrain_config.json").read_text())
    defaults = recorded_config(PretrainConfig(out="anywhere"))
    assert recorded == defaults  # `qlora-spec pretrain --out DIR` reproduces it
    cfg = hf_io.load_config(BASE)
    assert cfg == model_config(PretrainConfig(out="x"), cfg.vocab_size)
    size = sum(p.stat().st_size for p in BASE.iterdir())
    assert size <= 25 * 2**20
    texts = list(corpus.corpus(defaults["docs"], seed=defaults["corpus_seed"]))
    fresh = json.loads(train_tokenizer(texts, defaults["vocab_size"]).to_str())
    assert json.loads((BASE / "tokenizer.json").read_text()) == fresh
    summary = json.loads((BASE / "summary.json").read_text())
    assert summary["steps"] == defaults["steps"] and summary["final_train_loss"] < 1.5
