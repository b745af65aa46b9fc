"""The ``qlora-spec`` command line."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ref_numpy.nf4 import nf4_bits_per_param


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlora-spec",
        description=(
            "LoRA / QLoRA fine-tuning of decoder transformers: a NumPy specification and a "
            "JAX engine held to it."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    mem = sub.add_parser(
        "memory", help="bits per base parameter for 16-bit, NF4 and NF4 + double quantization"
    )
    mem.add_argument("--params", type=float, default=1.1e9, help="base parameter count")
    mem.add_argument("--blocksize", type=int, default=64, help="NF4 block size")
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
    if args.command == "memory":
        _memory(args.params, args.blocksize)
        return 0
    parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
