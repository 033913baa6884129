"""Encoder training speed: our engine against `transformers.Trainer` + `peft.get_peft_model` on the same MiniLM SST-2
batches, LoRA (r 8 on query/value, the recipe's) and full fine-tuning.

Paths, each in a process of its own with the same threads (``--threads``), one after another:

- **trainer**: `transformers.Trainer` with `DataCollatorWithPadding` (dynamic padding, the usual path), the model from
  ``AutoModelForSequenceClassification`` and, for LoRA, `peft.get_peft_model` with the very `LoraConfig` our
  `attach` builds;
- **ours**: `peftprompt.training.train` with the recipe's config (``recipes/configs/minilm/sst2_<method>.yaml``).

Both train ``--steps`` optimiser steps of batch 16 (the recipe's rate, linear schedule with 6 % warm-up, seed 0, fp32,
no evaluation or saving) on SST-2 ``train.tsv``, in random order and with ``group_by_length`` (the Trainer's own
option; ours: `EpochLengthGroupedSampler`). In random order both draw the same batches (Accelerate's seedable
sampler, seed 0; the padded positions of every step are checked equal). Every path runs ``--repeats`` times,
alternating with the other, and each ratio is the median over the paired runs (a slow spell of a shared machine
then hits both paths). Timing: a wrapper around the collator stamps each batch; trained examples per second
over the steps after the first ``WARMUP_STEPS``. Writes ``speed_encoder.{json,md,png}`` to ``--out``:

    .venv/bin/python benchmarks/speed_encoder.py [--steps 200] [--repeats 3] [--threads 2] [--methods lora full] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _env import environment_record, provenance_line
import speed

NAME = "speed_encoder"
REPO = Path(__file__).resolve().parents[1]
METHODS = ("lora", "full")
PATHS = ("trainer", "ours")
ORDERS = ("random", "grouped")
WARMUP_STEPS = 3
BATCH = 16
TARGET = 1.0  # ours / trainer, trained examples per second


class TimingCollator:
    """Wraps a collator; stamps the time of each batch and counts its examples and padded positions."""

    def __init__(self, collator) -> None:
        self.collator, self.stamps, self.examples, self.positions = collator, [], [], []

    def __call__(self, features):
        self.stamps.append(time.perf_counter())
        batch = self.collator(features)
        self.examples.append(len(features))
        self.positions.append(int(batch["input_ids"].numel()))
        return batch


def recipe_config(method: str, steps: int, grouped: bool, output_dir: str, model: str | None):
    from peftprompt.training import load_config

    return load_config(REPO / f"recipes/configs/minilm/sst2_{method}.yaml", [
        f"max_steps={steps}", "eval_every=0", f"log_every={min(10, steps)}", "mixed_precision=no",
        f"group_by_length={str(grouped).lower()}", f"output_dir={output_dir}", *([f"model={model}"] if model else [])])


def run_path(path: str, method: str, order: str, steps: int, model: str | None) -> dict:
    """Train one path (in this process) and return its stamps, counts, losses and peak RSS."""
    from transformers import AutoTokenizer, DataCollatorWithPadding

    from peftprompt.backbones import resolve_backbone
    from peftprompt.data import sst2_dataset
    from peftprompt.training import build_model, train

    with tempfile.TemporaryDirectory() as output_dir:
        config = recipe_config(method, steps, order == "grouped", output_dir, model)
        tokenizer = AutoTokenizer.from_pretrained(resolve_backbone(config.model))
        data = sst2_dataset(tokenizer, "train", config.max_length, limit=steps * BATCH * 4)
        collator = TimingCollator(DataCollatorWithPadding(tokenizer))
        losses: list[float] = []
        if path == "ours":
            train(config, build_model(config)[0], tokenizer, data, collator)
            for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines():
                record = json.loads(line)
                if record["type"] == "train":
                    losses.append(record["loss"])
        else:
            losses = run_trainer(config, data, collator, output_dir)
    return {"stamps": collator.stamps, "examples": collator.examples, "positions": collator.positions,
            "losses": losses, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_trainer(config, data, collator, output_dir: str) -> list[float]:
    """`transformers.Trainer` on the backbone (+ `get_peft_model` with the `LoraConfig` `attach` would build)."""
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification, Trainer, TrainerCallback, TrainingArguments, set_seed

    from peftprompt.backbones import resolve_backbone
    from peftprompt.methods import default_config

    set_seed(config.seed)
    model = AutoModelForSequenceClassification.from_pretrained(resolve_backbone(config.model),
                                                               num_labels=config.num_labels)
    if config.method != "full":
        model = get_peft_model(model, default_config(model, config.method, task=config.task, **config.method_args))
    losses: list[float] = []

    class Losses(TrainerCallback):
        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    arguments = TrainingArguments(
        output_dir=output_dir, max_steps=config.max_steps, per_device_train_batch_size=config.per_device_train_batch_size,
        learning_rate=config.learning_rate, lr_scheduler_type=config.lr_scheduler,
        warmup_steps=math.ceil(config.warmup_ratio * config.max_steps), weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm, logging_steps=config.log_every, save_strategy="no", report_to=[],
        use_cpu=True, seed=config.seed, data_seed=config.seed,
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        dataloader_num_workers=0, disable_tqdm=True)
    Trainer(model=model, args=arguments, train_dataset=data, data_collator=collator, callbacks=[Losses()]).train()
    return losses


def throughput(run: dict) -> dict:
    """Examples per second and mean padded positions per step over the steps after `WARMUP_STEPS`."""
    stamps, examples = run["stamps"], run["examples"]
    seconds = stamps[-1] - stamps[WARMUP_STEPS]
    counted = sum(examples[WARMUP_STEPS:-1])
    positions = run["positions"][WARMUP_STEPS:]
    return {"examples_per_s": counted / seconds, "s_per_step": seconds / (len(stamps) - 1 - WARMUP_STEPS),
            "positions_per_step": sum(positions) / len(positions)}


def write_results(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Encoder training speed: peftprompt vs Trainer + PEFT (MiniLM, SST-2)", "",
             f"{result['steps']} optimiser steps x batch {BATCH} of SST-2 `train.tsv` per run, the recipe's learning "
             f"rate, linear schedule with 6 % warm-up, seed 0, fp32, {result['threads']} threads, no evaluation or "
             f"saving; each run in a process of its own, one after another, every path {result['repeats']} times "
             "(alternating; medians). Examples per second over the steps after "
             f"the first {WARMUP_STEPS}; positions = the padded tokens the model computes per step. Random order: "
             f"both paths draw the same batches (padded positions equal at every step: "
             f"{'yes' if result['same_batches'] else 'NO'}). Grouped: each path's own length-grouped sampler.", "",
             "| method | order | path | s/step | examples/s | positions/step | peak RSS (MB) | loss, last 50 steps |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for key, run in result["runs"].items():
        method, order, path = key.split("/")
        lines.append(f"| {method} | {order} | {path} | {run['s_per_step']:.3f} | {run['examples_per_s']:.1f} | "
                     f"{run['positions_per_step']:.0f} | {run['peak_rss_mb']:.0f} | {run['final_loss']:.3f} |")
    lines += ["", f"Ours / Trainer, examples per second (target >= {TARGET:.1f}x), the median of the "
              f"{result['repeats']} paired runs (min - max):", ""]
    lines += [f"- {key}: **{r['median']:.2f}x** ({r['min']:.2f} - {r['max']:.2f})" for key, r in result["ratios"].items()]
    lines += ["", provenance_line(result["environment"]), ""]
    (out / f"{NAME}.md").write_text("\n".join(lines))
    plot(result, out / f"{NAME}.png")
    if (out / f"{speed.NAME}.json").is_file():  # speed.md repeats these ratios
        speed.write_results(json.loads((out / f"{speed.NAME}.json").read_text()), out)


def plot(result: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4))
    FigureCanvasAgg(figure)
    axis = figure.add_subplot()
    keys = list(result["runs"])
    axis.barh(range(len(keys)), [result["runs"][k]["examples_per_s"] for k in keys],
              color=["tab:blue" if k.endswith("ours") else "tab:gray" for k in keys])
    axis.set_yticks(range(len(keys)), [k.replace("/", ", ") for k in keys], fontsize=8)
    axis.invert_yaxis()
    axis.set_xlabel("trained examples per second")
    axis.set_title(f"MiniLM SST-2 training, {result['threads']} threads: ours (blue) vs Trainer + PEFT", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each path, alternating (medians reported)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--model", default=None, help="another backbone than the config's (model=...)")
    parser.add_argument("--quick", action="store_true", help="10 steps, once")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--worker", nargs=4, metavar=("PATH", "METHOD", "ORDER", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.repeats = 10, 1
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        path, method, order, file = args.worker
        Path(file).write_text(json.dumps(run_path(path, method, order, args.steps, args.model)))
        return
    started = time.perf_counter()
    raw: dict[str, list[dict]] = {}
    env = {"OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):  # the paths alternate, so a slow spell of the machine hits both
            for method in args.methods:
                for order in ORDERS:
                    for path in PATHS:
                        key, file = f"{method}/{order}/{path}", Path(scratch) / f"{method}_{order}_{path}.json"
                        print(f"{key} ({repeat + 1}/{args.repeats}): {args.steps} steps", flush=True)
                        subprocess.run([sys.executable, __file__, "--worker", path, method, order, str(file),
                                        "--steps", str(args.steps), "--threads", str(args.threads),
                                        *(["--model", args.model] if args.model else [])],
                                       check=True, env={**os.environ, **env})
                        raw.setdefault(key, []).append(json.loads(file.read_text()))
    runs = {}
    for key, repeats in raw.items():
        speeds = [throughput(r) for r in repeats]
        tail = repeats[0]["losses"][-max(1, 50 // min(10, args.steps)):]
        runs[key] = {"examples_per_s": statistics.median(s["examples_per_s"] for s in speeds),
                     "s_per_step": statistics.median(s["s_per_step"] for s in speeds),
                     "positions_per_step": speeds[0]["positions_per_step"],
                     "examples_per_s_each": [s["examples_per_s"] for s in speeds],
                     "peak_rss_mb": max(r["peak_rss_mb"] for r in repeats),
                     "final_loss": sum(tail) / len(tail), "losses": repeats[0]["losses"]}
    same = all(r["positions"] == raw[f"{m}/random/ours"][0]["positions"]
               for m in args.methods for r in raw[f"{m}/random/trainer"] + raw[f"{m}/random/ours"])
    ratios = {}
    for m in args.methods:  # paired: ours / the Trainer's run just before it
        for o in ORDERS:
            each = [a / b for a, b in zip(runs[f"{m}/{o}/ours"]["examples_per_s_each"],
                                          runs[f"{m}/{o}/trainer"]["examples_per_s_each"])]
            ratios[f"{m}, {o}"] = {"median": statistics.median(each), "min": min(each), "max": max(each), "each": each}
    result = {"benchmark": NAME, "steps": args.steps, "repeats": args.repeats, "threads": args.threads, "batch_size": BATCH,
              "model": args.model or "minilm", "same_batches": same, "runs": runs, "ratios": ratios,
              "target": TARGET, "quick": args.quick, "wall_seconds": time.perf_counter() - started,
              "environment": environment_record()}
    write_results(result, args.out)
    print((args.out / f"{NAME}.md").read_text())


if __name__ == "__main__":
    main()
