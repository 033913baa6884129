"""Every MiniLM adapter method trained to its plateau on SST-2 and CoNLL-2003: learning curves, the best validation
score, the test score at that step, and the steps and training time to reach 99 % of it.

Each method variant of `adapter_methods.VARIANTS` trains through its recipe for at most `BUDGETS` epochs (3 on SST-2,
10 on CoNLL-2003) and stops early when its validation score (SST-2 ``dev.tsv`` accuracy on rows of at least 10
words, `VALIDATION`; CoNLL ``eng.testa`` entity F1; first 1000) has not improved for ``patience`` evaluations; validation and test are scored every ``eval_every``
steps. Batches are grouped by length (``group_by_length``: dynamic padding pads little) and every run has one
thread, ``--parallel`` runs side by side.

Learning rates: the short-budget sweep (300 steps: `adapter_methods.py`'s ``<task>.json`` under ``--results``, and
for the methods it lacks, such as ``dora`` or ``vera``, `method_comparison.py`'s ``method_comparison.json``) ranks
each method's rates on validation; its best (rank 1) and second best (rank 2) rates train at the long budget, and the
rate with the better best validation score there is chosen. Both are shown when they differ. ``--lower-rate`` trains
only the lower of the two (and reads the other where it has run), the one the long budget chose for every
adapter-weight method of ``convergence.md`` (LoRA, QLoRA, IA3, BitFit, full). Every variant of
`adapter_methods.VARIANTS` is accepted (``--methods lora_all_linear dora rslora pissa``); one without short-budget
runs is refused with the command that makes them. ``newcomer`` names, per task, the newer tuner (not a LoRA preset:
LoHa, VeRA, SHiRA, ...) with the best validation score in ``method_comparison.json``.

Targets: full fine-tuning's test score, the gap of LoRA and its presets (and BitFit on SST-2) to it, and which
methods close the gap (at most `CLOSE_TO_FULL` below full: 1 point on SST-2, 1.5 on CoNLL-2003), with their trainable
parameters; the closest where none does.

Runs live in ``--run-dir`` as ``<task>_<variant>_lr<LR>`` and survive interruptions: an interrupted run continues
from its newest checkpoint (one per evaluation; `_runs.run_recipe`), and each finished run leaves a record (results,
config, evaluations, CPU: a few KB) under ``--records``, ``benchmarks/results/convergence_runs/`` in the repository, which
later sessions read instead of training again; so the sweep spans sessions, and results written before every run is
done are marked PARTIAL. Writes
``convergence.{json,md,png}`` to ``--out``: per method the chosen rate, best validation score and its step, the test
score at that step, steps / epochs / training seconds to reach 99 % of the best validation score, training seconds
in all, peak memory; the curves (test score against steps and against training seconds, one line per method).

    .venv/bin/python benchmarks/convergence.py [--tasks sst2 conll03] [--methods full lora bitfit] [--ranks 1 2]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Optional

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib import colormaps
from matplotlib.figure import Figure
from tqdm import tqdm

from _env import environment_record, provenance_line
from _runs import MACHINE_FILE, RESULTS_FILE, finished_dir as finished_in, keep_record, requested_config, run_recipe
from adapter_methods import DEFAULT_METHODS, LABELS, METHODS, OTHER_TUNERS, TASKS, VARIANTS, config_path
from peftprompt.report import format_bytes

NAME = "convergence"
REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
# task: epochs at most, evaluation every N optimiser steps (a tenth / a half of an epoch of batch 16), patience in
# evaluations (one epoch / three epochs), the validation metric watched (a key of the recipe's evaluations)
BUDGETS = {
    "sst2": {"num_epochs": 3, "eval_every": 421, "patience": 10, "metric": "accuracy"},
    "conll03": {"num_epochs": 10, "eval_every": 439, "patience": 6, "metric": "entity_f1"},
}
# SST-2's dev.tsv holds GLUE training phrases (median 7 words, mostly fragments), its test.tsv whole sentences
# (median 19): the validation keeps the dev rows of at least 10 words, so the step it picks suits sentences
VALIDATION = {"sst2": ["data.eval_min_words=10"], "conll03": []}
LORA_GAP_METHODS = ("lora", "lora_all_linear", "dora", "rslora", "pissa")  # LoRA, and presets that may close its gap
TARGETS = {  # task: (full fine-tuning's test score at least, {variant: at most this far below full})
    "sst2": (0.90, {**dict.fromkeys(LORA_GAP_METHODS, 0.01), "bitfit": 0.02}),
    "conll03": (0.88, dict.fromkeys(LORA_GAP_METHODS, 0.015)),
}
CLOSE_TO_FULL = {"sst2": 0.01, "conll03": 0.015}  # task: a method at most this far below full closes the gap
NEWCOMER = "newcomer"
"""In ``--methods``: per task, the tuner of `adapter_methods.OTHER_TUNERS` with the best validation score at 300 steps
(`method_comparison.py`'s chosen rows)."""
PRECISION_LABELS = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}
REACHED = 0.99  # the share of the best validation score whose first reaching is timed
QUICK = {"num_epochs": 2, "eval_every": 3, "patience": 2, "max_train_samples": 48, "max_eval_samples": 16}
QUICK_METHODS = ("lora", "bitfit")


def short_budget(task: str, results: Path) -> tuple[list[dict], list[dict]]:
    """The short-budget runs of `task` (every rate) and each method's chosen run: `adapter_methods.py`'s
    ``<task>.json``, then, for the methods it lacks, the task's runs in `method_comparison.py`'s
    ``method_comparison.json`` (the same 300 steps x batch 16)."""
    sweep, chosen = [], []
    path = results / f"{task}.json"
    if path.is_file():
        data = json.loads(path.read_text())
        sweep, chosen = list(data["sweep"]), list(data["results"])
    comparison = results / "method_comparison.json"
    if comparison.is_file():
        data = json.loads(comparison.read_text())["tasks"].get(task, {})
        known = {run["method"] for run in sweep}
        sweep += [run for run in data.get("sweep", []) if run["method"] not in known]
        chosen += [row for row in data.get("results", []) if row["method"] not in known]
    return sweep, chosen


def best_newcomer(task: str, results: Path) -> Optional[str]:
    """The `NEWCOMER` of `task`: the tuner of `OTHER_TUNERS` whose chosen 300-step run in ``method_comparison.json``
    has the best validation score (ties: the fewer trainable parameters); `None` before that sweep is in."""
    path, dev = results / "method_comparison.json", TASKS[task][2]
    rows = json.loads(path.read_text())["tasks"].get(task, {}).get("results", []) if path.is_file() else []
    rows = [r for r in rows if r["method"] in OTHER_TUNERS]
    return max(rows, key=lambda r: (r[dev], -r["trainable_params"]))["method"] if rows else None


def ranked_rates(task: str, results: Path) -> dict[str, list[float]]:
    """Each method's learning rates of the short-budget sweep (`short_budget`), best validation score first (ties:
    the smaller rate)."""
    dev = TASKS[task][2]
    rates: dict[str, list[tuple[float, float]]] = {}
    for run in short_budget(task, results)[0]:
        rates.setdefault(run["method"], []).append((run[dev], run["learning_rate"]))
    return {method: [lr for _, lr in sorted(runs, key=lambda x: (-x[0], x[1]))] for method, runs in rates.items()}


def run_name(task: str, method: str, lr: float) -> str:
    return f"{task}_{method}_lr{lr:g}"


def overrides(task: str, method: str, lr: float, quick: bool, model: Optional[str]) -> list[str]:
    budget = {**BUDGETS[task], **(QUICK if quick else {})}
    return [
        "max_steps=null", f"num_epochs={budget['num_epochs']}", f"eval_every={budget['eval_every']}",
        f"early_stopping_patience={budget['patience']}", f"metric_for_best={budget['metric']}",
        "group_by_length=true", "save_every=0", "keep_checkpoints=1", f"learning_rate={lr:g}", *VARIANTS[method][1],
        *VALIDATION[task],
        *([f"max_train_samples={budget['max_train_samples']}", f"max_eval_samples={budget['max_eval_samples']}"]
          if quick else []),
        *([f"model={model}"] if model else []),
    ]


def read_curve(run_dir: Path, metric: str) -> list[dict]:
    """The run's evaluations (``metrics.jsonl``), one per step (an evaluation repeated after an interruption: the
    last), in step order: step, epoch, training seconds, validation and test score."""
    evals: dict[int, dict] = {}
    log = run_dir / "metrics.jsonl"
    for line in log.read_text().splitlines() if log.is_file() else []:
        record = json.loads(line)
        if record.get("type") == "eval":
            evals[record["step"]] = {"step": record["step"], "epoch": record["epoch"],
                                     "seconds": record.get("step_seconds"), "dev": record[metric],
                                     "test": record[f"test_{metric}"]}
    return [evals[step] for step in sorted(evals)]


def summarise_run(task: str, method: str, lr: float, run: dict, curve: list[dict]) -> dict:
    """A finished run's row: its best validation evaluation (first of equals), the test score there, and the
    first evaluation reaching `REACHED` of the best validation score."""
    best = max(curve, key=lambda e: e["dev"])
    reached = next(e for e in curve if e["dev"] >= REACHED * best["dev"])
    return {
        "task": task, "method": method, "label": LABELS[method], "learning_rate": lr,
        "best_dev": best["dev"], "best_step": best["step"], "best_epoch": best["epoch"], "test_at_best": best["test"],
        "reached_step": reached["step"], "reached_epoch": reached["epoch"], "reached_seconds": reached["seconds"],
        "steps": run["global_step"], "epochs": curve[-1]["epoch"], "step_seconds": run.get("step_seconds"),
        "stopped_early": run["global_step"] < run["total_steps"],
        "trainable_params": run["trainable_params"], "trainable_pct": run["trainable_pct"],
        "adapter_bytes": run["adapter_bytes"], "peak_memory_mb": run.get("peak_memory_mb"),
        "mixed_precision": run.get("mixed_precision"), "cpu_model": run.get("cpu_model"), "curve": curve,
    }


def finished_dir(job: tuple[str, str, float], args: argparse.Namespace) -> Optional[Path]:
    """Where the finished run of `job` with the requested config lies: its record under ``--records`` (kept in the
    repository, so a later session reads it) or its run directory; `None` when it has not finished."""
    task, method, lr = job
    name = run_name(*job)
    requested = requested_config(config_path(task, method), overrides(task, method, lr, args.quick, args.model),
                                 args.run_dir / name)
    return finished_in(requested, args.records / name, args.run_dir / name)


def read_run(directory: Path) -> dict:
    """A finished run's ``results.json`` with ``total_steps`` (the budget in steps, from its ``start`` record) and
    ``cpu_model`` (`None` where its record predates ``machine.json``)."""
    start = json.loads((directory / "metrics.jsonl").read_text().splitlines()[0])
    machine = directory / MACHINE_FILE
    cpu = json.loads(machine.read_text())["cpu_model"] if machine.is_file() else None
    return {**json.loads((directory / RESULTS_FILE).read_text()), "total_steps": start["total_steps"], "cpu_model": cpu}


def run_jobs(jobs: list[tuple[str, str, float]], args: argparse.Namespace) -> None:
    """Train (or continue) each ``(task, method, lr)`` of `jobs`, `args.parallel` at a time, and keep a record of
    each as it finishes (`keep_record`). A failed run is reported and the others go on."""

    def train(task: str, method: str, lr: float) -> None:
        name = run_name(task, method, lr)
        run_recipe(config_path(task, method), overrides(task, method, lr, args.quick, args.model), args.run_dir / name,
                   recipe=TASKS[task][0], resume=True, log=args.run_dir / f"{name}.log", env={"OMP_NUM_THREADS": "1"})
        keep_record(args.run_dir / name, args.records)

    with tqdm(total=len(jobs), desc="convergence runs", unit="run") as bar, ThreadPoolExecutor(args.parallel) as pool:
        futures = {pool.submit(train, *job): job for job in jobs}
        for future in as_completed(futures):
            job = futures[future]
            try:
                future.result()
            except RuntimeError as err:
                tqdm.write(f"convergence: {err}")
            bar.set_postfix_str(run_name(*job))
            bar.update()


def choose(rows: list[dict], rates: dict[str, list[float]]) -> list[dict]:
    """Per (task, method), the finished run with the best validation score; ``short_budget_lr`` is the sweep's
    choice and ``other_rates`` the other long-budget runs (rate, best validation, test at best)."""
    chosen = []
    for key in dict.fromkeys((r["task"], r["method"]) for r in rows):
        runs = [r for r in rows if (r["task"], r["method"]) == key]
        best = max(runs, key=lambda r: (r["best_dev"], -r["learning_rate"]))
        chosen.append({**best, "short_budget_lr": rates[key[0]][key[1]][0],
                       "other_rates": [{k: r[k] for k in ("learning_rate", "best_dev", "test_at_best")}
                                       for r in runs if r is not best]})
    return chosen


def targets(chosen: list[dict]) -> dict:
    """Each task's targets against the chosen runs: full fine-tuning's test score, and each named method's gap to
    it (test at the best validation step); None where a run is missing."""
    out = {}
    for task, (floor, gaps) in TARGETS.items():
        rows = {r["method"]: r for r in chosen if r["task"] == task}
        if "full" not in rows:
            continue
        full = rows["full"]["test_at_best"]
        out[task] = {"full": {"value": full, "target": floor, "met": full >= floor}}
        for method, gap in gaps.items():
            if method in rows:
                below = full - rows[method]["test_at_best"]
                out[task][method] = {"below_full": below, "target": gap, "met": below <= gap}
        others = sorted(({"method": m, "label": r["label"], "trainable_params": r["trainable_params"],
                          "below_full": full - r["test_at_best"]} for m, r in rows.items() if m != "full"),
                        key=lambda o: (o["below_full"], o["trainable_params"]))
        within = sorted((o for o in others if o["below_full"] <= CLOSE_TO_FULL[task]),
                        key=lambda o: o["trainable_params"])
        tied = [o for o in others[1:] if math.isclose(o["below_full"], others[0]["below_full"])]
        out[task]["close_to_full"] = {"target": CLOSE_TO_FULL[task], "met": bool(within), "within": within,
                                      "closest": others[0] if others else None, "tied_with_closest": tied}
    return out


def write_results(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# PEFT methods at convergence, MiniLM{' (PARTIAL: runs missing)' if result['partial'] else ''}", ""]
    for task, budget in result["budgets"].items():
        lines.append(f"- {TASKS[task][3]}: at most {budget['num_epochs']} epochs of batch 16, validation and test every "
                     f"{budget['eval_every']} steps, early stopping after {budget['patience']} evaluations without a "
                     f"better validation {budget['metric']}"
                     + (" (validation: the first 1000 `dev.tsv` rows of at least 10 words; `dev.tsv` holds GLUE "
                        "training phrases, mostly fragments, the test set whole sentences)." if task == "sst2" else
                        " (validation: the first 1000 sentences of `eng.testa`)."))
    lines += ["", "Batches grouped by length, linear schedule with 6 % warm-up, one thread per run, "
              f"{result['parallel']} runs side by side. Learning rate: the short-budget sweep's best and second best "
              "(300 steps: `adapter_methods.py`, or `method_comparison.py` for the methods it lacks) trained at the "
              "long budget, the better validation score chosen"
              + ("; a method without an 'other long-budget rate' below trained only the lower of the two "
                 "(`--lower-rate`). " if result.get("lower_rate") else ". ") +
              "Test: the score at the step of the best validation score. Reach 99 %: the first evaluation with "
              "at least 99 % of the best validation score (training seconds exclude evaluation). Precision: what "
              "`mixed_precision: auto` chose on the CPU that ran the run (bf16 autocast with native bf16, else fp32; "
              "records from before the CPU was kept say `not recorded`); seconds compare only between runs on the "
              "same CPU.", ""]
    for task in result["budgets"]:
        rows = [r for r in result["chosen"] if r["task"] == task]
        if not rows:
            continue
        metric = TASKS[task][1]
        lines += [f"## {TASKS[task][3]}", "",
                  f"| method | trainable params | adapter size | learning rate (300-step choice) | best validation "
                  f"| test {metric} at best | best at step (epoch) | 99 % at step (epoch) | 99 % at s | steps run "
                  "| training s | peak MB | 300-step test | precision, CPU |",
                  "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            short = "" if r["short_budget_lr"] == r["learning_rate"] else f" ({r['short_budget_lr']:g})"
            peak = "-" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
            at_300 = result["short_budget"].get(task, {}).get(r["method"])
            lines.append(
                f"| {r['label']} | {r['trainable_params']:,} | {format_bytes(r['adapter_bytes'])} | "
                f"{r['learning_rate']:g}{short} | {r['best_dev']:.4f} | {r['test_at_best']:.4f} | "
                f"{r['best_step']} ({r['best_epoch']:.2f}) | {r['reached_step']} ({r['reached_epoch']:.2f}) | "
                f"{r['reached_seconds']:.0f} | {r['steps']}{' (stopped early)' if r['stopped_early'] else ''} | "
                f"{r['step_seconds']:.0f} | {peak} | {'-' if at_300 is None else f'{at_300:.4f}'} | "
                f"{PRECISION_LABELS.get(r['mixed_precision'], r['mixed_precision'])}, "
                f"{r['cpu_model'] or 'not recorded'} |")
        others = [f"{r['label']} at {o['learning_rate']:g}: validation {o['best_dev']:.4f}, test {o['test_at_best']:.4f}"
                  for r in rows for o in r["other_rates"]]
        if others:
            lines += ["", "Other long-budget rates: " + "; ".join(others) + "."]
        lines.append("")
    for task, checks in result["targets"].items():
        parts = [f"full {checks['full']['value']:.4f} (target >= {checks['full']['target']:.2f}: "
                 f"{'met' if checks['full']['met'] else 'missed'})"]
        parts += [f"{LABELS[m]} {_gap(c['below_full'], c['target'])} full (target: at most "
                  f"{c['target'] * 100:.1f} below: {'met' if c['met'] else 'missed'})"
                  for m, c in checks.items() if m not in ("full", "close_to_full")]
        lines.append(f"Targets, {TASKS[task][3]}: " + "; ".join(parts) + ".")
        close = checks["close_to_full"]
        if close["within"]:
            lines.append(f"Within {close['target'] * 100:.1f} points of full fine-tuning: " + "; ".join(
                f"{o['label']} ({o['trainable_params']:,} trainable parameters, "
                f"{_gap(o['below_full'], close['target'])} full)" for o in close["within"]) + ".")
        elif close["closest"]:
            o = close["closest"]
            level = "".join(f", level with {t['label']} ({t['trainable_params']:,})"
                            for t in close["tied_with_closest"])
            lines.append(f"No method is within {close['target'] * 100:.1f} points of full fine-tuning; the closest: "
                         f"{o['label']} ({o['trainable_params']:,} trainable parameters, "
                         f"{_gap(o['below_full'], close['target'])} full{level}).")
    if result["missing"]:
        lines += ["", "Not finished yet: " + ", ".join(result["missing"]) + "."]
    lines += ["", provenance_line(result["environment"]), ""]
    (out / f"{NAME}.md").write_text("\n".join(lines))
    plot(result, out / f"{NAME}.png")


def _gap(below_full: float, target: float) -> str:
    """`below_full` in points, to two decimals, or to three where two would round it onto `target`."""
    points, bound = abs(below_full) * 100, target * 100
    digits = 3 if f"{points:.2f}" == f"{bound:.2f}" and not math.isclose(points, bound) else 2
    return f"{points:.{digits}f} points {'below' if below_full >= 0 else 'above'}"


TAB20 = colormaps["tab20"]


def plot(result: dict, path: Path) -> None:
    """Per task: test score against optimiser steps and against training seconds, one line per method."""
    tasks = [t for t in result["budgets"] if any(r["task"] == t for r in result["chosen"])]
    figure = Figure(figsize=(13, 4.2 * max(len(tasks), 1)))
    FigureCanvasAgg(figure)
    for i, task in enumerate(tasks):
        for j, (x, xlabel) in enumerate((("step", "optimiser steps (batch 16)"), ("seconds", "training seconds"))):
            axis = figure.add_subplot(len(tasks), 2, 2 * i + j + 1)
            for k, r in enumerate(r for r in result["chosen"] if r["task"] == task):
                light = k // 10 % 2  # tab20's ten dark colours, then its ten light ones dashed: 20 methods apart
                line, = axis.plot([e[x] for e in r["curve"]], [e["test"] for e in r["curve"]], marker=".",
                                  markersize=3, linewidth=1, color=TAB20(2 * (k % 10) + light),
                                  linestyle="--" if light else "-",
                                  label=f"{r['label']} (lr {r['learning_rate']:g})")
                best = next(e for e in r["curve"] if e["step"] == r["best_step"])  # the step validation chose
                axis.plot(best[x], best["test"], marker="*", markersize=10, color=line.get_color())
            axis.set_xlabel(xlabel)
            axis.set_ylabel(f"test {TASKS[task][1]}")
            axis.set_title(f"{TASKS[task][3]}: up to {result['budgets'][task]['num_epochs']} epochs "
                           "(star: the best validation step)", fontsize=9)
            axis.grid(alpha=0.3)
            if j == 1:
                axis.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=["sst2", "conll03"])
    parser.add_argument("--methods", nargs="+", choices=[*METHODS, NEWCOMER], default=None,
                        help=f"default: {', '.join(DEFAULT_METHODS)} (the variants of sst2.json / conll03.json); "
                             f"{NEWCOMER}: per task, the best validated newer tuner of method_comparison.json")
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 2],
                        help="which of the short-budget sweep's rates train at the long budget (1: its best)")
    parser.add_argument("--lower-rate", action="store_true",
                        help="of the --ranks rates, train only the lowest (read the others where they have run)")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--run-dir", type=Path, default=None, help="default outputs/convergence (_quick)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the short-budget sweeps' JSON lies")
    parser.add_argument("--records", type=Path, default=None,
                        help="where each finished run's record is kept and read (default benchmarks/results/"
                             "convergence_runs, in the repository; with --quick, records/ in --run-dir)")
    parser.add_argument("--model", default=None, help="train this backbone instead of the config's (model=...)")
    parser.add_argument("--report-only", action="store_true", help="train nothing: report the finished runs")
    parser.add_argument("--quick", action="store_true", help=f"a smoke run: {QUICK}, methods {QUICK_METHODS}")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.methods = args.methods or list(QUICK_METHODS if args.quick else DEFAULT_METHODS)
    args.run_dir = (args.run_dir or REPO / "outputs" / ("convergence_quick" if args.quick else "convergence")).resolve()
    args.records = (args.records or (args.run_dir / "records" if args.quick else RESULTS / "convergence_runs")).resolve()
    started = time.perf_counter()
    rates = {task: ranked_rates(task, args.results) for task in args.tasks}
    newcomer = {task: best_newcomer(task, args.results) for task in args.tasks}
    if NEWCOMER in args.methods and None in newcomer.values():
        raise SystemExit(f"convergence: {NEWCOMER} needs the 300-step results of every tuner: run "
                         f"benchmarks/method_comparison.py --tasks {' '.join(args.tasks)} first (no "
                         f"{args.results / 'method_comparison.json'} with them)")
    methods = {task: [newcomer[task] if m == NEWCOMER else m for m in args.methods] for task in args.tasks}
    unswept = [f"{task} {method}" for task in args.tasks for method in methods[task] if method not in rates[task]]
    if unswept:
        raise SystemExit(f"convergence: no short-budget rates for {', '.join(unswept)} under {args.results}: run "
                         f"benchmarks/method_comparison.py --tasks {' '.join(args.tasks)} --methods "
                         f"{' '.join(dict.fromkeys(u.split()[1] for u in unswept))} first")
    # method by method (the order of --methods), so the methods a target names can come first
    pairs = list(dict.fromkeys((task, methods[task][i]) for i in range(len(args.methods)) for task in args.tasks))
    ranked = {(task, method): [rates[task][method][rank - 1] for rank in sorted(args.ranks)
                               if rank <= len(rates[task][method])] for task, method in pairs}
    jobs = [(task, method, lr) for (task, method), lrs in ranked.items()
            for lr in ([min(lrs)] if args.lower_rate and lrs else lrs)]
    if not args.report_only:
        run_jobs([job for job in jobs if finished_dir(job, args) is None], args)
    rows, missing = [], []
    also_read = [(task, method, lr) for (task, method), lrs in ranked.items() for lr in lrs
                 if (task, method, lr) not in jobs]
    for job in jobs + also_read:  # a finished run at a rate --lower-rate skips is read, never missing
        directory = finished_dir(job, args)
        if directory is not None and directory.parent == args.run_dir:  # finished before records were kept
            keep_record(directory, args.records)
        curve = read_curve(directory, BUDGETS[job[0]]["metric"]) if directory else []
        if not curve:
            if job in jobs:
                missing.append(run_name(*job))
            continue
        rows.append(summarise_run(*job, read_run(directory), curve))
    chosen = choose(rows, rates)
    short_budget_test = {task: {r["method"]: r[TASKS[task][1]] for r in short_budget(task, args.results)[1]}
                         for task in args.tasks}
    result = {
        "benchmark": NAME, "budgets": {t: {**BUDGETS[t], **(QUICK if args.quick else {})} for t in args.tasks},
        "reached_share": REACHED, "ranks": sorted(args.ranks), "lower_rate": args.lower_rate,
        "parallel": args.parallel, "quick": args.quick,
        "model": args.model or "minilm", "newcomer": newcomer if NEWCOMER in args.methods else None,
        "partial": bool(missing), "missing": missing, "runs": rows,
        "chosen": chosen, "short_budget": short_budget_test, "targets": targets(chosen),
        "wall_seconds": time.perf_counter() - started, "environment": environment_record(),
    }
    write_results(result, args.out)
    print((args.out / f"{NAME}.md").read_text())


if __name__ == "__main__":
    main()
