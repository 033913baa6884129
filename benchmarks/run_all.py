"""Regenerate every result under ``benchmarks/results/`` (``make bench``): the benchmark scripts in turn, under one
progress bar whose time estimate comes from what each stage took last time.

Stages, in order (`STAGES`): ``methods_overview``, ``architectures`` (every method on 17 tiny architectures),
``collator``, ``speed``, ``speed_encoder`` (MiniLM training
against Trainer + PEFT), ``sst2`` and ``conll03`` (``adapter_methods.py``, all 11 method variants, 300 steps,
learning rates 0.3 / 1 / 3 / 9 x the config's), ``convergence`` (the same methods trained to their plateau, at the
two best rates of those sweeps; hours; its runs under ``outputs/convergence`` are resumed or reused),
``demo_adapter`` (trains the self-ask LoRA of ``make demo`` by running ``recipes/demo_selfask.py --n 5``, only when
``outputs/demo_selfask/adapter`` is missing), ``selfask`` (that adapter against the base model), ``selfask_speed``
(questions per second with and without KV-cache reuse, that adapter and the base model), ``demo_time`` (the
main job from scratch: its minutes and exact match), ``selfask_methods``, ``method_comparison`` (every PEFT
method on SST-2, CoNLL-2003 and self-ask at one budget; about ten hours; its finished runs are kept under
``benchmarks/results/method_comparison_runs`` and reused), ``params_vs_accuracy``, ``recursion`` (flat / recursive / mix training against ``max_depth``; its trained runs
and evaluated cells under ``outputs/recursion`` are reused), ``openbook`` (self-ask with retrieval per follow-up
against single-step retrieval; its decomposer is recursion's ``flat`` run; adapters, indexes and cells under
``outputs/openbook`` are reused) and ``continual`` (five classification tasks in three orders, every
continual-learning strategy; its finished runs are kept under ``benchmarks/results/continual_runs`` and reused)
and ``selfask_continual`` (self-ask that keeps learning from its verified traces; its rounds under
``outputs/selfask_continual`` are reused).
Every script writes its JSON, Markdown and PNG to
``--out``. The sweeps (``adapter_methods.py``, ``selfask_methods.py``) reuse the runs they finished before under
``outputs/bench`` with the same config (``_runs.run_recipe``; ``--no-reuse`` repeats them).

A stage's estimate is the wall time its JSON under ``--out`` recorded (``wall_seconds``; ``wall_s`` in
``collator.json``, the sum over the runs in ``speed.json``), else a fixed guess (`Stage`). ``--quick`` passes
``--quick`` to every script, trains the demo adapter for 5 steps into ``outputs/bench_quick/demo_selfask`` and
writes to ``outputs/bench_quick/results`` unless ``--out`` says otherwise, so the published results stay intact.

    .venv/bin/python benchmarks/run_all.py [--quick] [--only sst2 params_vs_accuracy] [--out DIR] [--plan]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple, Optional

from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
QUICK_DIR = REPO / "outputs" / "bench_quick"
DEMO_DIR = REPO / "outputs" / "demo_selfask"
ADAPTER_GRID = ("--steps", "300", "--lr-grid", "0.3", "1", "3", "9")  # as the published sst2 / conll03 results
QUICK_DEMO = ("max_steps=5", "max_train_samples=200", "max_eval_samples=16", "data.generate_eval=0")


class Stage(NamedTuple):
    name: str
    script: str  # relative to the repository
    args: tuple[str, ...]
    result: str  # the JSON it writes under --out (its recorded wall time is the estimate)
    guess: float  # seconds, when nothing is recorded
    quick_guess: float  # the same with --quick


STAGES = (
    Stage("methods_overview", "benchmarks/methods_overview.py", (), "methods_overview.json", 240, 120),
    Stage("architectures", "benchmarks/architectures.py", (), "architectures.json", 120, 30),
    Stage("collator", "benchmarks/collator.py", (), "collator.json", 150, 60),
    Stage("speed", "benchmarks/speed.py", (), "speed.json", 600, 240),
    Stage("speed_encoder", "benchmarks/speed_encoder.py", (), "speed_encoder.json", 900, 240),
    Stage("sst2", "benchmarks/adapter_methods.py", ("--task", "sst2", *ADAPTER_GRID), "sst2.json", 1800, 180),
    Stage("conll03", "benchmarks/adapter_methods.py", ("--task", "conll03", *ADAPTER_GRID), "conll03.json", 2700,
          360),
    Stage("convergence", "benchmarks/convergence.py", (), "convergence.json", 36000, 300),  # its runs are reused
    Stage("demo_adapter", "recipes/demo_selfask.py", ("--n", "5"), "", 1000, 90),
    Stage("selfask", "benchmarks/selfask.py", (), "selfask.json", 2700, 300),
    Stage("selfask_speed", "benchmarks/selfask_speed.py", (), "selfask_speed.json", 1000, 200),
    Stage("demo_time", "benchmarks/demo_time.py", (), "demo_time.json", 600, 120),
    Stage("selfask_methods", "benchmarks/selfask_methods.py", (), "selfask_methods.json", 7200, 700),
    Stage("method_comparison", "benchmarks/method_comparison.py", (), "method_comparison.json", 36000, 300),  # reused
    Stage("params_vs_accuracy", "benchmarks/params_vs_accuracy.py", (), "params_vs_accuracy.json", 10, 10),
    Stage("recursion", "benchmarks/recursion.py", (), "recursion.json", 5400, 300),
    Stage("openbook", "benchmarks/openbook.py", ("--index-speed",), "openbook.json", 14400, 900),
    Stage("continual", "benchmarks/continual.py", (), "continual.json", 9000, 600),  # its runs are reused
    Stage("selfask_continual", "benchmarks/selfask_continual.py", (), "selfask_continual.json", 3600, 300),
)
REUSING = {"sst2", "conll03", "selfask_methods"}


def recorded_seconds(path: Path) -> Optional[float]:
    """The wall time a stage's JSON recorded: ``wall_seconds`` (collator.json: ``wall_s``; speed.json: the sum of
    its runs' ``wall_seconds``), or `None` without a file or a time."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if "wall_seconds" in data or "wall_s" in data:
        return float(data.get("wall_seconds", data.get("wall_s")))
    runs = data.get("runs")
    if isinstance(runs, dict) and all("wall_seconds" in r for r in runs.values()):
        return float(sum(r["wall_seconds"] for r in runs.values()))
    return None


def command(stage: Stage, args: argparse.Namespace) -> Optional[list[str]]:
    """The command line of `stage` under `args`, or `None` when there is nothing to do (the demo adapter exists)."""
    demo_dir = QUICK_DIR / "demo_selfask" if args.quick else DEMO_DIR
    line = [sys.executable, str(REPO / stage.script), *stage.args]
    if stage.name == "demo_adapter":
        if (demo_dir / "adapter" / "adapter_config.json").is_file():
            return None
        return [*line, "--output_dir", str(demo_dir), *(QUICK_DEMO if args.quick else ())]
    if stage.name == "params_vs_accuracy":
        return [*line, "--results", str(args.out), "--out", str(args.out)]
    if stage.name in ("selfask", "selfask_speed"):
        line += ["--adapter", str(demo_dir / "adapter")]
    if stage.name in REUSING and args.reuse and not args.quick:
        line.append("--reuse")
    return [*line, *(["--quick"] if args.quick else []), "--out", str(args.out)]


def estimate(stage: Stage, args: argparse.Namespace, line: Optional[list[str]]) -> tuple[float, str]:
    """Seconds `stage` should take and where that comes from."""
    if line is None:
        return 0.0, "nothing to do"
    recorded = recorded_seconds(args.out / stage.result) if stage.result else None
    if recorded is not None:
        return recorded, f"recorded in {stage.result}"
    return (stage.quick_guess if args.quick else stage.guess), "guess"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [stage.name for stage in STAGES]
    parser.add_argument("--only", nargs="+", choices=names, metavar="STAGE", help=f"run these: {', '.join(names)}")
    parser.add_argument("--quick", action="store_true", help="every script's --quick (minutes instead of hours)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where every script writes (default benchmarks/results, outputs/bench_quick/results "
                             "with --quick)")
    parser.add_argument("--no-reuse", dest="reuse", action="store_false",
                        help="repeat the sweeps' finished runs instead of reading them")
    parser.add_argument("--plan", action="store_true", help="print the stages, commands and estimates; run nothing")
    args = parser.parse_args(argv)
    args.out = (args.out or (QUICK_DIR / "results" if args.quick else RESULTS)).resolve()
    stages = [stage for stage in STAGES if not args.only or stage.name in args.only]
    plan = []
    for stage in stages:
        line = command(stage, args)
        plan.append((stage, line, *estimate(stage, args, line)))
    total = sum(seconds for _, _, seconds, _ in plan)
    print(f"{len(plan)} stages into {args.out}; estimated total ~{total / 60:.0f} min")
    for stage, line, seconds, source in plan:
        what = shlex.join(line) if line is not None else "skipped"
        print(f"  {stage.name:<19} ~{seconds / 60:5.1f} min ({source}): {what}")
    if args.plan:
        return

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    taken = {}
    bar_format = "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} estimated s [{elapsed}<{remaining}]"
    with tqdm(total=total, desc="benchmarks", bar_format=bar_format) as bar:
        for index, (stage, line, seconds, _) in enumerate(plan):
            if line is None:
                continue
            bar.set_description(f"benchmarks ({stage.name})")
            bar.write(f"== {stage.name}: {shlex.join(line)}")
            started = time.perf_counter()
            done = subprocess.run(line, cwd=REPO, env=env)
            taken[stage.name] = time.perf_counter() - started
            if done.returncode != 0:
                later = [later_stage.name for later_stage, *_ in plan[index + 1:]]
                raise SystemExit(f"run_all: stage {stage.name} failed (exit {done.returncode}); not run: "
                                 f"{', '.join(later) or 'none'}")
            bar.update(seconds)
    print("took " + ", ".join(f"{name} {s / 60:.1f} min" for name, s in taken.items())
          + f"; total {sum(taken.values()) / 60:.1f} min; results in {args.out}")


if __name__ == "__main__":
    main()
