"""``qlora-spec demo``: prompting against LoRA and QLoRA fine-tuning, end to end, on a CPU.

The shipped base model (``assets/base``, made by ``qlora-spec pretrain``) has read a small
world's diaries, letters and logs, in which dates appear in words and as ISO dates but never
both at once. The task (``assets/task``, made by ``jax_impl.apps.corpus``) asks for the date of
a sentence as YYYY-MM-DD. The demo scores, on the held-out split, by exact match:

1. the base with the bare question (zero-shot) and with solved examples before it (few-shot);
2. the base plus a LoRA adapter trained on the train split (float32 base);
3. the same with the base in NF4 (QLoRA);

and writes a table (method, trainable parameters, base weight memory, train time, exact
match), a markdown report, the loss curves and both adapters to the output directory.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import field
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from ref_numpy.formats import files, hf

from ..generate import generate_many
from ..model import EngineConfig, Model, trainable_params
from ..train.checkpoint import load_pretrained, save_adapter
from ..train.data import bucket_lengths, load_tokenizer, read_jsonl
from ..train.trainer import Trainer, fit
from . import corpus

ASSETS = Path(__file__).parents[1] / "assets"
BASE = ASSETS / "base"
TASK_TRAIN = ASSETS / "task" / "train.jsonl"
TASK_HELDOUT = ASSETS / "task" / "heldout.jsonl"
PAIRS_TRAIN = ASSETS / "task" / "pairs_train.jsonl"
PAIRS_HELDOUT = ASSETS / "task" / "pairs_heldout.jsonl"
N_PAIRS = 400  # train examples the shipped preference pairs are made of
N_TRAIN, N_HELDOUT = 2000, 200

# The fine-tuning recipe of the demo, and of `qlora-spec train` without --model / --data: the
# config-file keys (flag names) that differ from TrainConfig's defaults.
RECIPE: dict[str, Any] = {
    "lr": 4e-3,
    "warmup_steps": 10,
    "batch_size": 8,
    "max_length": 128,
    "steps": 320,
    "checkpoint_interval": 1000,
}


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """What ``qlora-spec demo`` takes; field names are the flags, ``metadata["help"]`` their
    help."""

    out: str = field(
        default="qlora-spec-demo",
        metadata={"help": "output directory (report, loss curves, adapters)", "metavar": "DIR"},
    )
    steps: int = field(
        default=RECIPE["steps"], metadata={"help": "fine-tuning steps of LoRA and of QLoRA"}
    )
    heldout: int = field(
        default=N_HELDOUT, metadata={"help": "held-out examples scored (the first ones)"}
    )
    shots: int = field(default=3, metadata={"help": "solved examples in the few-shot prompt"})
    batch_size: int = field(default=50, metadata={"help": "rows per generation batch"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing --out"})

    def __post_init__(self) -> None:
        for name, low, high in (
            ("steps", 1, None),
            ("heldout", 1, N_HELDOUT),
            ("shots", 1, N_TRAIN),
            ("batch_size", 1, None),
        ):
            value = getattr(self, name)
            if value < low or (high is not None and value > high):
                bounds = f"{low} <= {name}" + (f" <= {high}" if high is not None else "")
                raise ValueError(f"DemoConfig.{name}: expected {bounds}, got {value}")


@dataclasses.dataclass
class Result:
    """One row of the table."""

    method: str
    trainable_params: int
    base_weight_bytes: int
    train_seconds: float
    exact_match: float
    answers: list[str]


def write_task(directory: Path, seed: int = 0) -> None:
    """Write ``train.jsonl`` and ``heldout.jsonl`` of the task, and the preference pairs of its
    first ``N_PAIRS`` train examples and of every held-out one (``pairs_train.jsonl``,
    ``pairs_heldout.jsonl``): the shipped files."""
    train, held = corpus.task_splits(N_TRAIN, N_HELDOUT, seed=seed)
    directory.mkdir(parents=True, exist_ok=True)
    for name, rows in (
        ("train.jsonl", train),
        ("heldout.jsonl", held),
        ("pairs_train.jsonl", corpus.preference_pairs(train[:N_PAIRS])),
        ("pairs_heldout.jsonl", corpus.preference_pairs(held)),
    ):
        tmp = directory / f".{name}.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(directory / name)


def base_weight_bytes(model: Model) -> int:
    """Bytes of every weight that is not an adapter (float or NF4 base, norms, embeddings)."""
    return sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Not(nnx.LoRAParam))))


def answer(text: str) -> str:
    """A completion up to its first line break, stripped: what exact match compares."""
    return text.split("\n", 1)[0].strip()


def score(
    model: Model, tok: Any, prompts: list[str], targets: list[str], batch_size: int
) -> tuple[float, list[str]]:
    """``(exact match in [0, 1], answers)`` of greedy completions of ``prompts``."""
    ids = [tok.encode(p, add_special_tokens=True) for p in prompts]  # BOS as in training
    longest = max(len(t.strip()) for t in targets)  # characters: at least the tokens
    new = generate_many(model, ids, longest + 4, batch_size=batch_size, eos_id=tok.eos_id)
    answers = [answer(tok.decode(n)) for n in new]
    hits = sum(a == t.strip() for a, t in zip(answers, targets, strict=True))
    return hits / len(targets), answers


def recipe(method: str, steps: int, out: Path) -> Any:
    """The ``TrainConfig`` of the demo's fine-tune with ``method`` into ``out``."""
    from .cli import build, from_keys
    from .train import TrainConfig

    keys = {**RECIPE, "steps": steps}
    paths = {"model": str(BASE), "data": str(TASK_TRAIN), "out": str(out), "method": method}
    return build(TrainConfig, from_keys({**paths, **keys}, TrainConfig, "demo.RECIPE"), "demo")


def finetune(method: str, dc: DemoConfig, out: Path) -> tuple[Model, float]:
    """Fine-tune the base with ``method`` by ``fit`` on the task's train split, in memory;
    writes the adapter (PEFT files) and its ``metrics.jsonl`` into ``out``. Returns the
    trained model and the wall-clock seconds of training (compiles included). The steps are
    those of ``qlora-spec train`` with the same recipe, batch for batch."""
    from .train import (
        Throughput,
        epoch_batches,
        prepare_rows,
        resolve_lora,
        resolve_max_length,
    )

    tc = recipe(method, dc.steps, out)
    base_cfg = hf.load_config(tc.model)
    max_length = resolve_max_length(tc.data_config.max_length, base_cfg.max_seq_len)
    cfg, model = load_pretrained(tc.model, resolve_lora(tc.lora, base_cfg), tc.engine)
    rows, _, tok, _ = prepare_rows(tc, max_length, cfg.vocab_size)
    steps = tc.steps or 1  # the recipe always sets them
    trainer = Trainer.create(model, tc.optim.for_steps(steps), dropout_seed=tc.seed)
    batches = epoch_batches(
        trainer,
        rows,
        tc.data_config,
        bucket_lengths(max_length),
        seed=tc.seed,
        pad_id=tok.pad_id if tok is not None else None,
    )
    t = time.perf_counter()
    history = fit(trainer, batches, steps=steps, hooks=[Throughput()])
    seconds = time.perf_counter() - t
    trained = trainer.model()
    save_adapter(trained, out, base_model=tc.model)
    (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in history))
    return trained, seconds


def run_demo(dc: DemoConfig, log: Any = print) -> list[Result]:
    """The whole comparison; writes ``dc.out`` and returns the table rows."""
    out = Path(dc.out)
    if out.exists() and not dc.overwrite:
        raise FileExistsError(f"{out}: exists (pass --overwrite to replace it)")
    tok = load_tokenizer(BASE)
    held = read_jsonl(TASK_HELDOUT)[: dc.heldout]
    shots = read_jsonl(TASK_TRAIN)[: dc.shots]
    targets = [e["completion"] for e in held]
    results: list[Result] = []

    with files.atomic_dir(out, dc.overwrite) as tmp:
        _, base = load_pretrained(BASE, None, EngineConfig())
        for method, prompts in (
            ("zero-shot prompt", [e["prompt"] for e in held]),
            (
                f"{dc.shots}-shot prompt",
                [corpus.few_shot_prompt(shots, e["sentence"]) for e in held],
            ),
        ):
            log(f"scoring the base model with a {method} ...")
            em, answers = score(base, tok, prompts, targets, dc.batch_size)
            results.append(Result(method, 0, base_weight_bytes(base), 0.0, em, answers))
        del base

        for method, label in (("lora", "LoRA"), ("qlora", "QLoRA")):
            log(f"fine-tuning with {label} for {dc.steps} steps ...")
            model, seconds = finetune(method, dc, tmp / method)
            em, answers = score(model, tok, [e["prompt"] for e in held], targets, dc.batch_size)
            results.append(
                Result(
                    label,
                    trainable_params(model),
                    base_weight_bytes(model),
                    seconds,
                    em,
                    answers,
                )
            )
        write_report(tmp, results, held, dc)
    return results


def table(results: list[Result]) -> str:
    """The comparison as a markdown table."""
    lines = [
        "| method | trainable params | base weight memory | train time | held-out exact match |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        train = f"{r.train_seconds:.0f} s" if r.train_seconds else "-"
        lines.append(
            f"| {r.method} | {r.trainable_params:,} | {r.base_weight_bytes / 2**20:.2f} MiB "
            f"| {train} | {100 * r.exact_match:.1f}% |"
        )
    return "\n".join(lines)


def write_report(
    out: Path, results: list[Result], held: list[dict[str, str]], dc: DemoConfig
) -> None:
    """``report.md``, ``results.json`` and ``loss.png`` (LoRA and QLoRA train loss)."""
    tc = recipe("qlora", dc.steps, out / "qlora")
    from .train import plot_losses

    plot_losses(
        {"LoRA": out / "lora" / "metrics.jsonl", "QLoRA": out / "qlora" / "metrics.jsonl"},
        out / "loss.png",
    )
    rows = [
        f"| `{e['sentence']}` | `{e['completion'].strip()}` | "
        + " | ".join(f"`{r.answers[i]}`" for r in results)
        + " |"
        for i, e in enumerate(held[:8])
    ]
    report = [
        "# qlora-spec demo: prompting vs LoRA vs QLoRA",
        "",
        f"Task: write the date of a sentence as YYYY-MM-DD; {len(held)} held-out sentences, "
        "greedy decoding, exact match.",
        f"Base model: `jax_impl/assets/base` ({hf.n_params(hf.load_config(BASE)):,} "
        "parameters, pretrained from scratch by `qlora-spec pretrain`).",
        f"Fine-tuning: {dc.steps} steps of batch {tc.data_config.batch_size}, rank "
        f"{tc.lora.rank} on all seven projections of every layer.",
        "",
        table(results),
        "",
        "![train loss](loss.png)",
        "",
        "Ask the QLoRA fine-tune yourself (the adapter records its base model):",
        "",
        "```bash",
        f"qlora-spec generate --adapter {dc.out}/qlora --method qlora \\",
        "    --prompt $'Ada moved to Lowmoor on 1 May 1990.\\nDate as YYYY-MM-DD:'",
        "```",
        "",
        "## First held-out examples",
        "",
        "| sentence | expected | " + " | ".join(r.method for r in results) + " |",
        "|---|---|" + "---|" * len(results),
        *rows,
        "",
    ]
    (out / "report.md").write_text("\n".join(report))
    files.write_json(
        out / "results.json",
        {
            "config": dataclasses.asdict(dc),
            "recipe": {
                k: v
                for k, v in dataclasses.asdict(tc).items()
                if k not in ("model", "data", "out", "resume", "overwrite")
            },
            "results": [dataclasses.asdict(r) for r in results],
        },
    )


def main(dc: DemoConfig) -> list[Result]:
    """Run the demo and print the table."""
    t = time.perf_counter()
    results = run_demo(dc)
    print()
    print(table(results))
    print(f"\nwrote {dc.out}/report.md ({time.perf_counter() - t:.0f} s in all); try")
    print(
        f"  qlora-spec generate --adapter {dc.out}/qlora --method qlora "
        "--prompt $'Ada moved to Lowmoor on 1 May 1990.\\nDate as YYYY-MM-DD:'"
    )
    return results
