"""The ``qlora-spec`` command line.

Every command that writes a directory writes it atomically: a temporary directory beside
``--out`` becomes ``--out`` only when everything is written, and an existing ``--out`` is
replaced only with ``--overwrite``. Errors in the input end the command with status 2 and
one line that names the file, tensor or field.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any

from ref_numpy.nf4 import BLOCKSIZES, nf4_bits_per_param


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlora-spec",
        description=(
            "LoRA / QLoRA fine-tuning of decoder transformers: a NumPy specification and a "
            "JAX engine held to it."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    merge = sub.add_parser(
        "merge", help="fold a PEFT LoRA adapter into its base and write a Hugging Face model"
    )
    merge.add_argument(
        "--model", help="base model directory (Hugging Face); default: the adapter's base"
    )
    merge.add_argument("--adapter", required=True, help="PEFT adapter directory")
    merge.add_argument("--out", required=True, help="output directory")
    merge.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    quant = sub.add_parser(
        "quantize", help="write an NF4 checkpoint in the transformers + bitsandbytes layout"
    )
    quant.add_argument("--model", required=True, help="model directory (Hugging Face)")
    quant.add_argument("--out", required=True, help="output directory")
    quant.add_argument("--blocksize", type=int, default=64, choices=BLOCKSIZES)
    quant.add_argument("--no-double-quant", action="store_true", help="keep the absmax in float32")
    quant.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    train = sub.add_parser(
        "train",
        help="fine-tune a model on a JSONL file (full, LoRA, QLoRA); without --model and "
        "--data: QLoRA on the bundled base model and task",
    )
    add_train_flags(train)

    from .demo import DemoConfig
    from .pretrain import PretrainConfig

    pre = sub.add_parser(
        "pretrain", help="train a small base model from scratch (tokenizer included)"
    )
    add_flags(pre, PretrainConfig)
    demo = sub.add_parser(
        "demo",
        help="prompting vs LoRA vs QLoRA on the bundled base model and task, with a report",
    )
    add_flags(demo, DemoConfig)

    ev = sub.add_parser("eval", help="mean token loss and perplexity of a model on a JSONL file")
    ev.add_argument(
        "--model", help="base model directory (Hugging Face); default: the adapter's base"
    )
    ev.add_argument("--adapter", help="PEFT adapter directory")
    ev.add_argument("--data", required=True, help="JSONL file")
    ev.add_argument(
        "--method",
        choices=("full", "lora", "qlora"),
        default="lora",
        help="qlora quantizes the base to NF4 as it loads",
    )
    ev.add_argument(
        "--backend",
        choices=("jax", "numpy"),
        default="jax",
        help="numpy runs the specification itself",
    )
    ev.add_argument(
        "--max-length", type=int, help="tokens per example (default: the model's, at most 512)"
    )
    ev.add_argument("--batch-size", type=int, default=4)
    ev.add_argument("--train-on-prompt", action="store_true")

    gen = sub.add_parser("generate", help="continue a prompt with a model (and an adapter)")
    gen.add_argument(
        "--model", help="base model directory (Hugging Face); default: the adapter's base"
    )
    gen.add_argument("--adapter", help="PEFT adapter directory")
    gen.add_argument("--prompt", required=True, help="the prompt text (the user turn in --chat)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument(
        "--method",
        choices=("full", "lora", "qlora"),
        default="lora",
        help="qlora quantizes the base to NF4 as it loads",
    )

    mem = sub.add_parser(
        "memory", help="bits per base parameter for 16-bit, NF4 and NF4 + double quantization"
    )
    mem.add_argument("--params", type=float, default=1.1e9, help="base parameter count")
    mem.add_argument("--blocksize", type=int, default=64, choices=BLOCKSIZES)
    return parser


def add_train_flags(p: argparse.ArgumentParser) -> None:
    """One flag per ``TrainConfig`` field (``max_length`` -> ``--max-length``), plus
    ``--config FILE`` (TOML, YAML or JSON with the same keys; flags win)."""
    from .train import TrainConfig

    p.add_argument("--config", help="TOML / YAML / JSON file with the same keys as the flags")
    add_flags(p, TrainConfig)


def add_flags(p: argparse.ArgumentParser, cls: Any) -> None:
    """One flag per field of the dataclass ``cls``, its help the field's comment; unset
    flags parse as None (so a config file or the dataclass default applies)."""
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        required = f.default is dataclasses.MISSING
        default = "required" if required else f"default: {f.default!r}"
        text = f"{comments.get(f.name, '')} ({default})".lstrip()
        if kind == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif "tuple" in kind:
            p.add_argument(flag, nargs="+", default=None, metavar="NAME", help=text)
        else:
            cast = int if kind.startswith("int") else float if kind.startswith("float") else str
            p.add_argument(flag, type=cast, default=None, help=text)


def field_comments(cls: Any) -> dict[str, str]:
    """``{field: the comment after it}`` from the dataclass's source (its documentation)."""
    import inspect
    import re

    pattern = re.compile(r"^\s+(\w+):[^#]*#\s*(.+)$")
    return {
        m.group(1): m.group(2).strip()
        for line in inspect.getsource(cls).splitlines()
        if (m := pattern.match(line))
    }


def _read_config(path: str) -> dict:
    import json
    import pathlib

    text = pathlib.Path(path).read_text()
    if path.endswith(".toml"):
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib

        return tomllib.loads(text)
    if path.endswith((".yaml", ".yml")):
        import yaml

        return dict(yaml.safe_load(text) or {})
    return dict(json.loads(text))


def train_config(args: argparse.Namespace) -> Any:
    """The resolved ``TrainConfig``: defaults, then the --config file, then flags."""
    from .train import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values: dict[str, Any] = {}
    if args.config:
        for key, value in _read_config(args.config).items():
            name = key.replace("-", "_")
            if name not in names:
                raise ValueError(f"{args.config}: unknown key {key!r}")
            values[name] = value
    values.update({k: v for k, v in vars(args).items() if k in names and v is not None})
    if "model" not in values and "data" not in values:  # the bundled base model and task
        from .demo import BASE, RECIPE, TASK_TRAIN

        values = {
            "model": str(BASE),
            "data": str(TASK_TRAIN),
            "out": "qlora-spec-train",
            "method": "qlora",
            **RECIPE,
            **values,
        }
    for need in ("model", "data", "out"):
        if need not in values:
            raise ValueError(f"train: --{need} is required (as a flag or in --config)")
    if "targets" in values:
        values["targets"] = tuple(values["targets"])
    return TrainConfig(**values)


def _base_model(args: argparse.Namespace) -> str:
    """``--model``, or the local base directory the ``--adapter`` was trained on."""
    if args.model is not None:
        return str(args.model)
    if args.adapter is None:
        raise ValueError(f"{args.command}: --model is required (or an --adapter to take it from)")
    from pathlib import Path

    path = Path(args.adapter) / "adapter_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no adapter config (is --adapter a PEFT adapter?)")
    base = json.loads(path.read_text()).get("base_model_name_or_path")
    if not isinstance(base, str) or not Path(base).is_dir():
        raise ValueError(
            f"{path}: base_model_name_or_path {base!r} is not a local directory; pass --model"
        )
    return base


def _fields(args: argparse.Namespace, cls: Any) -> dict[str, Any]:
    """The flags given for the dataclass ``cls``."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def _eval(args: argparse.Namespace) -> dict:
    import math

    from .evaluate import evaluate_file

    loss, tokens = evaluate_file(
        args.model,
        args.data,
        adapter=args.adapter,
        method=args.method,
        backend=args.backend,
        max_length=args.max_length,
        batch_size=args.batch_size,
        train_on_prompt=args.train_on_prompt,
    )
    return {"loss": loss, "tokens": tokens, "perplexity": math.exp(loss)}


def _generate(args: argparse.Namespace) -> str:

    from .checkpoint import load_pretrained
    from .data import chat_prompt_ids, load_chat_template, load_tokenizer
    from .generate import generate_many
    from .model import EngineConfig

    tok = load_tokenizer(args.model)
    if args.chat:
        messages = [{"role": "user", "content": args.prompt}]
        ids = chat_prompt_ids(messages, load_chat_template(args.model), tok)
    else:  # the tokenizer's own encoding, BOS as its post-processor says
        ids = tok.encode(args.prompt, add_special_tokens=True)
    _, model = load_pretrained(
        args.model, None, EngineConfig(quantize=args.method == "qlora"), adapter_dir=args.adapter
    )
    new = generate_many(
        model,
        [ids],
        args.max_new_tokens,
        batch_size=1,
        eos_id=tok.eos_id,
        stop=[tok.encode(s) for s in args.stop] or None,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )[0]
    completion = tok.decode(new)
    for s in args.stop:
        if s in completion:
            completion = completion[: completion.index(s)]
    return completion


def _memory(n_params: float, blocksize: int) -> None:
    rows = [
        ("16-bit", 16.0),
        ("NF4", nf4_bits_per_param(blocksize, double_quant=False)),
        ("NF4 + double quant", nf4_bits_per_param(blocksize, double_quant=True)),
    ]
    print(f"{'format':<20} {'bits/param':>10} {'GiB':>8}")
    for name, bits in rows:
        print(f"{name:<20} {bits:>10.4f} {n_params * bits / 8 / 2**30:>8.3f}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command in ("merge", "eval", "generate"):
            args.model = _base_model(args)
        if args.command == "merge":
            from ref_numpy.peft_io import merge_adapter

            out = merge_adapter(args.model, args.adapter, args.out, overwrite=args.overwrite)
            print(f"wrote {out}")
        elif args.command == "quantize":
            from ref_numpy.bnb_io import quantize_model

            out = quantize_model(
                args.model,
                args.out,
                blocksize=args.blocksize,
                double_quant=not args.no_double_quant,
                overwrite=args.overwrite,
            )
            print(f"wrote {out}")
        elif args.command == "train":
            from .train import TrainingDiverged, run

            try:
                summary = run(train_config(args))
            except TrainingDiverged as e:
                print(f"qlora-spec train: {e}", file=sys.stderr)
                return 3
            print(json.dumps(summary))
        elif args.command == "pretrain":
            from .pretrain import PretrainConfig, pretrain

            pc = _fields(args, PretrainConfig)
            if "out" not in pc:
                raise ValueError("pretrain: --out is required")
            print(json.dumps(pretrain(PretrainConfig(**pc))))
        elif args.command == "demo":
            from .demo import DemoConfig
            from .demo import main as demo_main

            demo_main(DemoConfig(**_fields(args, DemoConfig)))
        elif args.command == "eval":
            print(json.dumps(_eval(args)))
        elif args.command == "generate":
            print(_generate(args))
        elif args.command == "memory":
            _memory(args.params, args.blocksize)
        else:
            parser.print_help()
            return 0
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"qlora-spec {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
