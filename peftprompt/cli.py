"""The ``peftprompt`` command line.

    peftprompt info --model minilm --method bitfit       trainable parameters and adapter size
    peftprompt info --model minilm --method all          the same for every method, as a table
    peftprompt fetch                                     prepare the embedded backbones (dequantise SmolLM2 once)
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from .backbones import BackboneError

EXIT_USAGE = 2


def _info(args: argparse.Namespace) -> None:
    from .backbones import load_backbone
    from .methods import METHODS, attach
    from .report import markdown_table, parameter_report

    methods = list(METHODS) if args.method == "all" else [args.method]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown adapter method {unknown[0]!r}; choose one of {', '.join(METHODS)} or 'all'")
    num_labels = args.num_labels if args.task in ("seq_cls", "token_cls") else None
    reports = []
    for method in methods:
        model, _ = load_backbone(args.model, task=args.task, num_labels=num_labels)
        reports.append(parameter_report(attach(model, method, task=args.task), method))
    if args.json:
        print(json.dumps([r.as_dict() for r in reports], indent=2))
    else:
        print(f"{args.model} ({args.task})")
        print(markdown_table(reports))


def _fetch(args: argparse.Namespace) -> None:
    from .backbones import minilm_path, smollm2_path

    print(f"minilm        {minilm_path()}")
    print(f"smollm2-135m  {smollm2_path(force=args.force)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftprompt", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="trainable parameters and adapter size of a method on a backbone")
    info.add_argument("--model", default="minilm", help="embedded name (minilm, smollm2-135m), hub id or path")
    info.add_argument("--method", default="all", help="adapter method, or 'all'")
    info.add_argument("--task", default="seq_cls", choices=["seq_cls", "token_cls", "causal_lm", "feature"])
    info.add_argument("--num-labels", type=int, default=2, help="classes of the head (seq_cls, token_cls)")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(run=_info)

    fetch = commands.add_parser("fetch", help="prepare the embedded backbones (dequantise SmolLM2 once)")
    fetch.add_argument("--force", action="store_true", help="rebuild the cached SmolLM2 checkpoint")
    fetch.set_defaults(run=_fetch)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; errors in the user's input print one line and exit with status 2."""
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # no load reports for the freshly initialised task heads
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, BackboneError) as err:
        print(f"peftprompt {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
