"""The ``qlora-spec`` command line.

Every command that writes a directory writes it atomically: a temporary directory beside
``--out`` becomes ``--out`` only when everything is written, and an existing ``--out`` is
replaced only with ``--overwrite``. Errors in the input end the command with status 2 and
one line that names the file, tensor or field; a file that cannot be written (a full or
read-only disk) with status 1 and one line naming it and the cause.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any, NoReturn

from ref_numpy.formats.files import Locked, describe
from ref_numpy.nf4 import BLOCKSIZES, DEFAULT_BLOCKSIZE, nf4_bits_per_param

from ..cpu import reexec_with_runtime_env, trim_heap_after_compiles


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
    quant.add_argument(
        "--blocksize",
        type=int,
        default=DEFAULT_BLOCKSIZE,
        choices=BLOCKSIZES,
        help=f"weights per absmax block (default: {DEFAULT_BLOCKSIZE})",
    )
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
    ev.add_argument("--batch-size", type=int, default=4, help="rows per batch (default: 4)")
    ev.add_argument(
        "--train-on-prompt",
        action="store_true",
        help="count prompt tokens in the loss too, as training with it did",
    )
    ev.add_argument(
        "--objective",
        choices=("sft", "dpo"),
        default="sft",
        help="sft: token loss; dpo: preference loss and TRL's reward metrics over the pairs of "
        "--data (policy: --model with --adapter; reference: --model alone, or --ref-model)",
    )
    ev.add_argument(
        "--ref-model", help="reference model directory of a full fine-tune (--objective dpo)"
    )
    from ..train.trainer import DPOConfig

    add_flags(ev, DPOConfig)
    ev.add_argument(
        "--max-prompt-length", type=int, help="tokens a pair's prompt keeps (--objective dpo)"
    )
    ev.add_argument(
        "--truncation-mode",
        choices=("keep_start", "keep_end"),
        default="keep_start",
        help="what a pair longer than --max-length keeps (--objective dpo; default: keep_start)",
    )

    gen = sub.add_parser("generate", help="continue a prompt with a model (and an adapter)")
    gen.add_argument(
        "--model", help="base model directory (Hugging Face); default: the adapter's base"
    )
    gen.add_argument("--adapter", help="PEFT adapter directory")
    gen.add_argument("--prompt", required=True, help="the prompt text (the user turn in --chat)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument(
        "--max-new-tokens", type=int, default=64, help="tokens to generate at most (default: 64)"
    )
    gen.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy"
    )
    gen.add_argument("--top-k", type=int, help="sample among the k likeliest tokens only")
    gen.add_argument(
        "--top-p", type=float, help="sample among the likeliest tokens of total probability p"
    )
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument(
        "--method",
        choices=("full", "lora", "qlora"),
        default="lora",
        help="qlora quantizes the base to NF4 as it loads",
    )

    from .plan import PlanConfig

    plan = sub.add_parser(
        "plan",
        help="the device memory a training step needs, term by term, and whether it fits "
        "(--device-memory 24GiB), for a model directory or a named shape",
    )
    add_flags(plan, PlanConfig)

    mem = sub.add_parser(
        "memory", help="bits per base parameter for 16-bit, NF4 and NF4 + double quantization"
    )
    mem.add_argument("--params", type=float, default=1.1e9, help="base parameter count")
    mem.add_argument(
        "--blocksize",
        type=int,
        default=DEFAULT_BLOCKSIZE,
        choices=BLOCKSIZES,
        help=f"weights per absmax block (default: {DEFAULT_BLOCKSIZE})",
    )
    return parser


def add_train_flags(p: argparse.ArgumentParser) -> None:
    """One flag per leaf field of ``TrainConfig`` (``data_config.max_length`` ->
    ``--max-length``), plus ``--config FILE`` (TOML, YAML or JSON with the same keys, flat or
    in tables per section; flags win)."""
    from .train import TrainConfig

    p.add_argument(
        "--config",
        metavar="FILE",
        help="TOML, YAML or JSON file of the same keys as the flags (--max-length: max_length), "
        "flat or in tables per section ([lora] rank = 4); flags given win",
    )
    add_flags(p, TrainConfig)


@dataclasses.dataclass(frozen=True)
class Leaf:
    """A field of a (nested) config that a flag sets."""

    path: tuple[str, ...]  # attribute path from the top config: ("lora", "rank")
    field: dataclasses.Field  # the dataclass field, with its metadata
    hint: Any  # its resolved annotation

    @property
    def flag(self) -> str:
        """``metadata["flag"]``, or the field name as a flag (``--max-length``)."""
        return str(self.field.metadata.get("flag", "--" + self.field.name.replace("_", "-")))

    @property
    def key(self) -> str:
        """The flat config-file key: the flag's name with underscores (``max_length``)."""
        return self.flag[2:].replace("-", "_")

    @property
    def dest(self) -> str:
        return ".".join(self.path)


def leaves(cls: Any, prefix: tuple[str, ...] = ()) -> list[Leaf]:
    """The fields of the dataclass ``cls`` that flags set, nested configs walked into; a field
    another flag decides (``metadata["set_by"]``) has none. Every field needs a
    ``metadata["help"]``, and the flags must be unique."""
    hints = typing.get_type_hints(cls)
    out: list[Leaf] = []
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name}: no metadata['help'] to show in --help")
        if dataclasses.is_dataclass(hints[f.name]):
            out += leaves(hints[f.name], (*prefix, f.name))
        elif "set_by" not in f.metadata:
            out.append(Leaf((*prefix, f.name), f, hints[f.name]))
    flags = [leaf.flag for leaf in out]
    if len(set(flags)) != len(flags):
        twice = sorted({x for x in flags if flags.count(x) > 1})
        raise TypeError(f"{cls.__name__}: flags {twice} name two fields (set metadata['flag'])")
    return out


def add_flags(p: argparse.ArgumentParser, cls: Any) -> None:
    """One flag per leaf field of the dataclass ``cls`` (``leaves``), those of a nested config
    in a group of their own.

    The help is the field's ``metadata["help"]`` and its default (``metadata["default_text"]``
    where the value alone does not say it; "required" for a field without a default); the
    placeholder is ``metadata["metavar"]`` where given (``DIR``); the choices are those of a
    ``Literal`` annotation or ``metadata["choices"]``; a bool gets ``--x`` / ``--no-x``; a tuple
    takes names separated by spaces or commas. A flag left out is absent from the parsed
    namespace, so what was typed can be told from what was defaulted.
    """
    groups: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    owners = {f.name: f for f in dataclasses.fields(cls)}
    for leaf in leaves(cls):
        section = leaf.path[0] if len(leaf.path) > 1 else ""
        if section not in groups:
            groups[section] = (
                p
                if not section
                else p.add_argument_group(
                    f"{section} ({hints[section].__name__})", owners[section].metadata["help"]
                )
            )
        _add_flag(groups[section], leaf)


def _add_flag(p: Any, leaf: Leaf) -> None:
    f = leaf.field
    kind, choices = _kind(leaf.hint)
    choices = tuple(f.metadata.get("choices", choices))
    text = f"{f.metadata['help']} ({_default_text(f)})".replace("%", "%%")
    common: dict[str, Any] = {"default": argparse.SUPPRESS, "help": text, "dest": leaf.dest}
    if kind is bool:
        p.add_argument(leaf.flag, action=argparse.BooleanOptionalAction, **common)
    elif kind is tuple:
        p.add_argument(leaf.flag, nargs="+", metavar=f.metadata.get("metavar", "NAME"), **common)
    elif choices:
        p.add_argument(leaf.flag, type=kind, choices=choices, **common)
    else:
        metavar = {int: "N", float: "X"}.get(kind, f.name.upper())
        metavar = f.metadata.get("metavar", metavar)
        p.add_argument(leaf.flag, type=kind, metavar=metavar, **common)


def _kind(hint: Any) -> tuple[type, tuple[Any, ...]]:
    """``(bool | int | float | str | tuple, Literal choices)`` of a field's annotation."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]  # X | None
    if typing.get_origin(hint) is typing.Literal:
        choices = typing.get_args(hint)
        return type(choices[0]), choices
    if typing.get_origin(hint) is tuple:
        return tuple, ()
    if hint in (bool, int, float, str):
        return hint, ()
    raise TypeError(f"no flag for a field annotated {hint!r}")


def _default_text(f: dataclasses.Field) -> str:
    if "default_text" in f.metadata:
        return f"default: {f.metadata['default_text']}"
    if f.default is dataclasses.MISSING:
        return "required"
    if isinstance(f.default, bool):
        return f"default: {'on' if f.default else 'off'}"
    if isinstance(f.default, tuple):
        return f"default: {' '.join(map(str, f.default))}"
    return f"default: {f.default}"


def _read_config(path: str) -> dict:
    import pathlib

    text = pathlib.Path(path).read_text()
    if path.endswith(".toml"):
        import tomllib

        data: Any = tomllib.loads(text)
    elif path.endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a table of keys and values, got {type(data).__name__}")
    return data


def _value(value: Any, hint: Any, where: str) -> Any:
    """A config file's ``value`` checked against the field's annotation ``hint`` (a tuple
    field takes a list or a comma-separated string)."""
    kind, choices = _kind(hint)
    if value is None and type(None) in typing.get_args(hint):
        return None
    if kind is tuple:
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list or a comma-separated string")
        return _items(value, hint, where)
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ValueError(f"{where}: expected {kind.__name__}, got {value!r}")
    if choices and value not in choices:
        raise ValueError(f"{where}: expected one of {list(choices)}, got {value!r}")
    return value


def _items(values: Sequence[Any], hint: Any, where: str) -> tuple[Any, ...]:
    """The items of a tuple field from flags or a config file, each string split at commas
    and spaces: ``["q_proj,v_proj", "o_proj"]`` -> ``("q_proj", "v_proj", "o_proj")``, and
    ``["0,2"]`` -> ``(0, 2)`` for a ``tuple[int, ...]`` field."""
    (item,) = {a for a in typing.get_args(_tuple_hint(hint)) if a is not Ellipsis}
    words: list[Any] = []
    for v in values:
        words += v.replace(",", " ").split() if isinstance(v, str) else [v]
    if item is str:
        if not all(isinstance(w, str) for w in words):
            raise ValueError(f"{where}: expected names, got {list(values)!r}")
        return tuple(words)
    try:
        return tuple(int(w) for w in words if not isinstance(w, (bool, float)))
    except ValueError:
        raise ValueError(f"{where}: expected integers, got {list(values)!r}") from None


def _tuple_hint(hint: Any) -> Any:
    """``tuple[X, ...]`` out of ``tuple[X, ...] | None``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) else hint


def _given(args: argparse.Namespace, cls: Any) -> dict[tuple[str, ...], Any]:
    """The flags typed for the dataclass ``cls``, by field path."""
    given = vars(args)
    return {
        leaf.path: _items(given[leaf.dest], leaf.hint, leaf.flag)
        if _kind(leaf.hint)[0] is tuple
        else given[leaf.dest]
        for leaf in leaves(cls)
        if leaf.dest in given
    }


def from_keys(data: dict[str, Any], cls: Any, where: str) -> dict[tuple[str, ...], Any]:
    """The values of a config file (or a recipe) for the dataclass ``cls``, by field path:
    flat keys (``max_length``, as the flags) or tables per section (``{"lora": {"rank": 4}}``),
    each value checked against its field's annotation."""
    by_key = {leaf.key: leaf for leaf in leaves(cls)}
    by_path = {leaf.path: leaf for leaf in leaves(cls)}
    sections = {leaf.path[0] for leaf in by_path.values() if len(leaf.path) > 1}
    out: dict[tuple[str, ...], Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        items: list[tuple[tuple[str, ...], Any, str]]
        if name in sections and isinstance(value, dict):
            items = [((name, str(k).replace("-", "_")), v, f"{key}.{k}") for k, v in value.items()]
        elif name in by_key:
            items = [(by_key[name].path, value, str(key))]
        else:
            raise ValueError(f"{where}: unknown key {key!r}")
        for path, v, shown in items:
            if path not in by_path:
                raise ValueError(f"{where}: unknown key {shown!r}")
            out[path] = _value(v, by_path[path].hint, f"{where}: {shown}")
    return out


def build(cls: Any, values: dict[tuple[str, ...], Any], command: str) -> Any:
    """The dataclass ``cls`` from ``values`` by field path, nested configs built from theirs
    (their defaults for the rest). A field without a default that ``values`` lacks is an
    error naming its flag."""
    kwargs: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            inner = {p[1:]: v for p, v in values.items() if p[0] == f.name}
            kwargs[f.name] = build(hints[f.name], inner, command)
        elif (f.name,) in values:
            kwargs[f.name] = values[(f.name,)]
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ValueError(f"{command}: --{f.name.replace('_', '-')} is required")
    return cls(**kwargs)


def refuse_lora_flags_with_full(values: dict[tuple[str, ...], Any], cls: Any, command: str) -> None:
    """A LoRA flag (``--rank`` ...) given with ``--method full`` is an error: it would change
    nothing."""
    if values.get(("method",)) == "full":
        for leaf in leaves(cls):
            if leaf.path[0] == "lora" and leaf.path in values:
                raise ValueError(
                    f"{command}: {leaf.flag} sets the LoRA adapters, and --method full trains "
                    f"every weight without them; leave out {leaf.flag} or use --method lora / "
                    "qlora"
                )


def train_config(args: argparse.Namespace) -> Any:
    """The resolved ``TrainConfig``: defaults, then the --config file, then flags.

    LoRA flags (``--rank`` ...) given with ``--method full``, and preference flags (``--beta``
    ...) without ``--objective dpo``, typed or in the file, are an error: they would change
    nothing. Without ``--model`` and ``--data``, the bundled base model
    and task with the demo's recipe (``demo.RECIPE``) under the file and flags.
    """
    from .train import TrainConfig

    values: dict[tuple[str, ...], Any] = {}
    if getattr(args, "config", None):
        values.update(from_keys(_read_config(args.config), TrainConfig, args.config))
    values.update(_given(args, TrainConfig))
    refuse_lora_flags_with_full(values, TrainConfig, "train")
    if values.get(("objective",), "sft") != "dpo":
        dpo_only = {("data_config", "max_prompt_length"), ("data_config", "truncation_mode")}
        for leaf in leaves(TrainConfig):
            if leaf.path in values and (leaf.path[0] == "dpo" or leaf.path in dpo_only):
                raise ValueError(
                    f"train: {leaf.flag} sets preference tuning; it needs --objective dpo"
                )
    if ("model",) not in values and ("data",) not in values:  # the bundled model and task
        from .demo import BASE, RECIPE, TASK_TRAIN

        bundled = {"model": str(BASE), "data": str(TASK_TRAIN), "out": "qlora-spec-train"}
        values = {**from_keys({**bundled, **RECIPE}, TrainConfig, "demo.RECIPE"), **values}
    return build(TrainConfig, values, "train")


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


def _eval(args: argparse.Namespace) -> dict:
    import math

    from ..train.trainer import DPOConfig
    from .evaluate import evaluate_file, evaluate_preferences

    if args.objective == "dpo":
        return evaluate_preferences(
            args.model,
            args.data,
            build(DPOConfig, _given(args, DPOConfig), "eval"),
            adapter=args.adapter,
            ref_model=args.ref_model,
            method=args.method,
            backend=args.backend,
            max_length=args.max_length,
            max_prompt_length=args.max_prompt_length,
            truncation_mode=args.truncation_mode,
            batch_size=args.batch_size,
        )
    if args.ref_model is not None or args.max_prompt_length is not None or _given(args, DPOConfig):
        raise ValueError(
            "eval: --ref-model, --beta, --loss-type, --label-smoothing and --max-prompt-length "
            "are for --objective dpo"
        )

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

    from ..generate import generate_many
    from ..model import EngineConfig
    from ..train.checkpoint import load_pretrained
    from ..train.data import chat_prompt_ids, load_chat_template, load_tokenizer

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


def console() -> NoReturn:
    """The ``qlora-spec`` console script and ``python -m jax_impl.apps.cli``: the process first
    executes itself once more under the settings XLA's CPU runtime runs best under
    (``jax_impl.cpu``: ``glibc.malloc.hugetlb=1``, which spares it a page fault per 4 KiB of
    every step's temporaries, and 512-bit vectors on a CPU with bf16 matrix units), returns the
    heap XLA's compiler frees to the kernel after each long compilation
    (``trim_heap_after_compiles``), then runs ``main`` on the command line and exits with its
    status."""
    reexec_with_runtime_env()
    trim_heap_after_compiles()
    raise SystemExit(main())


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command (``argv``, default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command in ("merge", "eval", "generate"):
            args.model = _base_model(args)
        if args.command == "merge":
            from ref_numpy.formats.peft import merge_adapter

            out = merge_adapter(args.model, args.adapter, args.out, overwrite=args.overwrite)
            print(f"wrote {out}")
        elif args.command == "quantize":
            from ref_numpy.formats.bnb import quantize_model

            out = quantize_model(
                args.model,
                args.out,
                blocksize=args.blocksize,
                double_quant=not args.no_double_quant,
                overwrite=args.overwrite,
            )
            print(f"wrote {out}")
        elif args.command == "train":
            from ..train.trainer import TrainingDiverged
            from .train import Stopped, run

            try:
                summary = run(train_config(args))
            except TrainingDiverged as e:
                print(f"qlora-spec train: {e}", file=sys.stderr)
                return 3
            except Stopped as e:  # SIGINT / SIGTERM, after a checkpoint: 130 / 143
                print(f"qlora-spec train: {e}", file=sys.stderr)
                return 128 + e.signum
            import jax

            if jax.process_index() == 0:  # once per run, also of several processes
                print(json.dumps(summary))
        elif args.command == "pretrain":
            from .pretrain import PretrainConfig, pretrain

            pc = build(PretrainConfig, _given(args, PretrainConfig), "pretrain")
            print(json.dumps(pretrain(pc)))
        elif args.command == "demo":
            from .demo import DemoConfig
            from .demo import main as demo_main

            demo_main(build(DemoConfig, _given(args, DemoConfig), "demo"))
        elif args.command == "eval":
            print(json.dumps(_eval(args)))
        elif args.command == "generate":
            print(_generate(args))
        elif args.command == "plan":
            from .plan import PlanConfig
            from .plan import main as plan_main

            values = _given(args, PlanConfig)
            refuse_lora_flags_with_full(values, PlanConfig, "plan")
            return plan_main(build(PlanConfig, values, "plan"))
        elif args.command == "memory":
            _memory(args.params, args.blocksize)
        else:
            parser.print_help()
            return 0
    except (ValueError, FileExistsError, FileNotFoundError, NotADirectoryError, Locked) as e:
        message = describe(e) if isinstance(e, OSError) else str(e)
        print(f"qlora-spec {args.command}: error: {message}", file=sys.stderr)
        return 2
    except OSError as e:  # a file that cannot be written or read: a full or read-only disk
        print(f"qlora-spec {args.command}: error: {describe(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    console()
