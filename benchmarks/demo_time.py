"""The main job's minutes and scores: runs ``recipes/demo_selfask.py`` (what ``make demo`` runs after set-up) from
scratch into a fresh output directory (a temporary one, or ``--output_dir`` to keep the adapter) and writes its
``demo_summary.json``, with the machine, to ``demo_time.{json,md}``:

    .venv/bin/python benchmarks/demo_time.py [--out benchmarks/results] [--output_dir DIR] [--quick] [key=value ...]

``--quick`` trains 5 steps on 200 samples and scores 5 questions (a check that it runs, not a figure).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

from _env import environment_record, matmul_gflops, provenance_line
from _runs import QUICK_TRAINING

NAME = "demo_time"
REPO = Path(__file__).resolve().parents[1]
GOAL_MINUTES = 10
GOAL_EM = 0.78
QUICK = ["--n", "5", *QUICK_TRAINING]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--quick", action="store_true", help="5 steps, 5 questions")
    parser.add_argument("--output_dir", type=Path, default=None,
                        help="the demo's run directory, kept (default: a temporary one); must not exist yet")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="training config overrides for the demo")
    args = parser.parse_args(argv)
    if args.output_dir is not None and args.output_dir.exists():
        parser.error(f"--output_dir {args.output_dir} exists: the demo would resume there instead of training")
    speed_before, started = matmul_gflops(), time.perf_counter()
    with tempfile.TemporaryDirectory() if args.output_dir is None else nullcontext(str(args.output_dir)) as run_dir:
        subprocess.run([sys.executable, str(REPO / "recipes/demo_selfask.py"), "--output_dir", run_dir,
                        *(QUICK if args.quick else []), *args.overrides], cwd=REPO, check=True)
        summary = json.loads((Path(run_dir) / "demo_summary.json").read_text())
    wall_seconds = time.perf_counter() - started
    result = {"benchmark": NAME, **summary, "wall_seconds": wall_seconds,
              "host_fp32_matmul_gflops_one_thread": {"before": speed_before, "after": matmul_gflops()},
              "goal": {"minutes": GOAL_MINUTES, "em": GOAL_EM,
                       "met": summary["total_minutes"] <= GOAL_MINUTES and summary["after_em"] >= GOAL_EM},
              "environment": environment_record()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{NAME}.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = "\n".join(f"| {what} | {minutes:.1f} |" for what, minutes in summary["minutes"].items())
    (args.out / f"{NAME}.md").write_text(
        f"# The main job (`make demo` after set-up): minutes and exact match\n\n"
        f"Schedule: `{' '.join(summary['schedule'])}` over the shipped self-ask config; {summary['n']} Compositional "
        "Celebrities questions (seed 0), follow-ups answered by the MiniLM retriever over their gold sub-answers.\n\n"
        f"| step | minutes |\n|---|---:|\n{rows}\n| **all** | **{summary['total_minutes']:.1f}** |\n\n"
        f"Exact match before (base model, 4-shot self-ask) {summary['before_em']:.3f}, after (LoRA, zero-shot) "
        f"**{summary['after_em']:.3f}** (well-formed {summary['after_well_formed']:.3f}); deep question "
        f"{'correct' if summary['deep_question_correct'] else 'wrong'}"
        f"{' (operator step: ' + summary['deep_question_operator'] + ')' if summary.get('deep_question_operator') else ''}. Goal: <= {GOAL_MINUTES} minutes and EM >= "
        f"{GOAL_EM}: {'met' if result['goal']['met'] else 'missed'} on this machine.\n\n"
        "Host speed, float32 1024 x 1024 matmuls on one thread, before and after the job: "
        + " / ".join(f"{v:.1f}" for v in result["host_fp32_matmul_gflops_one_thread"].values())
        + " GFLOP/s (the same CPU model runs slower on a busy host; compare timings at the same speed).\n\n"
        f"{provenance_line(result['environment'])}\n")
    print((args.out / f"{NAME}.md").read_text())


if __name__ == "__main__":
    main()
