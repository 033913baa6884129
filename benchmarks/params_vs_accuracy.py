"""Trainable parameters against accuracy for every adapter method, on SST-2 and CoNLL-2003 (MiniLM) and self-ask
(SmolLM2), with the Pareto front of each task.

Reads the ``results`` rows of ``sst2.json`` and ``conll03.json`` (``benchmarks/adapter_methods.py``: test accuracy /
entity F1 at the learning rate chosen on the validation split) and ``selfask_methods.json``
(``benchmarks/selfask_methods.py``: zero-shot self-ask exact match on Compositional Celebrities) from ``--results``,
and, when it is there, ``convergence.json`` (``benchmarks/convergence.py``: the same MiniLM methods trained to their
plateau, the test score at the best validation step) as a budget of its own. A method is on the Pareto front of its
task and budget when no other method there reaches at least its metric with at most its trainable parameters (and
does better on one of the two). Writes ``params_vs_accuracy.{json,md,png}`` to ``--out``: one row per method, task
and budget (trainable parameters, %, adapter size, metric, train seconds, peak memory), and one panel per task and
budget (named on the panel), metric against trainable parameters on a log axis, the front drawn as a step line.

    .venv/bin/python benchmarks/params_vs_accuracy.py [--results benchmarks/results] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from _env import environment_record
from _plot import scatter_labelled
from adapter_methods import DEFAULT_METHODS, LABELS
from peftprompt.report import format_bytes

NAME = "params_vs_accuracy"
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks/results"
SOURCES = {  # result file stem: (task, metric key in its rows, metric name, the command that writes it)
    "sst2": ("SST-2", "accuracy", "accuracy", "benchmarks/adapter_methods.py --task sst2"),
    "conll03": ("CoNLL-2003", "entity_f1", "entity F1", "benchmarks/adapter_methods.py --task conll03"),
    "selfask_methods": ("self-ask", "em", "exact match", "benchmarks/selfask_methods.py"),
}
MODELS = {"minilm": "MiniLM", "smollm2-135m": "SmolLM2-135M"}
CONVERGED = "convergence"  # benchmarks/convergence.py's result, read when it is there


def pareto_flags(points: list[tuple[float, float]]) -> list[bool]:
    """For each ``(trainable_params, metric)``, whether no other point has at most its parameters and at least its
    metric, with fewer parameters or a higher metric (the front of the fewest parameters and the highest metric)."""
    return [not any(p <= params and m >= metric and (p < params or m > metric) for p, m in points)
            for params, metric in points]


def with_pareto_flags(rows: list[dict]) -> list[dict]:
    """`rows` with ``pareto`` set within each (task, budget), sorted by trainable parameters."""
    for group in dict.fromkeys((r["task"], r["budget"]) for r in rows):
        members = [r for r in rows if (r["task"], r["budget"]) == group]
        for row, flag in zip(members, pareto_flags([(r["trainable_params"], r["value"]) for r in members])):
            row["pareto"] = flag
    return sorted(rows, key=lambda r: r["trainable_params"])


def read_rows(stem: str, data: dict) -> list[dict]:
    """The rows of one result file as rows of this table, Pareto flags set, sorted by trainable parameters."""
    task, key, metric, _ = SOURCES[stem]
    rows = []
    for r in data["results"]:
        model = r.get("model") or data.get("model")
        rows.append({
            "task": task,
            "budget": f"{data.get('steps')} steps" if data.get("steps") else "",
            "model": MODELS.get(model, model),
            "method": r["method"],
            "label": r.get("label") or LABELS.get(r["method"], r["method"]),  # files written before labels
            "trainable_params": r["trainable_params"],
            "trainable_pct": r["trainable_pct"],
            "adapter_bytes": r["adapter_bytes"],
            "metric": metric,
            "value": r[key],
            "learning_rate": r.get("learning_rate"),
            "train_seconds": r["train_seconds"],
            "peak_memory_mb": r.get("peak_memory_mb"),
        })
    return with_pareto_flags(rows)


def read_converged_rows(data: dict) -> list[dict]:
    """The methods trained to their plateau (``convergence.json``'s chosen runs: the test score at the best
    validation step) as rows of this table, a budget of their own per task (``PARTIAL`` while methods are missing)."""
    rows = []
    done = Counter(r["task"] for r in data["chosen"] if r["method"] in DEFAULT_METHODS)  # swept methods per task
    for r in data["chosen"]:
        task, _, metric, _ = SOURCES[r["task"]]
        budget = data["budgets"][r["task"]]
        rows.append({
            "task": task, "model": MODELS.get(data["model"], data["model"]), "method": r["method"], "label": r["label"],
            "budget": f"plateau, <= {budget['num_epochs']} epochs" + (
                "" if done[r["task"]] == len(DEFAULT_METHODS)
                else f" (PARTIAL: {done[r['task']]} of {len(DEFAULT_METHODS)} methods)"),
            "trainable_params": r["trainable_params"], "trainable_pct": r["trainable_pct"],
            "adapter_bytes": r["adapter_bytes"], "metric": metric, "value": r["test_at_best"],
            "learning_rate": r["learning_rate"], "train_seconds": r["step_seconds"], "peak_memory_mb": r["peak_memory_mb"],
        })
    return with_pareto_flags(rows)


def repo_relative(path: Path) -> str:
    """`path` relative to the repository where it lies inside it (result files name no machine's folders)."""
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def source_record(data: dict) -> dict:
    """What produced a result file: its steps, commit, command and wall time."""
    env = data.get("environment", {})
    return {"steps": data.get("steps"), "git_commit": env.get("git_commit"), "command": env.get("command"),
            "wall_seconds": data.get("wall_seconds")}


def write_results(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = result["results"]
    lines = [
        "# Trainable parameters vs accuracy, every adapter method",
        "",
        "SST-2 test accuracy and CoNLL-2003 test entity F1 on MiniLM (learning rate per method chosen on the "
        "validation split), after a short budget (300 steps of batch 16) and, where `convergence.json` has them, "
        "trained to the plateau (at most 3 / 10 epochs, early stopping; the test score at the best validation step); "
        "self-ask exact match on Compositional Celebrities with SmolLM2-135M (one learning rate per method). Pareto: "
        "no other method of the same task and budget reaches at least its metric with at most its trainable "
        "parameters. Train seconds: the run's (for the plateau runs, optimiser steps only). Peak memory: peak RSS of "
        "the training run (the largest over its processes; - where the run predates its recording).",
        "",
        "| task | budget | model | method | trainable params | trainable % | adapter size | metric | value | "
        "train seconds | peak memory (MB) | Pareto |",
        "|---|---|---|---|---:|---:|---:|---|---:|---:|---:|:---:|",
    ]
    for r in rows:
        peak = "-" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
        lines.append(
            f"| {r['task']} | {r['budget']} | {r['model']} | {r['label']} | {r['trainable_params']:,} | "
            f"{r['trainable_pct']:.3f} | "
            f"{format_bytes(r['adapter_bytes'])} | {r['metric']} | {r['value']:.4f} | {r['train_seconds']:.0f} | "
            f"{peak} | {'yes' if r['pareto'] else ''} |"
        )
    sources = [f"`{s['file']}` ({f'{s_steps} steps, ' if (s_steps := s['steps']) else ''}"
               f"{'PARTIAL, ' if s.get('partial') else ''}commit {s['git_commit']}, `{s['command']}`)"
               for s in result["sources"].values()]
    lines += ["", "Sources: " + "; ".join(sources) + ".", "",
              f"Commit {result['environment']['git_commit']}; command `{result['environment']['command']}`."]
    (out / f"{NAME}.md").write_text("\n".join(lines) + "\n")

    panels = list(dict.fromkeys((r["task"], r["budget"]) for r in rows))
    columns = min(len(panels), 3)
    lines_of_panels = -(-len(panels) // columns)
    figure = Figure(figsize=(5.5 * columns, 4.4 * lines_of_panels))
    figure.subplots_adjust(left=0.06, right=0.99, bottom=0.1 / lines_of_panels, top=1 - 0.08 / lines_of_panels,
                           wspace=0.2, hspace=0.35)
    FigureCanvasAgg(figure)
    renderer = figure.canvas.get_renderer()
    axes = figure.subplots(lines_of_panels, columns, squeeze=False).flatten()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax, (task, budget) in zip(axes, panels):
        points = [r for r in rows if (r["task"], r["budget"]) == (task, budget)]
        front = [r for r in points if r["pareto"]]
        ax.step([r["trainable_params"] for r in front], [r["value"] for r in front], where="post", color="tab:red",
                linewidth=1, label="Pareto front")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # a panel spanning under a decade would label minor ticks
        ax.set_xlim(min(r["trainable_params"] for r in points) / 2, max(r["trainable_params"] for r in points) * 10)
        scatter_labelled(ax, renderer, [(r["trainable_params"], r["value"]) for r in points],
                         [r["label"] for r in points], ["tab:red" if r["pareto"] else "tab:blue" for r in points],
                         fontsize=7)
        ax.set_xlabel("trainable parameters (log scale)")
        ax.set_ylabel(points[0]["metric"])
        ax.set_title(f"{task} ({points[0]['model']}), {budget or 'budget not recorded'}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    figure.savefig(out / f"{NAME}.png", dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the input JSON files are")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    missing = [f"{args.results / f'{stem}.json'} (written by `.venv/bin/python {command}`)"
               for stem, (_, _, _, command) in SOURCES.items() if not (args.results / f"{stem}.json").is_file()]
    if missing:
        parser.error("missing input: " + "; ".join(missing))
    rows: list[dict] = []
    sources: dict[str, dict] = {}
    for stem in SOURCES:
        path = args.results / f"{stem}.json"
        data = json.loads(path.read_text())
        rows += read_rows(stem, data)
        sources[stem] = {"file": repo_relative(path), **source_record(data)}
    converged = args.results / f"{CONVERGED}.json"
    if converged.is_file():  # the same MiniLM methods trained to their plateau: a budget of their own
        data = json.loads(converged.read_text())
        tasks = [SOURCES[stem][0] for stem in SOURCES]
        rows += sorted(read_converged_rows(data), key=lambda r: (tasks.index(r["task"]), r["trainable_params"]))
        sources[CONVERGED] = {"file": repo_relative(converged), **source_record(data), "partial": data["partial"]}
    result = {"benchmark": NAME, "results": rows, "sources": sources,
              "wall_seconds": time.perf_counter() - started, "environment": environment_record()}
    write_results(result, args.out)
    print((args.out / f"{NAME}.md").read_text())


if __name__ == "__main__":
    main()
