"""Continual learning on MiniLM: five classification tasks in three orders, every strategy, the accuracy matrix,
average accuracy, backward transfer and forgetting.

Each strategy (`STRATEGIES`: ``recipes/configs/minilm/continual_<strategy>.yaml``) trains through each task order of
`ORDERS` with ``recipes/continual_classification.py`` (2,000 training rows a task, 3 epochs, batch 16, 64 tokens; 500
test rows a task; see `peftprompt.continual`); joint training, which has no order, runs once. ``adapter_per_task``
is reported with the task given and routed (the task not given) by each router. Runs live in ``--run-dir``
(``<strategy>_order<k>``); each finished run leaves its ``results.json`` and ``train_config.yaml`` under
``--records`` (``benchmarks/results/continual_runs/`` in the repository), which later runs read instead of training
again. Results written before every run is done are marked PARTIAL. Writes ``continual.{json,md,png}`` to
``--out``: per strategy the mean over the orders (and the range), per order the values, a heatmap of each
strategy's accuracy matrix (first order) and bars of average accuracy and forgetting.

    .venv/bin/python benchmarks/continual.py [--strategies sequential replay ...] [--orders 1 2 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import shutil
import textwrap
import time
from pathlib import Path
from typing import Optional

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm import tqdm

from _env import environment_record, provenance_line
from _runs import CONFIG_FILE, RESULTS_FILE, finished_run, requested_config, run_recipe
from peftprompt.continual import STRATEGIES
from peftprompt.report import format_bytes

NAME = "continual"
REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
RECIPE = "continual_classification.py"
ORDERS = {
    1: ["dbpedia", "amazon", "agnews", "yelp", "sst2"],
    2: ["sst2", "yelp", "agnews", "amazon", "dbpedia"],
    3: ["yelp", "dbpedia", "sst2", "amazon", "agnews"],
}
QUICK = ["data.train_per_task=32", "data.test_per_task=16", "data.router_examples=16", "max_length=32",
         "num_epochs=1"]
# what the report shows, in order: (row key, label, told the task id)
ROWS = (
    ("sequential", "sequential LoRA", False),
    ("replay", "replay (LoRA, 2 % of each earlier task)", False),
    ("adapter_per_task_routed_linear", "LoRA per task, linear router", False),
    ("adapter_per_task_routed_centroid", "LoRA per task, nearest-centroid router", False),
    ("osf", "OSF (PEFT), merged per task", False),
    ("orthogonal_lora", "O-LoRA-style LoRA, merged per task", False),
    ("adapter_per_task", "LoRA per task, task given", True),
    ("joint", "joint multi-task LoRA (upper bound)", False),
)
TARGET_GAP, TARGET_FORGETTING = 0.02, 0.01
METHOD_LABELS = {"lora": "LoRA", "osf": "OSF"}
ROUTER_FEATURES = {"all": "hidden states (every layer's, mean-pooled, concatenated)", "last": "sentence embeddings"}


def config_path(strategy: str) -> Path:
    return REPO / "recipes" / "configs" / "minilm" / f"continual_{strategy}.yaml"


def jobs_for(strategies: list[str], orders: list[int]) -> list[tuple[str, int]]:
    """``(strategy, order)`` runs, order by order (the first order of every strategy is done first); joint training
    once, with the first order's task list (its columns)."""
    return [(s, o) for o in orders for s in strategies if s != "joint" or o == orders[0]]


def overrides(order: int, quick: bool, model: Optional[str]) -> list[str]:
    return [f"data.tasks=[{','.join(ORDERS[order])}]", *(QUICK if quick else []),
            *([f"model={model}"] if model else [])]


def finished(job: tuple[str, int], args: argparse.Namespace) -> Optional[dict]:
    """The results of `job` from its record or its run directory, when it was trained as now requested."""
    strategy, order = job
    name = f"{strategy}_order{order}"
    requested = requested_config(config_path(strategy), overrides(order, args.quick, args.model), args.run_dir / name)
    for directory in (args.records / name, args.run_dir / name):
        done = finished_run(directory, requested)
        if done is not None:
            return done
    return None


def keep_record(run_dir: Path, records: Path) -> None:
    target = records / run_dir.name
    target.mkdir(parents=True, exist_ok=True)
    for name in (RESULTS_FILE, CONFIG_FILE):
        shutil.copy2(run_dir / name, target / name)


def train(jobs: list[tuple[str, int]], args: argparse.Namespace) -> None:
    for strategy, order in tqdm(jobs, desc="continual runs", unit="run"):
        run_dir = args.run_dir / f"{strategy}_order{order}"
        run_recipe(config_path(strategy), overrides(order, args.quick, args.model), run_dir, recipe=RECIPE,
                   log=args.run_dir / f"{run_dir.name}.log", env={"OMP_NUM_THREADS": str(args.threads)})
        keep_record(run_dir, args.records)


def rows_of(run: dict) -> dict[str, dict]:
    """The report rows of one run: the strategy's own, and for ``adapter_per_task`` also one per router."""
    stages = run["stages"]
    common = {
        "trainable_params_per_task": stages[0]["trainable_params"],
        "adapter_bytes_per_task": max(stage["adapter_bytes"] for stage in stages),
        "train_seconds": sum(stage["step_seconds"] for stage in stages),
        "peak_memory_mb": run["peak_memory_mb"],
    }
    rows = {run["strategy"]: {**common, "matrix": run["accuracy_matrix"], **run["scores"]}}
    for router, routed in (run.get("routed") or {}).items():
        rows[f"{run['strategy']}_routed_{router}"] = {**common, "matrix": routed["accuracy_matrix"],
                                                      **routed["scores"],
                                                      "routing_accuracy": routed["routing_accuracy_last"]}
    return rows


def summarise(per_order: dict[str, dict[int, dict]]) -> dict[str, dict]:
    """Per row: the mean, min and max over the orders of each score."""
    out = {}
    for key, by_order in per_order.items():
        values = list(by_order.values())
        summary = {"orders": sorted(by_order)}
        for metric in ("average_accuracy", "backward_transfer", "forgetting", "routing_accuracy", "train_seconds"):
            numbers = [v[metric] for v in values if v.get(metric) is not None]
            if numbers:
                summary[metric] = {"mean": sum(numbers) / len(numbers), "min": min(numbers), "max": max(numbers)}
        for metric in ("trainable_params_per_task", "adapter_bytes_per_task", "peak_memory_mb"):
            summary[metric] = values[0][metric]
        out[key] = summary
    return out


def targets(summary: dict[str, dict]) -> Optional[dict]:
    """The best strategy not told the task (by mean average accuracy) against joint training."""
    if "joint" not in summary:
        return None
    blind = [key for key, _, told in ROWS if not told and key != "joint" and key in summary]
    if not blind:
        return None
    best = max(blind, key=lambda key: summary[key]["average_accuracy"]["mean"])
    gap = summary["joint"]["average_accuracy"]["mean"] - summary[best]["average_accuracy"]["mean"]
    forgot = summary[best].get("forgetting", {}).get("mean")
    return {"best_without_task_id": best, "below_joint": gap, "forgetting": forgot,
            "met": gap <= TARGET_GAP and forgot is not None and forgot <= TARGET_FORGETTING}


def write_results(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}.json").write_text(json.dumps(result, indent=2) + "\n")
    labels = {key: label for key, label, _ in ROWS}
    partial = " (PARTIAL: runs missing)" if result["partial"] else ""
    lines = [f"# Continual learning on MiniLM: 5 classification tasks, {len(result['orders'])} task orders{partial}", "",
             "Tasks: AG News, Amazon, Yelp, DBpedia (`cl_benchmark`, the 5-task benchmark without Yahoo) and SST-2; "
             "Yelp and DBpedia split 80/20 with a fixed seed (they have one file each). "
             f"{result['train_per_task']} training rows a task ({result['num_epochs']:g} epochs, batch 16, grouped by "
             f"length, {result['max_length']} tokens at most; learning rate: "
             + ", ".join(f"{METHOD_LABELS.get(method, method)} {rate:g}"
                         for method, rate in sorted(result["learning_rates"].items()))
             + f"; {result['threads']} thread(s) a run), "
             f"{result['test_per_task']} test rows a task (test rows whose normalised text is a training row's "
             f"are dropped first: {result['test_dropped_as_training']}); every model predicts over all 25 labels. "
             "Orders: "
             + "; ".join(f"{k}: {' -> '.join(v)}" for k, v in result["orders"].items()) + "."
             + (f" Routers (the task not given): a linear router (softmax regression over the tasks) and the nearest "
                f"task centroid, both over the frozen MiniLM's {ROUTER_FEATURES[result['router']['layers']]} of "
                f"{result['router']['examples_per_task']} training rows per task." if result.get("router") else ""),
             "",
             "| strategy | told the task | average accuracy | forgetting | backward transfer | routing accuracy "
             "| trainable params / task | adapter / task | training s | peak MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def cell(summary: dict, metric: str, points: bool = False) -> str:
        if metric not in summary:
            return "-"
        value = summary[metric]
        scale = 100 if points else 1
        text = f"{value['mean'] * scale:.1f}" if points else f"{value['mean']:.3f}"
        if len(summary["orders"]) > 1:
            text += (f" ({value['min'] * scale:.1f} to {value['max'] * scale:.1f})" if points
                     else f" ({value['min']:.3f}-{value['max']:.3f})")
        return text

    for key, label, told in ROWS:
        s = result["summary"].get(key)
        if s is None:
            continue
        lines.append(f"| {label} | {'yes' if told else 'no'} | {cell(s, 'average_accuracy')} | "
                     f"{cell(s, 'forgetting', True)} | {cell(s, 'backward_transfer', True)} | "
                     f"{cell(s, 'routing_accuracy')} | {s['trainable_params_per_task']:,} | "
                     f"{format_bytes(s['adapter_bytes_per_task'])} | "
                     f"{s['train_seconds']['mean']:.0f} | {s['peak_memory_mb']:.0f} |")
    lines += ["", "Average accuracy after the last task (mean over the orders, range in brackets); forgetting and "
              "backward transfer in points. Forgetting: each earlier task's best accuracy before the last task "
              "minus its last; backward transfer: last minus just-trained. Adapter / task: the saved weights a task "
              "adds (OSF: the per-task adapter that is merged into the backbone).", ""]
    lines += ["## Per order", "", "| strategy | order | average accuracy | forgetting | backward transfer |",
              "|---|---:|---:|---:|---:|"]
    for key, label, _ in ROWS:
        for order, row in sorted(result["per_order"].get(key, {}).items(), key=lambda kv: int(kv[0])):
            bwt, forgot = row["backward_transfer"], row["forgetting"]
            lines.append(f"| {label} | {order} | {row['average_accuracy']:.3f} | "
                         f"{'-' if forgot is None else f'{forgot * 100:.1f}'} | "
                         f"{'-' if bwt is None else f'{bwt * 100:.1f}'} |")
    check = result["targets"]
    if check:
        lines += ["", f"Target: the best strategy not told the task ({labels[check['best_without_task_id']]}) is "
                  f"{abs(check['below_joint']) * 100:.1f} points {'below' if check['below_joint'] > 0 else 'above'} joint "
                  f"training (target: at most {TARGET_GAP * 100:.0f} below) "
                  f"with forgetting {check['forgetting'] * 100:.1f} points (target <= {TARGET_FORGETTING * 100:.0f}): "
                  f"{'met' if check['met'] else 'missed'}."]
    if result["missing"]:
        lines += ["", "Not finished yet: " + ", ".join(result["missing"]) + "."]
    lines += ["", provenance_line(result["environment"]), ""]
    (out / f"{NAME}.md").write_text("\n".join(lines))
    plot(result, out / f"{NAME}.png")


def plot(result: dict, path: Path) -> None:
    """A heatmap of each strategy's accuracy matrix (its first order), and bars of average accuracy and forgetting."""
    labels = {key: label for key, label, _ in ROWS}
    shown = [key for key, _, _ in ROWS if key in result["per_order"]]
    columns = 3
    heat_rows = max(1, -(-len(shown) // columns))
    figure = Figure(figsize=(14, 3.6 * heat_rows + 4))
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(heat_rows + 1, columns)
    for i, key in enumerate(shown):
        order, run = min(result["per_order"][key].items(), key=lambda kv: int(kv[0]))
        matrix = [[float("nan") if v is None else v for v in row] for row in run["matrix"]]
        tasks = ORDERS[int(order)]
        axis = figure.add_subplot(grid[i // columns, i % columns])
        image = axis.imshow(matrix, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for r, row in enumerate(matrix):
            for c, value in enumerate(row):
                if value == value:
                    axis.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7,
                              color="white" if value < 0.6 else "black")
        axis.set_xticks(range(len(tasks)), tasks, fontsize=7)
        axis.set_yticks(range(len(matrix)), ["all tasks"] if key == "joint" else [f"after {t}" for t in tasks],
                        fontsize=7)
        axis.set_title(f"{labels[key]} (order {order})", fontsize=8)
        figure.colorbar(image, ax=axis, fraction=0.04)
    bars = figure.add_subplot(grid[heat_rows, :])
    summary = result["summary"]
    names = [key for key in shown if "average_accuracy" in summary[key]]
    xs = range(len(names))
    for offset, metric, colour in ((-0.2, "average_accuracy", "tab:blue"), (0.2, "forgetting", "tab:red")):
        means = [summary[k].get(metric, {}).get("mean", 0.0) for k in names]
        low = [m - summary[k].get(metric, {}).get("min", m) for k, m in zip(names, means)]
        high = [summary[k].get(metric, {}).get("max", m) - m for k, m in zip(names, means)]
        bars.bar([x + offset for x in xs], means, width=0.4, color=colour, yerr=[low, high], capsize=3,
                 label=metric.replace("_", " ") + " (mean over orders, range)")
    bars.set_xticks(list(xs), [textwrap.fill(labels[k], 22) for k in names], fontsize=7)
    bars.set_ylim(0, 1)
    bars.grid(axis="y", alpha=0.3)
    bars.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--orders", nargs="+", type=int, choices=sorted(ORDERS), default=sorted(ORDERS))
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each run (runs go one at a time)")
    parser.add_argument("--run-dir", type=Path, default=None, help="default outputs/continual (_quick)")
    parser.add_argument("--records", type=Path, default=None,
                        help="where each finished run's results are kept and read (default benchmarks/results/"
                             "continual_runs; with --quick, records/ in --run-dir)")
    parser.add_argument("--model", default=None, help="train this backbone instead of the config's (model=...)")
    parser.add_argument("--report-only", action="store_true", help="train nothing: report the finished runs")
    parser.add_argument("--quick", action="store_true", help=f"a smoke run: {' '.join(QUICK)}")
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results (outputs/bench_quick)")
    args = parser.parse_args(argv)
    args.run_dir = (args.run_dir or REPO / "outputs" / ("continual_quick" if args.quick else "continual")).resolve()
    args.records = (args.records or (args.run_dir / "records" if args.quick else RESULTS / "continual_runs")).resolve()
    args.out = args.out or (REPO / "outputs" / "bench_quick" / "results" if args.quick else RESULTS)
    started = time.perf_counter()
    jobs = jobs_for(args.strategies, args.orders)
    if not args.report_only:
        train([job for job in jobs if finished(job, args) is None], args)
    per_order: dict[str, dict[int, dict]] = {}
    missing = []
    train_per_task = test_per_task = dropped = num_epochs = max_length = router = None
    learning_rates: dict[str, float] = {}
    for job in jobs:
        run = finished(job, args)
        if run is None:
            missing.append(f"{job[0]} order {job[1]}")
            continue
        train_per_task, test_per_task = run["train_per_task"], run["test_per_task"]
        dropped = sum(run["test_dropped_as_training"].values())
        num_epochs, max_length = run["num_epochs"], run["max_length"]
        learning_rates[run["method"]] = run["learning_rate"]
        router = run.get("router") or router
        for key, row in rows_of(run).items():
            per_order.setdefault(key, {})[job[1]] = row
    if not per_order:
        raise SystemExit(f"continual: no finished run to report ({', '.join(missing)}; finished runs are read from "
                         f"{args.records} and {args.run_dir})")
    summary = summarise(per_order)
    result = {
        "benchmark": NAME, "orders": {k: ORDERS[k] for k in args.orders}, "strategies": args.strategies,
        "quick": args.quick, "model": args.model or "minilm", "threads": args.threads, "train_per_task": train_per_task,
        "num_epochs": num_epochs, "max_length": max_length, "learning_rates": learning_rates,
        "test_per_task": test_per_task, "test_dropped_as_training": dropped, "router": router,
        "partial": bool(missing),
        "missing": missing, "per_order": per_order,
        "summary": summary, "targets": targets(summary), "wall_seconds": time.perf_counter() - started,
        "environment": environment_record(),
    }
    write_results(result, args.out)
    print((args.out / f"{NAME}.md").read_text())


if __name__ == "__main__":
    main()
