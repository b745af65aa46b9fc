"""``qlora-spec pretrain``: a base model trained from scratch by the same engine.

The run is three steps, each reproducible from the config alone:

1. the corpus: ``jax_impl.apps.corpus`` documents (or the ``text`` lines of a JSONL file);
2. a byte-level BPE tokenizer trained on it (``tokenizers``), digits kept one per token so
   numbers are spelled digit by digit;
3. a Llama-family model initialised by the spec (``ref_numpy.model.init_params``) and fully
   trained on the packed corpus by ``jax_impl.train.trainer.fit``.

The output is a Hugging Face model directory (``config.json``, ``model.safetensors``,
``tokenizer.json``, ``tokenizer_config.json``) with the run's metrics, loss curve and config.
The model shipped in ``jax_impl/assets/base`` is ``qlora-spec pretrain`` with the defaults
below (see ``docs/demo.md``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from ref_numpy.config import ModelConfig, llama_config
from ref_numpy.formats import files, hf
from ref_numpy.model import init_params

from ..model import EngineConfig, from_spec, to_spec
from ..train.data import bucket_lengths, encode, load_tokenizer, pack, read_jsonl
from ..train.data import fit as cut_to_length
from ..train.trainer import OptimConfig, Trainer, fit
from . import corpus
from .train import (
    DataConfig,
    Progress,
    Throughput,
    epoch_batches,
    log_metrics,
    move_into,
    plot_loss,
    run_summary,
)

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
# Words with their leading space, single digits, runs of other symbols, whitespace.
SPLIT = r" ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+"


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Everything ``qlora-spec pretrain`` takes; field names are the flags, ``metadata["help"]``
    their help."""

    out: str = field(metadata={"help": "output model directory", "metavar": "DIR"})
    data: str | None = field(
        default=None,
        metadata={
            "help": 'JSONL file with a string field "text" per line',
            "metavar": "FILE",
            "default_text": "the generated corpus",
        },
    )
    docs: int = field(default=60_000, metadata={"help": "documents of the generated corpus"})
    corpus_seed: int = field(default=0, metadata={"help": "seed of the generated corpus"})
    vocab_size: int = field(
        default=1024, metadata={"help": "BPE vocabulary, special tokens included"}
    )
    d_model: int = field(default=192, metadata={"help": "model width D"})
    n_layers: int = field(default=4, metadata={"help": "decoder blocks"})
    n_heads: int = field(default=4, metadata={"help": "N query heads"})
    n_kv_heads: int = field(
        default=2, metadata={"help": "K key/value heads (grouped-query attention)"}
    )
    d_ff: int = field(default=512, metadata={"help": "F, SwiGLU hidden width"})
    max_length: int = field(
        default=256, metadata={"help": "tokens per packed row, and the model's context"}
    )
    steps: int = field(default=800, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=16, metadata={"help": "rows per step"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate"})
    warmup_steps: int = field(
        default=80, metadata={"help": "steps of linear warmup from 0 to the peak --lr"}
    )
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW decoupled weight decay"})
    init_std: float = field(
        default=0.02, metadata={"help": "standard deviation of the normal init of every matrix"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the init and the data order"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing --out"})

    def __post_init__(self) -> None:
        for name in (
            "docs",
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "steps",
        ):
            if not getattr(self, name) >= 1:
                raise ValueError(f"PretrainConfig.{name}: expected >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"PretrainConfig: n_heads {self.n_heads} must divide d_model {self.d_model}, "
                f"and n_kv_heads {self.n_kv_heads} must divide n_heads"
            )


def train_tokenizer(texts: list[str], vocab_size: int) -> tokenizers.Tokenizer:
    """A byte-level BPE tokenizer of ``vocab_size`` ids (bos, eos, pad first) over ``texts``.

    Every byte is in the alphabet, so any string encodes, and ``decode(encode(s)) == s``. Its
    post-processor starts every text with BOS, as the model is pretrained, so transformers'
    ``tokenizer(text)`` and the training data path both give the ids the model knows.
    """
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(tokenizers.Regex(SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos = (BOS, tok.token_to_id(BOS))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[bos]
    )
    return tok


def model_config(pc: PretrainConfig, vocab_size: int) -> ModelConfig:
    """The Llama-family architecture of the pretrained model (tied embeddings, GQA)."""
    return llama_config(
        vocab_size=vocab_size,
        d_model=pc.d_model,
        n_layers=pc.n_layers,
        n_heads=pc.n_heads,
        n_kv_heads=pc.n_kv_heads,
        d_ff=pc.d_ff,
        max_seq_len=pc.max_length,
        tie_embeddings=True,
    )


def write_tokenizer(pc: PretrainConfig, tok: tokenizers.Tokenizer, out_dir: Path) -> None:
    """``tokenizer.json`` and ``tokenizer_config.json`` (special tokens, context) in
    ``out_dir``."""
    tok.save(str(out_dir / "tokenizer.json"))
    files.write_json(
        out_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "model_max_length": pc.max_length,
        },
    )


def corpus_texts(pc: PretrainConfig) -> list[str]:
    """The documents to pretrain on."""
    if pc.data is None:
        return list(corpus.corpus(pc.docs, seed=pc.corpus_seed))
    rows = read_jsonl(pc.data)
    for i, r in enumerate(rows, 1):
        if not isinstance(r.get("text"), str):
            raise ValueError(f"{pc.data}:{i}: expected an object with a string field 'text'")
    return [r["text"] for r in rows]


def recorded_config(pc: PretrainConfig) -> dict[str, Any]:
    """What ``pretrain_config.json`` records: every field that decides the model."""
    return {k: v for k, v in dataclasses.asdict(pc).items() if k not in ("out", "overwrite")}


def pretrain(pc: PretrainConfig, progress: bool = True) -> dict[str, Any]:
    """Corpus, tokenizer, init, then full training into ``pc.out`` (the model, tokenizer,
    metrics.jsonl, loss.png, summary.json, pretrain_config.json); returns the summary."""
    out = Path(pc.out)
    if out.exists() and not pc.overwrite:
        raise FileExistsError(f"{out}: exists (pass --overwrite to replace it)")
    texts = corpus_texts(pc)
    with files.atomic_dir(out, pc.overwrite) as tmp:
        write_tokenizer(pc, train_tokenizer(texts, pc.vocab_size), tmp)
        tok = load_tokenizer(tmp)  # as the data path and transformers read it
        cfg = model_config(pc, tok.vocab_size)
        params = init_params(cfg, np.random.default_rng(pc.seed), std=pc.init_std)
        encoded = encode([{"text": t} for t in texts], "text", tok, vocab_size=cfg.vocab_size)
        encoded, truncated = cut_to_length(encoded, pc.max_length)
        rows = pack(encoded, pc.max_length)
        optim = OptimConfig(lr=pc.lr, warmup_steps=pc.warmup_steps, weight_decay=pc.weight_decay)
        trainer = Trainer.create(
            from_spec(params, cfg, None, EngineConfig()), optim.for_steps(pc.steps), pc.seed
        )
        data = DataConfig(batch_size=pc.batch_size, max_length=pc.max_length)
        buckets = bucket_lengths(pc.max_length)
        bar = Progress(pc.steps, 0, progress)
        with (tmp / "metrics.jsonl").open("w") as log:
            history = fit(
                trainer,
                epoch_batches(trainer, rows, data, buckets, seed=pc.seed, pad_id=tok.pad_id),
                steps=pc.steps,
                hooks=[Throughput(), log_metrics(log), bar],
            )
        bar.close()
        model = trainer.model()
        hf.save_model(to_spec(model), cfg, tmp / "model")
        move_into(tmp / "model", tmp)
        stats = {"format": "text", "examples": len(encoded), "truncated": truncated}
        summary = run_summary(model, {**stats, "eval_examples": 0}, pc.steps, history[-1])
        files.write_json(tmp / "summary.json", summary)
        plot_loss(tmp / "metrics.jsonl", tmp / "loss.png")
        files.write_json(tmp / "pretrain_config.json", recorded_config(pc))
    return summary
