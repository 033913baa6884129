"""Demo (`make demo`): every adapter method's size on MiniLM, then LoRA and BitFit trained and scored on SST-2.

1. Attach each method to all-MiniLM-L6-v2 (sequence classification) and print its trainable parameters.
2. Train the chosen methods with `transformers.Trainer` on SST-2 train (batch 16, 64 tokens, linear warm-up 6%).
3. Score accuracy on SST-2 ``test.tsv`` (698 rows), save each adapter to ``--output_dir/<method>`` and print a summary.

    .venv/bin/python recipes/demo_sst2.py [--steps 300] [--output_dir outputs/demo] [--methods lora bitfit]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

from datasets import Dataset
from transformers import Trainer, TrainingArguments, set_seed
from transformers.utils import logging as transformers_logging

from peftprompt import ParameterReport, attach, load_backbone, parameter_report, save_adapter
from peftprompt.adapters import directory_bytes
from peftprompt.methods import CORE_METHODS
from peftprompt.data import sst2_dataset
from peftprompt.metrics import accuracy as accuracy_score
from peftprompt.report import format_bytes, markdown_table

BATCH_SIZE = 16
MAX_LENGTH = 64
SEED = 0
# Learning rates measured on this task; other methods need their own tuning first.
LEARNING_RATES = {"lora": 1e-3, "bitfit": 2e-3, "full": 5e-5}


def fresh_model(method: str):
    """MiniLM with a new 2-class head and `method` attached, seeded so runs repeat; returns `(model, tokenizer)`."""
    set_seed(SEED)
    model, tokenizer = load_backbone("minilm", task="seq_cls", num_labels=2)
    return attach(model, method), tokenizer


def train_and_score(
    method: str, train: Dataset, test: Dataset, steps: int, output_dir: Path
) -> tuple[ParameterReport, float, float]:
    """Train `method` for `steps` steps and save it to ``output_dir/method``; return report, accuracy, seconds."""
    model, tokenizer = fresh_model(method)
    with tempfile.TemporaryDirectory() as trainer_dir:
        args = TrainingArguments(
            output_dir=trainer_dir,
            max_steps=steps,
            per_device_train_batch_size=BATCH_SIZE,
            per_device_eval_batch_size=64,
            learning_rate=LEARNING_RATES[method],
            lr_scheduler_type="linear",
            warmup_steps=0.06,  # a float below 1 is a ratio of max_steps
            logging_steps=50,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=SEED,
            dataloader_num_workers=0,
            label_names=["labels"],
        )
        trainer = Trainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
        train_seconds = trainer.train().metrics["train_runtime"]
        prediction = trainer.predict(test)
    accuracy = accuracy_score(prediction.predictions.argmax(-1).tolist(), prediction.label_ids.tolist())
    adapter_dir = save_adapter(model, output_dir / method, tokenizer)
    report = dataclasses.replace(
        parameter_report(model, method, measure_size=False), adapter_bytes=directory_bytes(adapter_dir)
    )
    print(f"{method}: test accuracy {accuracy:.4f}; saved {adapter_dir} ({format_bytes(report.adapter_bytes)})")
    return report, accuracy, train_seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps per method (default 300)")
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--methods", nargs="+", choices=sorted(LEARNING_RATES), default=["lora", "bitfit"])
    args = parser.parse_args(argv)
    transformers_logging.set_verbosity_error()  # no load report for each freshly initialised head
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")

    print("## Trainable parameters per method (all-MiniLM-L6-v2, 2-class head)\n")
    print(markdown_table([parameter_report(fresh_model(method)[0], method) for method in CORE_METHODS]) + "\n")

    _, tokenizer = load_backbone("minilm", task="seq_cls", num_labels=2)
    train = sst2_dataset(tokenizer, "train", max_length=MAX_LENGTH)
    test = sst2_dataset(tokenizer, "test", max_length=MAX_LENGTH)
    rows = [
        "| method | trainable params | trainable % | test accuracy | train seconds | adapter size |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for method in args.methods:
        report, accuracy, seconds = train_and_score(method, train, test, args.steps, args.output_dir)
        rows.append(
            f"| {method} | {report.trainable_params:,} | {report.trainable_pct:.3f} | {accuracy:.4f} | "
            f"{seconds:.0f} | {format_bytes(report.adapter_bytes)} |"
        )
    print(f"\n## SST-2 after {args.steps} steps x batch {BATCH_SIZE} (test.tsv, {len(test)} sentences)\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
