"""Every adapter method on MiniLM / SST-2: trainable parameters, adapter size, seconds per step and peak RSS.

Each method runs in a fresh child process (this script with ``--worker METHOD``), so its peak RSS is its own.
Writes ``methods_overview.json``, ``.md`` and ``.png`` to ``--out``:

    .venv/bin/python benchmarks/methods_overview.py [--methods lora bitfit] [--steps 8] [--warmup 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm import tqdm

from _env import environment_record
from _plot import annotate_clear
from peftprompt import attach, load_backbone, parameter_report
from peftprompt.methods import CORE_METHODS, METHODS
from peftprompt.data import sst2_dataset
from peftprompt.report import format_bytes

NAME = "methods_overview"
MODEL = "all-MiniLM-L6-v2"
TASK = "sst2 seq_cls"
BATCH_SIZE = 16
SEQ_LEN = 64
LEARNING_RATE = 1e-4
LABEL_OFFSETS = (0, 12, -12, 24, -24, 36, -36)  # points above the marker, tried in turn


def measure(method: str, steps: int, warmup: int) -> dict:
    """Time `warmup` + `steps` AdamW steps of `method` on one SST-2 batch; run in a fresh process for its peak RSS.

    RSS is read just before the first step (model, adapter and batch loaded) and as the process peak after the
    last step, before the adapter is saved to measure its size.
    """
    torch.manual_seed(0)
    model, tokenizer = load_backbone("minilm", task="seq_cls", num_labels=2)
    model = attach(model, method)
    batch = sst2_dataset(tokenizer, "train", max_length=SEQ_LEN, limit=BATCH_SIZE, padding="max_length")
    batch = batch.with_format("torch")[:]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    model.train()
    rss_after_load = psutil.Process().memory_info().rss
    step_seconds = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= warmup:
            step_seconds.append(time.perf_counter() - start)
    peak_rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux
    report = parameter_report(model, method)
    return {
        "method": method,
        "trainable_params": report.trainable_params,
        "total_params": report.total_params,
        "trainable_pct": report.trainable_pct,
        "adapter_bytes": report.adapter_bytes,
        "seconds_per_step": statistics.median(step_seconds),
        "step_seconds": [round(s, 4) for s in step_seconds],
        "peak_rss_mb": round(peak_rss_kb / 1024, 1),
        "rss_after_load_mb": round(rss_after_load / 2**20, 1),
    }


def run_worker(method: str, steps: int, warmup: int) -> dict:
    """Run `measure` for `method` in a child process and parse the JSON line it prints last."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", method]
    command += ["--steps", str(steps), "--warmup", str(warmup)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker for {method!r} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def setup_sentence(record: dict) -> str:
    machine = record["machine"]
    return (
        f"{machine['cpu_model']} ({machine['cpu_count']} CPUs), {record['threads']} torch threads; "
        f"batch {record['batch_size']} x {record['seq_len']} tokens, AdamW lr {LEARNING_RATE:g}, median of "
        f"{record['timed_steps']} steps after {record['warmup_steps']} warm-up steps, one fresh process per method."
    )


def write_markdown(record: dict, path: Path) -> None:
    lines = [
        f"# Adapter methods on {record['model']} ({record['task']})",
        "",
        setup_sentence(record),
        "",
        "| method | trainable params | trainable % | adapter size | s/step | peak RSS (MB) | RSS after load (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in record["results"]:
        lines.append(
            f"| {r['method']} | {r['trainable_params']:,} | {r['trainable_pct']:.3f} | "
            f"{format_bytes(r['adapter_bytes'])} | {r['seconds_per_step']:.3f} | {r['peak_rss_mb']:.0f} | "
            f"{r['rss_after_load_mb']:.0f} |"
        )
    path.write_text("\n".join(lines) + "\n")


def write_plot(record: dict, path: Path) -> None:
    fig = Figure(figsize=(8, 5.5))
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.1, top=0.88)
    ax = fig.subplots()
    results = sorted(record["results"], key=lambda r: -r["seconds_per_step"])
    ax.set_xscale("log")
    ax.set_xlim(min(r["trainable_params"] for r in results) / 2, max(r["trainable_params"] for r in results) * 20)
    ax.set_ylim(0, max(r["seconds_per_step"] for r in results) * 1.2)
    renderer, placed = fig.canvas.get_renderer(), []
    for r in results:
        point = (r["trainable_params"], r["seconds_per_step"])
        ax.scatter(*point, s=40)
        annotate_clear(ax, f"{r['method']} ({format_bytes(r['adapter_bytes'])})", point, LABEL_OFFSETS, placed,
                       renderer, dx=6, arrow=True, fontsize=9, va="center")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("seconds per training step (median)")
    ax.set_title(
        f"{record['model']} on SST-2: trainable parameters vs step time (label: adapter size)\n"
        f"batch {record['batch_size']} x {record['seq_len']} tokens, {record['threads']} threads, "
        f"{record['machine']['cpu_model']}",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(CORE_METHODS))
    parser.add_argument("--steps", type=int, default=8, help="timed steps per method (>= 5; default 8)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps (default 3)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--quick", action="store_true", help="5 timed steps after 1 warm-up step")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 5, 1
    if args.steps < 5 or args.warmup < 0:
        parser.error(f"need --steps >= 5 and --warmup >= 0, got {args.steps} and {args.warmup}")

    if args.worker:
        print(json.dumps(measure(args.worker, args.steps, args.warmup)), flush=True)
        return

    started = time.perf_counter()
    record = {
        "task": TASK,
        "model": MODEL,
        "batch_size": BATCH_SIZE,
        "seq_len": SEQ_LEN,
        "timed_steps": args.steps,
        "warmup_steps": args.warmup,
        **environment_record(),
        "results": [],
    }
    for method in (bar := tqdm(args.methods, desc="methods", unit="method")):
        bar.set_postfix_str(method)
        record["results"].append(run_worker(method, args.steps, args.warmup))
    record["wall_seconds"] = time.perf_counter() - started

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{NAME}.json").write_text(json.dumps(record, indent=2) + "\n")
    write_markdown(record, args.out / f"{NAME}.md")
    write_plot(record, args.out / f"{NAME}.png")
    print((args.out / f"{NAME}.md").read_text())
    print(f"wrote {args.out / NAME}.{{json,md,png}}")


if __name__ == "__main__":
    main()
