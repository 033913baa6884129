"""How long ``make test`` takes on a fresh clone, as CI runs it: set-up (the virtual environment, the packages, the
embedded models) and the test suite, against the 12-minute goal.

Clones the repository's committed ``HEAD`` into a temporary folder with the shared data beside it (``--shared``,
default ``../shared``: CI's layout), runs ``make models`` there (the set-up ``make test`` starts with), then ``make
<target>`` (``test``: the set-up is done, so only pytest runs), with a progress bar over pytest's percentage, and
writes ``test_time.{json,md}`` to ``--out``: the seconds of each part and in all, pytest's counts and its own seconds,
the commit and the CPU. The clone's full output goes to ``--log-dir`` (default ``outputs``). Run it on an idle
machine: the goal is about wall time on 2 cores.

    .venv/bin/python benchmarks/test_time.py [--target test-fast]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

from tqdm.auto import tqdm

from _env import environment_record, provenance_line, write_result_files

NAME = "test_time"
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
GOAL_SECONDS = 12 * 60  # make test on a fresh clone, set-up included (CI: 2 cores)
PERCENT = re.compile(r"\[\s*(\d+)%\]\s*$")  # pytest's progress at the end of a line of dots
# pytest's last line, "==== 866 passed, 1 skipped in 533.12s (0:08:53) ===="
SUMMARY = re.compile(r"^=+ (.+?) in ([\d.]+)s(?: \([\d:]+\))? =+$")
COUNT = re.compile(r"(\d+) (\w+)")


def pytest_summary(output: str) -> dict:
    """pytest's last summary line in `output`: its counts (``{"passed": 866, "skipped": 1}``) and its seconds."""
    for line in reversed(output.splitlines()):
        if found := SUMMARY.match(line.strip()):
            return {"counts": {word: int(n) for n, word in COUNT.findall(found[1])}, "seconds": float(found[2])}
    raise ValueError("no pytest summary line (`== N passed in Xs ==`) in the output")


def run_make(target: str, clone: Path, log, bar: tqdm | None = None) -> tuple[float, str]:
    """``make <target>`` in `clone`, its output to `log` (and pytest's percentage to `bar`); its seconds and output."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    started, lines = time.perf_counter(), []
    process = subprocess.Popen(["make", target], cwd=clone, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        log.write(line)
        lines.append(line)
        if bar is not None and (percent := PERCENT.search(line)):
            bar.update(int(percent[1]) - bar.n)
    if process.wait() != 0:
        raise SystemExit(f"make {target} failed on the fresh clone (exit {process.returncode}); see {log.name}")
    return time.perf_counter() - started, "".join(lines)


def markdown(result: dict, env: dict) -> str:
    counts = ", ".join(f"{n} {word}" for word, n in result["pytest"]["counts"].items())
    goal = result["goal"]
    goal = f"at most {goal['seconds']} s in all: {'met' if goal['met'] else 'missed'}" if goal else "-"
    return "\n".join([
        f"# `make {result['target']}` on a fresh clone",
        "",
        f"A fresh clone of commit `{result['commit'][:12]}` with `../shared` beside it, as CI runs it: `make models` "
        f"(the set-up: virtual environment, packages, embedded models), then `make {result['target']}`.",
        "",
        "| set-up | tests | in all | pytest | goal |",
        "|---:|---:|---:|---|---|",
        f"| {result['setup_seconds']:.0f} s | {result['test_seconds']:.0f} s | **{result['total_seconds']:.0f} s** | "
        f"{counts} in {result['pytest']['seconds']:.0f} s | {goal} |",
        "",
        provenance_line(env),
        "",
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="test", help="the make target timed after the set-up")
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared", help="linked beside the clone")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--log-dir", type=Path, default=REPO / "outputs")
    args = parser.parse_args(argv)
    if not (args.shared / "data").is_dir():
        parser.error(f"--shared {args.shared} has no data/ folder: the tests read the data from there")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.strip()
    env = environment_record()
    args.log_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder, open(args.log_dir / f"{NAME}.log", "w") as log:
        clone = Path(folder) / "main"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        (Path(folder) / "shared").symlink_to(args.shared.resolve())
        tqdm.write(f"test_time: make models, then make {args.target}, in {clone}")
        setup, _ = run_make("models", clone, log)
        with tqdm(total=100, desc=f"make {args.target}", unit="%") as bar:
            tests, output = run_make(args.target, clone, log, bar)
    total = setup + tests
    result = {"target": args.target, "commit": commit, "setup_seconds": round(setup, 1),
              "test_seconds": round(tests, 1), "total_seconds": round(total, 1), "pytest": pytest_summary(output),
              "goal": {"seconds": GOAL_SECONDS, "met": total <= GOAL_SECONDS} if args.target == "test" else None,
              "environment": env}
    write_result_files(args.out, NAME, result, markdown(result, env))


if __name__ == "__main__":
    main()
