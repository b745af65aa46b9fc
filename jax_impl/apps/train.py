"""``qlora-spec train``: a thin job around ``trainer.fit`` that owns the files.

``TrainConfig`` composes the configs each part owns (``LoraConfig`` from the spec,
``OptimConfig`` from the trainer, ``EngineConfig`` from the model, ``DataConfig`` here) and
adds what only a run has: paths, step count, seeds, checkpoints. The CLI makes one flag per
leaf field from their metadata. ``run`` reads the checkpoint and the JSONL file, resumes an
unfinished run, calls ``fit`` with hooks for the metrics log, progress bar, evaluation and
checkpoints, and writes the output directory atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import field
from pathlib import Path
from typing import IO, Any, Literal, cast

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from ref_numpy.config import (
    ALL_LINEAR,
    LoraConfig,
    ModelConfig,
    attn_shapes,
    check_fields,
    mlp_shapes,
    projection_paths,
)
from ref_numpy.formats import bnb, files, hf
from ref_numpy.formats.files import fault_point
from ref_numpy.lora import selected_paths
from ref_numpy.nf4 import nf4_bits_per_param

from ..model import EngineConfig, Model, bf16_widened, to_spec, trainable_params
from ..preference import REWARD_METRICS
from ..train.checkpoint import save_adapter
from ..train.data import (
    DataError,
    Row,
    batches,
    bucket_lengths,
    encode_file,
    epoch_order,
    num_batches,
    pack,
    unpacked_rows,
)
from ..train.data.pairs import Pair, Truncation, encode_pairs_file, pair_batches
from ..train.orbax_state import TrainCheckpoints
from ..train.sharded_load import load_sharded
from ..train.sharding import (
    DistributedConfig,
    MeshConfig,
    initialize_distributed,
    make_mesh,
    parse_mesh,
    process_rows,
    process_sum,
    shard_batch,
    shard_trainer,
    to_host,
)
from ..train.trainer import (
    DPOConfig,
    OptimConfig,
    Trainer,
    TrainingDiverged,
    batch_reference_logps,
    eval_loss,
    eval_preference,
    fit,
)

Method = Literal["full", "lora", "qlora"]
Objective = Literal["sft", "dpo"]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """How the examples become batches."""

    batch_size: int = field(default=4, metadata={"help": "rows per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_length: int | None = field(
        default=None,
        metadata={
            "help": "tokens per row, at most the model's max_position_embeddings",
            "default_text": "the model's context, at most 512",
        },
    )
    packing: bool = field(default=True, metadata={"help": "pack several examples into a row"})
    eval_split: float = field(
        default=0.0, metadata={"help": "fraction of the examples held out for an eval loss"}
    )
    train_on_prompt: bool = field(
        default=False, metadata={"help": "count prompt tokens in the loss too"}
    )
    on_overflow: Literal["truncate", "error"] = field(
        default="truncate",
        metadata={"help": "an example longer than --max-length is cut (truncate) or refused"},
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={
            "help": "tokens a pair's prompt keeps before --max-length cuts the sequence "
            "(--objective dpo)",
            "default_text": "no limit",
        },
    )
    truncation_mode: Truncation = field(
        default="keep_start",
        metadata={
            "help": "what a pair longer than --max-length keeps (--objective dpo): its first "
            "tokens (keep_start) or its last (keep_end), as TRL's truncation_mode"
        },
    )

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("batch_size", "grad_accum", "max_length", "max_prompt_length"):
            value = getattr(self, name)
            if value is not None and not value >= 1:
                raise ValueError(f"DataConfig.{name}: expected >= 1, got {value}")
        if not 0.0 <= self.eval_split < 1.0:
            raise ValueError(f"DataConfig.eval_split: expected 0 <= x < 1, got {self.eval_split}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything ``qlora-spec train`` takes. The leaf field names are the flags
    (``data_config.max_length`` -> ``--max-length``; ``metadata["flag"]`` where a name is
    taken), ``metadata["help"]`` their help, ``metadata["default_text"]`` the default in
    words where the value alone does not say it."""

    model: str = field(
        metadata={
            "help": "Hugging Face model directory (float or NF4 checkpoint)",
            "metavar": "DIR",
            "default_text": "the bundled base model, when --data is left out too",
        }
    )
    data: str = field(
        metadata={
            "help": "JSONL file of training examples",
            "metavar": "FILE",
            "default_text": "the bundled task, when --model is left out too",
        }
    )
    out: str = field(
        metadata={
            "help": "output directory, written only when the run completes",
            "metavar": "DIR",
            "default_text": "qlora-spec-train, with the bundled model and task",
        }
    )
    method: Method = field(
        default="qlora",
        metadata={
            "help": "what trains: every weight (full), adapters beside a float base (lora) "
            "or beside an NF4 base (qlora)"
        },
    )
    objective: Objective = field(
        default="sft",
        metadata={
            "help": "what is learned: the completions (sft), or to prefer each pair's chosen "
            "completion to its rejected one (dpo: DPO / IPO on prompt/chosen/rejected data)"
        },
    )
    lora: LoraConfig = field(
        default_factory=LoraConfig, metadata={"help": "LoRA adapters (lora, qlora)"}
    )
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "optimizer"})
    dpo: DPOConfig = field(
        default_factory=DPOConfig, metadata={"help": "preference tuning (--objective dpo)"}
    )
    engine: EngineConfig = field(
        default_factory=EngineConfig, metadata={"help": "dtypes, attention, remat, NF4"}
    )
    data_config: DataConfig = field(default_factory=DataConfig, metadata={"help": "batches"})
    distributed: DistributedConfig = field(
        default_factory=DistributedConfig,
        metadata={"help": "the device mesh, and how the processes of a multi-process run meet"},
    )
    steps: int | None = field(
        default=None,
        metadata={"help": "optimizer steps", "default_text": "--epochs passes over the data"},
    )
    epochs: int = field(
        default=1, metadata={"help": "passes over the data, when --steps is not given"}
    )
    eval_interval: int = field(
        default=0,
        metadata={"help": "steps between eval losses, with --eval-split; 0: only at the end"},
    )
    seed: int = field(default=0, metadata={"help": "seed of the data order and of dropout"})
    checkpoint_interval: int = field(
        default=50, metadata={"help": "steps between resumable checkpoints"}
    )
    resume: bool = field(
        default=False,
        metadata={
            "help": "continue the unfinished run for this --out from its last checkpoint "
            "(refused if the config or data changed)"
        },
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "replace an existing --out, or start an unfinished run again"},
    )

    def __post_init__(self) -> None:
        check_fields(self)
        quantize = self.method == "qlora"  # the engine's quantize is --method's to say
        if self.engine.quantize != quantize:
            object.__setattr__(self, "engine", dataclasses.replace(self.engine, quantize=quantize))
        for name in ("epochs", "checkpoint_interval", "steps"):
            value = getattr(self, name)
            if value is not None and not value >= 1:
                raise ValueError(f"TrainConfig.{name}: expected >= 1, got {value}")
        if self.eval_interval < 0:
            raise ValueError(f"TrainConfig.eval_interval: expected >= 0, got {self.eval_interval}")
        if self.objective == "dpo" and self.data_config.train_on_prompt:
            raise ValueError(
                "TrainConfig.objective: --objective dpo compares completions only; "
                "--train-on-prompt is for --objective sft"
            )
        if self.eval_interval and not self.data_config.eval_split:
            raise ValueError(
                f"TrainConfig.eval_interval: --eval-interval {self.eval_interval} needs "
                "--eval-split > 0 (without it nothing is held out to evaluate)"
            )

    def work_dir(self) -> Path:
        """Where checkpoints of an unfinished run live (beside --out, never in it)."""
        out = Path(self.out)
        return out.parent / f".{out.name}.run"


def resolve_max_length(max_length: int | None, context: int) -> int:
    """``max_length``, or ``min(512, context)`` when None; refuses one above ``context`` (the
    model's ``max_position_embeddings``), naming the flag."""
    if max_length is None:
        return min(512, context)
    if max_length > context:
        raise ValueError(
            f"--max-length {max_length} exceeds the model's max_position_embeddings ({context})"
        )
    return max_length


def check_batch_fits(batch_size: int, mesh: MeshConfig) -> None:
    """Refuse a ``--batch-size`` that does not divide over the devices that split a batch's
    rows (``data`` x ``fsdp`` of ``--mesh``), naming both flags."""
    split = mesh.data * mesh.fsdp
    if batch_size % split:
        raise ValueError(
            f"--batch-size {batch_size}: does not divide over the {split} devices of --mesh "
            f"{mesh} that split a batch (data x fsdp); use a multiple of {split} "
            "(--grad-accum adds rows per step without devices)"
        )


def resolve_lora(lora: LoraConfig, cfg: ModelConfig) -> LoraConfig:
    """``lora`` checked against ``cfg`` (``ref_numpy.lora.selected_paths``: every target
    selects a projection, every layer exists) with ``all-linear`` spelled out as the names of
    every projection of a block (PEFT's meaning: every linear layer but the output head)."""
    selected_paths(projection_paths(cfg), cfg, lora)
    if lora.targets != (ALL_LINEAR,):
        return lora
    names = tuple(sorted({*attn_shapes(cfg), *mlp_shapes(cfg)}))
    return dataclasses.replace(lora, targets=names)


def prepare_rows(
    tc: TrainConfig, max_length: int, vocab_size: int
) -> tuple[list[Row], list[Row], Any, dict]:
    """Train rows, eval rows, the tokenizer and data statistics, from the JSONL file."""
    dc = tc.data_config
    encoded, truncated, tok, fmt = encode_file(
        tc.model,
        tc.data,
        vocab_size,
        max_length,
        train_on_prompt=dc.train_on_prompt,
        on_overflow=dc.on_overflow,
    )
    train, held = split_held_out(encoded, tc)
    to_rows = (lambda e: pack(e, max_length)) if dc.packing else unpacked_rows
    stats = {
        "format": fmt,
        "examples": len(encoded),
        "truncated": truncated,
        "eval_examples": len(held),
    }
    return to_rows(train), (to_rows(held) if held else []), tok, stats


def prepare_pairs(
    tc: TrainConfig, max_length: int, vocab_size: int
) -> tuple[list[Pair], list[Pair], Any, dict]:
    """Train pairs, eval pairs, the tokenizer and data statistics, from a preference JSONL
    file (``data.pairs``); says on stderr how many pairs ``--max-length`` (and
    ``--max-prompt-length``) cut."""
    dc = tc.data_config
    pairs, truncated, tok, fmt = encode_pairs_file(
        tc.model,
        tc.data,
        vocab_size,
        max_length,
        max_prompt_length=dc.max_prompt_length,
        truncation_mode=dc.truncation_mode,
    )
    if truncated and jax.process_index() == 0:
        print(
            f"qlora-spec train: {truncated} of {len(pairs)} pairs in {tc.data} truncated to "
            f"--max-length {max_length} ({dc.truncation_mode})",
            file=sys.stderr,
        )
    train, held = split_held_out(pairs, tc)
    stats = {"format": fmt, "pairs": len(pairs), "truncated": truncated, "eval_pairs": len(held)}
    return train, held, tok, stats


def split_held_out(items: list[Any], tc: TrainConfig) -> tuple[list[Any], list[Any]]:
    """``(train, held out)``: ``--eval-split`` of ``items`` drawn by ``--seed``, the rest in
    file order."""
    eval_split = tc.data_config.eval_split
    order = np.random.default_rng(tc.seed).permutation(len(items))
    n_eval = round(eval_split * len(items))
    if eval_split and not n_eval:
        raise DataError(
            f"{tc.data}: --eval-split {eval_split} of {len(items)} examples holds out none"
        )
    held = [items[i] for i in order[:n_eval]]
    train = [items[i] for i in sorted(order[n_eval:])]
    if not train:
        raise DataError(f"{tc.data}: no training examples left after the eval split")
    return train, held


def epoch_batches(
    trainer: Trainer,
    rows: list[Row] | list[Pair],
    dc: DataConfig,
    buckets: list[int],
    *,
    seed: int,
    pad_id: int | None,
    part: tuple[int, int] | None = None,
    ref_logps: np.ndarray | None = None,
) -> Iterator[dict[str, Any]]:
    """Batches from the trainer's position on, epoch after epoch, without end: each epoch's
    order is fixed by ``(seed, epoch)``, so a resumed run sees the batches it would have.
    ``rows``: rows (``batches``) or preference pairs (``pair_batches``, with their
    precomputed ``ref_logps`` [n, 2] where given); ``part``: this process's rows of each
    micro-batch; default: every row."""
    per_epoch = num_batches(len(rows), dc.batch_size, dc.grad_accum)
    paired = bool(rows) and isinstance(rows[0], Pair)
    while True:
        epoch, start = divmod(trainer.step_count, per_epoch)
        kw: dict[str, Any] = dict(seed=seed, epoch=epoch, start=start, pad_id=pad_id, part=part)
        if paired:
            pairs: Any = rows
            yield from pair_batches(
                pairs, dc.batch_size, dc.grad_accum, buckets, **kw, ref_logps=ref_logps
            )
        else:
            yield from batches(rows, dc.batch_size, dc.grad_accum, buckets, **kw)  # type: ignore[arg-type]


# --- hooks: what a job does after each step ---------------------------------------------


class Throughput:
    """Adds ``tokens`` (real input tokens), ``loss_tokens`` (counted in the loss) and their
    rates per second since the hook was made, all of the global batch.

    In a multi-process run each process holds some rows of the batch; their input tokens are
    summed over the processes (a collective), and ``copies`` is how many processes hold each
    row (more than 1 only where the ``tensor`` axis spans processes)."""

    def __init__(self, copies: int = 1) -> None:
        self.start, self.tokens, self.loss_tokens = time.perf_counter(), 0, 0
        self.copies = copies

    def __call__(self, trainer: Trainer, batch: dict[str, Any], m: dict[str, Any]) -> None:
        tokens = process_sum(int(batch["attention_mask"].sum())) // self.copies
        loss_tokens = int(m.pop("tokens"))  # counted by the step over the global batch
        self.tokens, self.loss_tokens = self.tokens + tokens, self.loss_tokens + loss_tokens
        seconds = time.perf_counter() - self.start
        m.update(
            tokens=tokens,
            loss_tokens=loss_tokens,
            tokens_per_s=self.tokens / seconds,
            loss_tokens_per_s=self.loss_tokens / seconds,
        )


class Progress:
    """A tqdm bar with the loss and token rates."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, unit="step")

    def __call__(self, trainer: Trainer, batch: dict[str, Any], m: dict[str, Any]) -> None:
        self.bar.update(1)
        shown = {"loss": f"{m['loss']:.4f}"}
        if "rewards/accuracies" in m:  # a preference run: TRL's two headline figures
            shown["acc"] = f"{m['rewards/accuracies']:.2f}"
            shown["margin"] = f"{m['rewards/margins']:.3f}"
        shown.update(tok_s=f"{m['tokens_per_s']:.0f}", loss_tok_s=f"{m['loss_tokens_per_s']:.0f}")
        self.bar.set_postfix(shown)

    def close(self) -> None:
        self.bar.close()


@contextlib.contextmanager
def appending(path: Path) -> Iterator[IO[str]]:
    """``path`` open for appending; an error closing it (the last lines not written, on a
    full disk) names it."""
    f = path.open("a")
    try:
        yield f
    finally:
        with files.naming(path):
            f.close()


def log_metrics(log: IO[str]) -> Any:
    """A hook that appends each step's metrics to ``log`` as a JSON line, flushed."""

    def hook(trainer: Trainer, batch: dict[str, Any], m: dict[str, Any]) -> None:
        with files.naming(getattr(log, "name", "metrics.jsonl")):  # a full disk names the log
            log.write(json.dumps(m) + "\n")
            log.flush()

    return hook


def every(interval: int, action: Any) -> Any:
    """A hook that calls ``action(trainer, metrics)`` every ``interval`` steps."""

    def hook(trainer: Trainer, batch: dict[str, Any], m: dict[str, Any]) -> None:
        if interval and m["step"] % interval == 0:
            action(trainer, m)

    return hook


class Stopped(Exception):
    """The run stopped on SIGINT or SIGTERM at a step boundary, its state checkpointed.

    ``signum`` is the signal; ``128 + signum`` is the conventional exit status."""

    def __init__(self, signum: int, step: int, work: Path) -> None:
        self.signum, self.step = signum, step
        where = (
            f"its checkpoint is in {work} (rerun with --resume to continue)"
            if step
            else "before the first step"
        )
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; {where}")


class StopRequests:
    """SIGINT and SIGTERM ask the run to stop at the next step boundary, once a checkpoint of
    that step is written; the first one also restores the default action of both, so a
    second one ends the process at once (losing only the step under way and a checkpoint not
    yet complete; the previous checkpoint stays whole). Installed only from the main thread."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        for s in self.previous:
            signal.signal(s, signal.SIG_DFL)
        print(
            f"qlora-spec train: {signal.Signals(signum).name}: stopping after this step, once its "
            "checkpoint is written (send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def __exit__(self, *exc: object) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def asked(self) -> int | None:
        """The signal that asked to stop, or None; the same answer on every process of a run
        (a collective there)."""
        if jax.process_count() > 1 and process_sum(int(self.signum is not None)):
            return self.signum or signal.SIGTERM
        return self.signum


# --- the train command --------------------------------------------------------------------


def run(tc: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """Train, then write ``tc.out`` (adapter or weights, metrics.jsonl, loss.png,
    train_config.json, summary.json). Returns the summary. Raises TrainingDiverged on a
    non-finite loss. A float64 ``dtype`` or ``param_dtype`` runs in JAX's 64-bit mode.

    In a multi-process run (``tc.distributed``) every process calls ``run`` with the same
    config: each reads its rows of every batch, all of them write the training-state
    checkpoints together, and process 0 alone writes the metrics log and ``tc.out``.

    Process 0 holds the lock file ``.<out>.lock`` beside ``tc.out`` meanwhile: a second run
    for the same ``tc.out`` raises ``files.Locked`` naming it and the holder's pid. SIGINT or
    SIGTERM stops the run at the next step boundary with a checkpoint of that step, raising
    Stopped (``StopRequests``). A file that cannot be written (a full or read-only disk) is an
    OSError naming it; the checkpoints written before it stay whole."""
    initialize_distributed(tc.distributed)  # before anything touches a device
    x64 = "float64" in (tc.engine.dtype, tc.engine.param_dtype)
    out = Path(tc.out)
    files.check_output_dir(out)
    lock = out.parent / f".{out.name}.lock"  # one run per --out (and so per work directory)
    with (
        files.exclusive(lock, f"a qlora-spec train writing {out}")
        if jax.process_index() == 0
        else contextlib.nullcontext(),
        jax.enable_x64(True) if x64 else contextlib.nullcontext(),
        StopRequests() as stop,
    ):
        return _run(tc, progress, stop)


def _barrier(name: str) -> None:
    """Every process of a multi-process run waits here for the others."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _run(tc: TrainConfig, progress: bool, stop: StopRequests) -> dict[str, Any]:
    out, work = Path(tc.out), tc.work_dir()
    lead = jax.process_index() == 0  # the process that writes files other than checkpoints
    if lead:  # what runs killed mid-write left (this process holds the lock)
        files.remove_stale(out)
        files.remove_stale(work)
    if tc.resume and exported_from(work, out):  # it had written --out when it was stopped
        _barrier("qlora-spec train: written before")  # every process has looked
        if lead:
            files.remove_tree(work)
            _note(f"--resume: {out} was written before the run stopped; {work} removed")
        return dict(json.loads((out / "summary.json").read_text()))
    if out.exists() and not tc.overwrite:
        raise FileExistsError(f"{out}: exists (pass --overwrite to replace it)")
    restart = work.exists() and not tc.resume
    if restart and not tc.overwrite:
        raise FileExistsError(
            f"{work}: an unfinished run for {out} (pass --resume to continue it, "
            "or --overwrite to start again)"
        )
    if bnb.is_nf4_checkpoint(tc.model) and tc.method != "qlora":
        raise ValueError(
            f"{tc.model}: a 4-bit (NF4) checkpoint; --method {tc.method} needs the float "
            "checkpoint (use --method qlora to train adapters beside the NF4 base)"
        )
    dc = tc.data_config
    mesh_cfg = parse_mesh(tc.distributed.mesh)
    check_batch_fits(dc.batch_size, mesh_cfg)
    mesh = make_mesh(mesh_cfg)
    base_cfg = hf.load_config(tc.model)
    max_length = resolve_max_length(dc.max_length, base_cfg.max_seq_len)
    tc = dataclasses.replace(  # as the run uses it, which train_config.json records
        tc,
        data_config=dataclasses.replace(dc, max_length=max_length),
        lora=tc.lora if tc.method == "full" else resolve_lora(tc.lora, base_cfg),
    )
    dc = tc.data_config
    _barrier("qlora-spec train: checked")  # every process has looked before anything changes
    if restart and lead:
        files.remove_tree(work)
    _barrier("qlora-spec train: work directory cleared")
    resuming = tc.resume and any(p.name.isdigit() for p in _entries(work / "state"))
    record = run_record(tc)
    if resuming:
        check_unchanged(work, record)
    # each device reads its own pieces of the checkpoint: no process holds the whole model
    lora = None if tc.method == "full" else tc.lora
    cfg, model = load_sharded(tc.model, lora, tc.engine, mesh)
    if lead and bf16_widened(tc.engine.dtype):  # asked for by name, not chosen by auto
        _note(
            "--dtype bfloat16: this CPU has no bf16 matrix units (AMX, AVX512-BF16), so XLA "
            "widens each product to float32 and the step is slower than under float32; "
            "--dtype auto computes in float32 here"
        )
    dpo = tc.dpo if tc.objective == "dpo" else None
    prepare = prepare_rows if dpo is None else prepare_pairs
    rows, held, tok, stats = prepare(tc, max_length, cfg.vocab_size)
    pad_id = tok.pad_id if tok is not None else None  # token-id data may come without one
    buckets = bucket_lengths(max_length)
    total = tc.steps or tc.epochs * num_batches(len(rows), dc.batch_size, dc.grad_accum)
    trainer = shard_trainer(
        Trainer.create(model, tc.optim.for_steps(total), dropout_seed=tc.seed, objective=dpo),
        mesh,
    )
    width = dc.batch_size * (1 if dpo is None else 2)  # rows per micro-batch: pairs are two
    part = process_rows(mesh, width)
    copies = jax.process_count() * (part[1] - part[0]) // width
    ref_logps = held_ref = None
    if dpo is not None and dpo.precompute_ref:  # the starting policy's, before any restore
        start, train_pairs, held_pairs = (
            trainer.model(),
            cast(list[Pair], rows),
            cast(list[Pair], held),
        )
        ref_logps = precompute_reference(start, train_pairs, dc, buckets, pad_id, mesh)
        if held_pairs:
            held_ref = precompute_reference(start, held_pairs, dc, buckets, pad_id, mesh)
    metrics_path = work / "metrics.jsonl"
    last: dict[str, Any] = {}
    work.mkdir(parents=True, exist_ok=True)
    ckpts = TrainCheckpoints(work / "state")
    restored = None
    say = _note if lead else _quiet
    if resuming:
        restored = ckpts.restore_intact(trainer.params, trainer.opt_state, say)
        if restored is None:
            say(f"--resume: no intact checkpoint in {work / 'state'}; starting again from step 0")
    if restored is not None:
        trainer.params, trainer.opt_state, meta = restored
        trainer.step_count = int(meta["step"])
        say(f"--resume: continuing from the checkpoint of step {trainer.step_count}")
        if lead:  # the log's lines up to the checkpoint; later steps will be computed again
            last = keep_metrics(metrics_path, trainer.step_count)
    elif lead:
        files.write_text(metrics_path, "")
        if not resuming:  # the record a later --resume is checked against
            for name, value in record.items():
                files.write_json(work / name, value)

    def held_loss(trainer: Trainer, m: dict[str, Any]) -> None:
        m.update(held_out(trainer, held, dc, buckets, pad_id, mesh, held_ref))

    def due(step: int) -> bool:
        return step % tc.checkpoint_interval == 0 or step == total

    def checkpoint(trainer: Trainer, m: dict[str, Any]) -> None:
        ckpts.poll()  # the checksums of a save finished in the background
        if due(m["step"]):
            ckpts.save(m["step"], trainer.params, trainer.opt_state, {"step": m["step"]})

    def stop_if_asked(trainer: Trainer, m: dict[str, Any]) -> None:
        signum = stop.asked()
        if signum is not None:
            if not due(m["step"]):
                ckpts.save(m["step"], trainer.params, trainer.opt_state, {"step": m["step"]})
            raise Stopped(signum, m["step"], work)

    bar = Progress(total, trainer.step_count, progress and lead)
    with (
        appending(metrics_path) if lead else contextlib.nullcontext() as log,
        ckpts,  # closing waits for the saves under way, and writes their checksums
    ):
        signum = stop.asked()
        if signum is not None:  # asked while loading: nothing new to save
            raise Stopped(signum, trainer.step_count, work)
        try:
            history = fit(
                trainer,
                epoch_batches(
                    trainer,
                    rows,
                    dc,
                    buckets,
                    seed=tc.seed,
                    pad_id=pad_id,
                    part=part,
                    ref_logps=ref_logps,
                ),
                steps=total,
                hooks=[
                    Throughput(copies),
                    every(tc.eval_interval if held else 0, held_loss),
                    *([log_metrics(log)] if log is not None else []),
                    bar,
                    every(1, checkpoint),
                    every(1, stop_if_asked),
                ],
            )
        except TrainingDiverged as e:
            raise TrainingDiverged(f"{e}; last good checkpoint kept in {work}") from None
    bar.close()
    last = history[-1] if history else last
    summary = run_summary(trainer.model(), stats, trainer.step_count, last)
    if held:
        summary.update(held_out(trainer, held, dc, buckets, pad_id, mesh, held_ref, final=True))
    # every process takes part in gathering the state; process 0 writes it
    final = nnx.merge(trainer.graphdef, to_host(trainer.params), to_host(trainer.rest))
    if lead:
        with files.atomic_dir(out, tc.overwrite) as tmp:
            if tc.method == "full":
                hf.save_model(to_spec(final), cfg, tmp / "model", tokenizer_from=tc.model)
                move_into(tmp / "model", tmp)
            else:
                save_adapter(final, tmp / "adapter", base_model=tc.model)
                move_into(tmp / "adapter", tmp)
            fault_point("export")
            shutil.copy2(metrics_path, tmp / "metrics.jsonl")
            shutil.copy2(work / "train_config.json", tmp / "train_config.json")  # first start's
            files.write_json(tmp / "summary.json", summary)
            plot_loss(tmp / "metrics.jsonl", tmp / "loss.png")
        fault_point("cleanup")
        files.remove_tree(work)
    _barrier("qlora-spec train: written")
    return summary


def _note(message: str) -> None:
    """A line about the run on stderr (``qlora-spec train: ...``)."""
    print(f"qlora-spec train: {message}", file=sys.stderr, flush=True)


def _quiet(message: str) -> None:
    """Where only process 0 speaks."""


def keep_metrics(path: Path, step: int) -> dict[str, Any]:
    """Rewrite the log ``path`` (whole or not at all) with its lines up to ``step``; returns
    the last one kept (empty if none). A last line cut short by a kill is dropped; another
    line that is not JSON is a ValueError naming its line."""
    lines = path.read_text().splitlines() if path.exists() else []
    kept = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: not valid JSON ({e.msg})") from None
        if row["step"] <= step:
            kept.append(line)
    files.write_text(path, "".join(x + "\n" for x in kept))
    return dict(json.loads(kept[-1])) if kept else {}


def exported_from(work: Path, out: Path) -> bool:
    """Whether ``out`` is the output of the unfinished run in ``work``: a run stopped after
    writing ``out`` and before removing ``work``. Their ``train_config.json`` and
    ``metrics.jsonl`` (with its wall-clock rates, unique to one run) are the same bytes."""
    try:
        return all(
            (out / name).read_bytes() == (work / name).read_bytes()
            for name in ("train_config.json", "metrics.jsonl")
        )
    except OSError:
        return False


def _entries(path: Path) -> list[Path]:
    """The entries of the directory ``path``; none if it does not exist."""
    return list(path.iterdir()) if path.is_dir() else []


def eval_batches(
    rows: list[Row] | list[Pair],
    dc: DataConfig,
    buckets: list[int],
    pad_id: int | None,
    mesh: Mesh | None = None,
    ref_logps: np.ndarray | None = None,
) -> Iterator[dict[str, Any]]:
    """The held-out rows (or pairs, with their precomputed ``ref_logps``) in batches
    ``[1, B, T]`` of ``dc.batch_size``, in order: NumPy arrays, or with ``mesh`` global
    arrays with this process's rows, split as training splits them."""
    paired = bool(rows) and isinstance(rows[0], Pair)
    width = dc.batch_size * (2 if paired else 1)
    part = None if mesh is None else process_rows(mesh, width)
    kw: dict[str, Any] = dict(seed=0, epoch=0, pad_id=pad_id, part=part)
    if paired:
        pairs: Any = rows
        made = pair_batches(pairs, dc.batch_size, 1, buckets, **kw, ref_logps=ref_logps)
    else:
        made = batches(rows, dc.batch_size, 1, buckets, **kw)  # type: ignore[arg-type]
    for batch in made:
        yield batch if mesh is None else shard_batch(batch, mesh)


def held_out(
    trainer: Trainer,
    held: list[Row] | list[Pair],
    dc: DataConfig,
    buckets: list[int],
    pad_id: int | None,
    mesh: Mesh | None,
    held_ref: np.ndarray | None,
    *,
    final: bool = False,
) -> dict[str, Any]:
    """The held-out figures a run logs: ``eval_loss`` (and, for a preference run,
    ``eval_rewards/accuracies`` and ``eval_rewards/margins``); with ``final`` also the
    counts (``eval_tokens``, or ``eval_pairs`` and every reward metric) for the summary."""
    made = eval_batches(held, dc, buckets, pad_id, mesh, held_ref)
    if trainer.objective is None:
        loss, tokens = eval_loss(trainer.model(), made)
        return {"eval_loss": loss, **({"eval_tokens": tokens} if final else {})}
    ev = eval_preference(trainer.model(), made, trainer.objective, trainer.ref_params)
    keys = list(ev) if final else ["loss", "rewards/accuracies", "rewards/margins"]
    return {f"eval_{k}": ev[k] for k in keys}


def precompute_reference(
    model: Model,
    pairs: list[Pair],
    dc: DataConfig,
    buckets: list[int],
    pad_id: int | None,
    mesh: Mesh,
) -> np.ndarray:
    """Every pair's reference log-probabilities, [n, 2] (chosen, rejected): ``model`` (the
    starting policy) with its adapters off, or as it is under full fine-tuning; computed once,
    in batches of ``dc.batch_size`` pairs."""
    order = epoch_order(len(pairs), seed=0, epoch=0)  # the order eval_batches draws
    out: np.ndarray | None = None
    for b, batch in enumerate(eval_batches(pairs, dc, buckets, pad_id, mesh)):
        lp = np.asarray(to_host(batch_reference_logps(model, batch))).reshape(-1, 2)  # [B,2]
        idx = order[b * dc.batch_size : (b + 1) * dc.batch_size]
        out = np.zeros((len(pairs), 2), lp.dtype) if out is None else out
        out[idx] = lp[: len(idx)]
    assert out is not None
    return out


def move_into(src: Path, dst: Path) -> None:
    """Move every file of the directory ``src`` into ``dst``, then remove ``src``."""
    for f in src.iterdir():
        f.rename(dst / f.name)
    src.rmdir()


def run_record(tc: TrainConfig) -> dict[str, Any]:
    """What a run's work directory records when it starts, for ``--resume`` to check:
    ``train_config.json`` (every field, as resolved for the model) and ``inputs.json``
    (size and sha256 of the data file and of the model's ``config.json``)."""
    return {
        "train_config.json": json.loads(json.dumps(dataclasses.asdict(tc))),
        "inputs.json": {
            "data": _file_id(Path(tc.data)),
            "model_config": _file_id(Path(tc.model) / "config.json"),
        },
    }


def _file_id(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


# may change on --resume: how the run is driven, not what it computes
RESUME_EXEMPT = (
    "resume",
    "overwrite",
    "checkpoint_interval",
    *(f.name for f in dataclasses.fields(DistributedConfig)),  # the mesh, the processes
)


def leaves(record: dict[str, Any]) -> dict[str, Any]:
    """A recorded config's leaf fields by name: ``{"lora": {"rank": 8}}`` -> ``{"rank": 8}``;
    a name two sections share is given with its path (``lora.seed``)."""

    def walk(tree: dict[str, Any], prefix: tuple[str, ...]) -> Iterator[tuple[tuple, Any]]:
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from walk(value, (*prefix, key))
            else:
                yield (*prefix, key), value

    paths = dict(walk(record, ()))
    names = [path[-1] for path in paths]
    return {
        path[-1] if names.count(path[-1]) == 1 else ".".join(path): value
        for path, value in paths.items()
    }


def check_unchanged(work: Path, record: dict[str, Any]) -> None:
    """Refuse to resume the run in ``work`` when its config or inputs differ from
    ``record`` (``run_record`` of the resuming config), naming each change."""
    changes = []
    for name in record:
        if not (work / name).is_file():
            raise ValueError(
                f"--resume: {work / name} is missing, so the unfinished run cannot be checked "
                "(pass --overwrite to start again)"
            )
    then = leaves(json.loads((work / "train_config.json").read_text()))
    now = leaves(record["train_config.json"])
    for key in sorted(set(then) | set(now)):
        if key not in RESUME_EXEMPT and then.get(key) != now.get(key):
            changes.append(f"{key} changed from {then.get(key)!r} to {now.get(key)!r}")
    inputs = json.loads((work / "inputs.json").read_text())
    for key, what in (("data", "data file"), ("model_config", "model config")):
        a, b = inputs.get(key, {}), record["inputs.json"][key]
        if (a.get("bytes"), a.get("sha256")) != (b["bytes"], b["sha256"]):
            changes.append(
                f"{what} {b['path']} changed (size {a.get('bytes')} -> {b['bytes']} bytes, "
                f"sha256 {str(a.get('sha256'))[:12]}... -> {b['sha256'][:12]}...)"
            )
    if changes:
        raise ValueError(
            f"--resume: {'; '.join(changes)} since the checkpoint in {work} "
            "(resume with the same config and data, or pass --overwrite to start again)"
        )


def projection_params(cfg: ModelConfig) -> int:
    """Weights in the blocks' projections (attention's and the MLP's, every layer): what NF4
    holds in 4 bits."""
    shapes = (*attn_shapes(cfg).values(), *mlp_shapes(cfg).values())
    return cfg.n_layers * sum(int(np.prod(s)) for s in shapes)


def run_summary(
    model: Model, stats: dict[str, Any], steps: int, last: dict[str, Any]
) -> dict[str, Any]:
    """What ``summary.json`` holds: data statistics, steps, trainable and base parameters, the
    engine config as resolved on this backend (``auto`` dtype and attention made concrete),
    the base's weight memory in 16-bit and in NF4 at the engine's block size (with and
    without double quantization), peak memory and the final train loss."""
    cfg, eng = model.cfg, model.eng
    trainable = trainable_params(model)  # the selected layers' adapters only
    base = hf.n_params(cfg)
    proj = projection_params(cfg)

    def gib(bits_per_proj_param: float) -> float:
        return ((base - proj) * 16 + proj * bits_per_proj_param) / 8 / 2.0**30

    peak, source = peak_memory()
    return {
        **stats,
        "steps": steps,
        "trainable_params": trainable,
        "trainable_percent": 100.0 * trainable / base,
        "base_params": base,
        "engine": dataclasses.asdict(eng),  # as resolved for this backend (dtype, attention)
        "nf4_blocksize": eng.nf4_blocksize,
        "double_quant": eng.double_quant,
        "base_weight_gib": {
            "16-bit": gib(16.0),
            "nf4": gib(nf4_bits_per_param(eng.nf4_blocksize, False)),
            "nf4_double_quant": gib(nf4_bits_per_param(eng.nf4_blocksize, True)),
        },
        "peak_memory_bytes": peak,
        "peak_memory_source": source,
        "final_train_loss": last.get("loss"),
        **{f"final_{k}": last[k] for k in REWARD_METRICS if k in last},
    }


def peak_memory() -> tuple[int, str]:
    """``(bytes, source)``: the first device's peak where the backend reports it (GPU, TPU;
    source ``"device"``), else the process's peak resident set size (CPU; ``"process_rss"``).
    """
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device"
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return int(rss) * (1 if sys.platform == "darwin" else 1024), "process_rss"


def plot_loss(metrics: Path, png: Path) -> None:
    """Train (and eval) loss against step, as a PNG."""
    plot_losses({"train": metrics}, png)


def plot_losses(runs: dict[str, Path], png: Path) -> None:
    """The train loss of each run's ``metrics.jsonl`` against step (and its eval loss, where
    logged), as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    for label, metrics in runs.items():
        rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=label)
        ev = [r for r in rows if "eval_loss" in r]
        if ev:
            ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("mean token loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
