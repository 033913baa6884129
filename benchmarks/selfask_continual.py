"""Self-ask that keeps learning from its own verified traces: exact match after every round, and the trees kept.

Runs ``recipes/selfask_continual.py`` (round 0 on ``make demo``'s schedule, then ``--rounds`` rounds of verified
traces; its rounds under ``--run-dir`` are reused when they are done) and writes ``selfask_continual.{json,md,png}``
to ``--out``: per round the trees trained on, the pool questions asked and verified, and exact match / well-formed
rate on the held-out ProbTree 2WikiMultiHopQA questions and on Compositional Celebrities, with where every
follow-up's answer came from.

    .venv/bin/python benchmarks/selfask_continual.py [--rounds 3] [--round-lr 5e-4] [--replay 1]
        [--questions-per-round 100] [--n-eval 100] [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from _env import environment_record, provenance_line

NAME = "selfask_continual"
REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
# make demo's schedule when the committed runs were made
ROUND_0 = ["max_steps=150", "method_args.lora_dropout=0.0", "data.generate_eval=0"]
QUICK = ["--pool-size", "8", "--questions-per-round", "4", "--n-eval", "4"]
QUICK_TRAINING = ["max_steps=2", "max_train_samples=12", "max_eval_samples=4", "max_length=256"]
SETS = (("held_out", "held-out 2Wiki (ProbTree, dev)"), ("compositional_celebrities", "Compositional Celebrities"))


def write_results(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}.json").write_text(json.dumps(result, indent=2) + "\n")
    run = result["run"]
    lines = [f"# Self-ask that keeps learning from its own verified traces{' (quick check)' if result['quick'] else ''}",
             "", f"Round 0: the self-ask LoRA of `make demo` ({' '.join(result['round_0'])}) trained on the usual "
             f"training trees without {run['pool_size']} {run['pool_source']} questions held back as an unlabelled "
             f"pool. Each later round: the adapter self-asks {run['questions_per_round']} new pool questions; runs "
             f"that pass the verifier ({run['verifier']}) become trees, and the adapter trains on every verified tree "
             f"so far plus {run['replay']:g}x as many original trees ({run['round_epochs']:g} epochs, learning rate "
             f"{run['round_lr']:g}).", "",
             "Where follow-ups were answered: pool questions, " + run["knowledge"]["pool"] + "; held-out questions, "
             + run["knowledge"]["held_out"] + "; Compositional Celebrities, "
             + run["knowledge"]["compositional_celebrities"] + f". Held-out: {run['held_out']['n']} questions "
             f"({run['held_out']['dropped_as_training']} dropped as training questions); Compositional Celebrities: "
             f"{run['rounds'][0]['compositional_celebrities']['n']} questions. Compositional Celebrities and "
             "Bamboogle are never trained on.", "",
             "| round | trees trained | pool asked | verified (share) | " + " | ".join(
                 f"{label} EM | {label} well-formed" for _, label in SETS) + " |",
             "|---:|---:|---:|---:|" + "---:|---:|" * len(SETS)]
    for r in run["rounds"]:
        verified = f"{r['verified']} ({r['verified_share']:.2f})" if "verified" in r else "-"
        trained = r["trained_trees"] if r["trained_trees"] else "0 (adapter kept)"
        lines.append(f"| {r['round']} | {trained} | {r.get('asked', '-')} | {verified} | " + " | ".join(
            f"{r[key]['em']:.3f} | {r[key]['well_formed']:.3f}" for key, _ in SETS) + " |")
    check = result["targets"]
    yes = {True: "yes", False: "no"}
    lines += ["", f"Target: held-out exact match rises over at least two rounds ({yes[check['held_out_rises']]}: "
              f"{check['held_out_path']}) with no drop on Compositional Celebrities "
              f"({yes[check['no_celebrity_drop']]}: {check['celebrity_path']}): {'met' if check['met'] else 'missed'}.",
              "",
              provenance_line(result["environment"]), ""]
    (out / f"{NAME}.md").write_text("\n".join(lines))
    plot(result, out / f"{NAME}.png")


def targets(rounds: list[dict]) -> dict:
    """Held-out EM above round 0 in at least two later rounds, rising round over round; CC EM never below round 0."""
    held = [r["held_out"]["em"] for r in rounds]
    celebrities = [r["compositional_celebrities"]["em"] for r in rounds]
    rises = len(held) >= 3 and all(b > a for a, b in zip(held[:3], held[1:3]))
    no_drop = all(value >= celebrities[0] for value in celebrities)
    return {"held_out_rises": rises, "no_celebrity_drop": no_drop, "met": rises and no_drop,
            "held_out_path": " -> ".join(f"{v:.3f}" for v in held),
            "celebrity_path": " -> ".join(f"{v:.3f}" for v in celebrities)}


def plot(result: dict, path: Path) -> None:
    rounds = result["run"]["rounds"]
    figure = Figure(figsize=(10, 4))
    FigureCanvasAgg(figure)
    scores, kept = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    xs = [r["round"] for r in rounds]
    for key, label in SETS:
        scores.plot(xs, [r[key]["em"] for r in rounds], marker="o", label=label)
    scores.set_xlabel("round")
    scores.set_ylabel("exact match")
    scores.set_xticks(xs)
    scores.grid(alpha=0.3)
    scores.legend(fontsize=8)
    later = [r for r in rounds if "verified" in r]
    kept.bar([r["round"] for r in later], [r["verified"] for r in later], label="verified this round")
    kept.plot([r["round"] for r in later], [r["trained_verified"] for r in later], marker="o", color="black",
              label="verified trees trained on")
    kept.set_xlabel("round")
    kept.set_ylabel("trees")
    kept.set_xticks(xs)
    kept.legend(fontsize=8)
    kept.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--round-lr", default=None, help="the recipe's --round-lr (default: the recipe's)")
    parser.add_argument("--replay", default=None, help="the recipe's --replay (default: the recipe's)")
    parser.add_argument("--questions-per-round", default=None, help="the recipe's (default: the recipe's)")
    parser.add_argument("--n-eval", default=None, help="the recipe's: held-out and Compositional Celebrities "
                                                       "questions scored (default: the recipe's)")
    parser.add_argument("--run-dir", type=Path, default=None, help="default outputs/selfask_continual (_quick)")
    parser.add_argument("--model", default=None, help="train this backbone instead of the config's (model=...)")
    parser.add_argument("--processes", default=None, help="the recipe's: training processes per round (default 2)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: a few questions and steps")
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results (outputs/bench_quick)")
    args = parser.parse_args(argv)
    run_dir = (args.run_dir or REPO / "outputs" / (f"{NAME}_quick" if args.quick else NAME)).resolve()
    out = args.out or (REPO / "outputs" / "bench_quick" / "results" if args.quick else RESULTS)
    started = time.perf_counter()
    training = [*ROUND_0, *(QUICK_TRAINING if args.quick else []), *([f"model={args.model}"] if args.model else [])]
    rounds = ["--rounds", str(args.rounds), *(QUICK if args.quick else [])]  # the flags given come after QUICK
    for flag, value in (("--round-lr", args.round_lr), ("--replay", args.replay),
                        ("--questions-per-round", args.questions_per_round), ("--n-eval", args.n_eval),
                        ("--processes", args.processes)):
        if value is not None:
            rounds += [flag, value]
    command = [sys.executable, str(REPO / "recipes" / f"{NAME}.py"), "--output_dir", str(run_dir), *rounds,
               *training]
    print("$", " ".join(command), flush=True)
    if subprocess.run(command, cwd=REPO).returncode != 0:
        raise SystemExit(f"{NAME}: the run failed; its output is above (finished rounds under {run_dir} are kept)")
    run = json.loads((run_dir / f"{NAME}.json").read_text())
    result = {"benchmark": NAME, "quick": args.quick, "round_0": training, "run": run,
              "targets": targets(run["rounds"]), "wall_seconds": time.perf_counter() - started,
              "environment": environment_record()}
    write_results(result, out)
    print((out / f"{NAME}.md").read_text())


if __name__ == "__main__":
    main()
