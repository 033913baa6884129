"""Every adapter method under the same budget on SST-2 (accuracy) or CoNLL-2003 (entity F1), through the recipes.

Runs ``recipes/<recipe>.py --config recipes/configs/minilm/<task>_<method>.yaml max_steps=N`` for each method
(``--parallel`` runs at a time, one thread each), then collects each run's ``results.json`` into
``<task>.{json,md,png}`` under ``--out``. The learning rate of each method is the one in its config file.

    .venv/bin/python benchmarks/adapter_methods.py --task sst2 [--steps 600] [--methods lora bitfit] [--parallel 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm import tqdm

from _env import environment_record
from peftprompt.report import format_bytes

REPO = Path(__file__).resolve().parents[1]
TASKS = {
    "sst2": ("sst2_classification.py", "accuracy", "SST-2 accuracy (test.tsv, 698 sentences)"),
    "conll03": ("conll03_ner.py", "entity_f1", "CoNLL-2003 entity F1 (eng.testb)"),
}
METHODS = ("full", "lora", "prefix", "prompt", "ia3", "bitfit")


def run_methods(task: str, methods: list[str], steps: int, parallel: int, run_dir: Path) -> dict[str, dict]:
    """Start the recipe for each method (at most `parallel` at a time) and return ``{method: results.json}``."""
    recipe, _, _ = TASKS[task]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    pending, running, results = list(methods), {}, {}
    run_dir.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(methods), desc=f"{task} methods", unit="run") as bar:
        while pending or running:
            while pending and len(running) < parallel:
                method = pending.pop(0)
                out = run_dir / f"{task}_{method}"
                log = (run_dir / f"{task}_{method}.log").open("w")
                command = [
                    sys.executable, str(REPO / "recipes" / recipe), "--config",
                    str(REPO / f"recipes/configs/minilm/{task}_{method}.yaml"),
                    f"max_steps={steps}", f"eval_every={steps}", f"output_dir={out}",
                ]
                running[method] = (subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=log), out, log)
            time.sleep(2)
            for method, (process, out, log) in list(running.items()):
                if process.poll() is None:
                    continue
                log.close()
                del running[method]
                if process.returncode != 0:
                    raise RuntimeError(f"{task} {method} failed (exit {process.returncode}); see {log.name}")
                results[method] = json.loads((out / "results.json").read_text())
                bar.set_postfix_str(method)
                bar.update()
    return results


def write_outputs(task: str, rows: list[dict], record: dict, out: Path) -> None:
    _, metric, title = TASKS[task]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{task}.json").write_text(json.dumps({**record, "results": rows}, indent=2) + "\n")
    lines = [
        f"# {title}, MiniLM, every method under the same budget",
        "",
        f"{record['steps']} optimiser steps x batch {record['batch_size']} for every method (learning rates from "
        "each method's config file, not tuned per method on this budget), linear schedule with 6 % warm-up, "
        f"mixed precision as `auto` chose ({rows[0]['mixed_precision']}), one thread per run, "
        f"{record['parallel']} runs at a time.",
        "",
        f"| method | trainable params | trainable % | adapter size | learning rate | {metric} | train seconds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['trainable_params']:,} | {r['trainable_pct']:.3f} | {format_bytes(r['adapter_bytes'])} "
            f"| {r['learning_rate']:g} | {r[metric]:.4f} | {r['train_seconds']:.0f} |"
        )
    env = record["environment"]
    lines += ["", f"Machine: {env['machine']['cpu_model']} ({env['machine']['cpu_count']} CPUs); commit "
              f"{env['git_commit']}; command `{env['command']}`."]
    (out / f"{task}.md").write_text("\n".join(lines) + "\n")

    figure = Figure(figsize=(6.4, 4))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for r in rows:
        ax.scatter(r["trainable_params"], r[metric], s=40)
        ax.annotate(r["method"], (r["trainable_params"], r[metric]), textcoords="offset points", xytext=(5, 4))
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(metric)
    ax.set_title(f"{title}\n{record['steps']} steps x batch {record['batch_size']}", fontsize=10)
    ax.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out / f"{task}.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), required=True)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--steps", type=int, default=600, help="optimiser steps per method")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--run-dir", type=Path, default=REPO / "outputs" / "bench")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    started = time.perf_counter()
    results = run_methods(args.task, args.methods, args.steps, args.parallel, args.run_dir)
    rows = []
    for method in args.methods:
        config = yaml.safe_load((REPO / f"recipes/configs/minilm/{args.task}_{method}.yaml").read_text())
        rows.append({**results[method], "learning_rate": float(config["learning_rate"])})
    record = {
        "benchmark": args.task,
        "steps": args.steps,
        "batch_size": int(config["per_device_train_batch_size"]),
        "parallel": args.parallel,
        "wall_seconds": time.perf_counter() - started,
        "environment": environment_record(),
    }
    write_outputs(args.task, rows, record, args.out)
    print((args.out / f"{args.task}.md").read_text())


if __name__ == "__main__":
    main()
