"""Every adapter method on 17 architectures: which attach, train, reload in a fresh process and merge.

Runs the matrix of `peftprompt.method_matrix` (the harness of ``tests/test_architectures.py``) on tiny random
models: for each cell, attach, one training step, save, reload in a fresh process (identical logits) and merge where
the method merges (logits unchanged within 1e-4). Writes ``architectures.json`` (every cell, with the refusal
reasons) and ``architectures.md`` (the table) to ``--out``; a few minutes on 2 CPU cores:

    .venv/bin/python benchmarks/architectures.py [--architectures llama gpt2] [--methods lora vera] [--quick]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from transformers.utils import logging as transformers_logging

from _env import environment_record
from peftprompt.methods import CORE_METHODS, METHODS, REFUSED_METHODS
from peftprompt.method_matrix import ARCHITECTURES, Reloader, cells_as_json, check_architecture, markdown_table

NAME = "architectures"


def write_markdown(record: dict, cells, path: Path) -> None:
    counts = record["counts"]
    refusals = [c for c in cells if c.status == "refused" and c.method not in REFUSED_METHODS]
    failures = [c for c in cells if c.status == "failed"]
    lines = [
        f"# Adapter methods x architectures ({len(record['methods'])} methods, {len(record['architectures'])} "
        "architectures)",
        "",
        f"Tiny random models (1 layer, width 32, vocabulary 100; causal LMs and 2-class sequence classifiers), "
        f"batch 2 x 8 tokens, one AdamW step (lr 1e-2; LoRA+ / LoRA-FA: their optimisers), "
        f"{record['threads']} thread(s), {record['wall_seconds']:.0f} s in all. `ok`: attached, trained (the logits "
        "moved), saved and reloaded in a fresh process with identical logits (atol 1e-6); `ok, merged`: also "
        "folded into the base weights by `merge_and_unload` with the logits unchanged (atol 1e-4). Refused cells "
        "are listed below with the one-line reason `attach` gives.",
        "",
        f"**{counts.get('ok', 0)} ok, {counts.get('refused', 0)} refused, {counts.get('failed', 0)} failed.**",
        "",
        markdown_table(cells, record["architectures"], record["methods"]),
        "",
        "## Refused on some architectures",
        "",
        "| architecture | method | reason |",
        "|---|---|---|",
        *(f"| {c.architecture} | {c.method} | {c.reason.replace('|', '/')} |" for c in refusals),
        "",
        "## Refused everywhere (they need inputs `attach` cannot infer)",
        "",
        *(f"- `{name}`: {reason}" for name, reason in REFUSED_METHODS.items()),
    ]
    if failures:
        lines += ["", "## Failed", "", *(f"- {c.architecture} / {c.method}: {c.reason}" for c in failures)]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--architectures", nargs="+", choices=list(ARCHITECTURES), default=list(ARCHITECTURES))
    parser.add_argument("--methods", nargs="+", choices=[*METHODS, *REFUSED_METHODS],
                        default=[*METHODS, *REFUSED_METHODS])
    parser.add_argument("--quick", action="store_true", help="Llama, GPT-2 and BERT with the core methods only")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    if args.quick:
        args.architectures, args.methods = ["llama", "gpt2", "bert"], list(CORE_METHODS)
    torch.set_num_threads(1)
    transformers_logging.set_verbosity_error()

    started = time.perf_counter()
    cells = []
    with tempfile.TemporaryDirectory() as tmp, Reloader() as reloader:
        for architecture in args.architectures:
            cells += check_architecture(architecture, args.methods, Path(tmp) / architecture, reloader)
            print(f"{architecture}: {Counter(c.status for c in cells if c.architecture == architecture)}", flush=True)
    record = {
        "architectures": args.architectures,
        "methods": args.methods,
        **environment_record(),
        "wall_seconds": time.perf_counter() - started,
        "counts": dict(Counter(c.status for c in cells)),
        "cells": cells_as_json(cells),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{NAME}.json").write_text(json.dumps(record, indent=2) + "\n")
    write_markdown(record, cells, args.out / f"{NAME}.md")
    print(f"{record['counts']} in {record['wall_seconds']:.0f} s; wrote {args.out / NAME}.{{json,md}}")


if __name__ == "__main__":
    main()
