"""The ``qlora-spec`` command line.

Every command that writes a directory writes it atomically: a temporary directory beside
``--out`` becomes ``--out`` only when everything is written, and an existing ``--out`` is
replaced only with ``--overwrite``. Errors in the input end the command with status 2 and
one line that names the file, tensor or field.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

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
    merge.add_argument("--model", required=True, help="base model directory (Hugging Face)")
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

    mem = sub.add_parser(
        "memory", help="bits per base parameter for 16-bit, NF4 and NF4 + double quantization"
    )
    mem.add_argument("--params", type=float, default=1.1e9, help="base parameter count")
    mem.add_argument("--blocksize", type=int, default=64, choices=BLOCKSIZES)
    return parser


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
        elif args.command == "memory":
            _memory(args.params, args.blocksize)
        else:
            parser.print_help()
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"qlora-spec {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
