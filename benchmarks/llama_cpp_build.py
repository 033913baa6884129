"""How long the optional extra ``llama`` takes to build: llama-cpp-python from its source in the registry, compiled
with this machine's compiler, as ``make test-llama`` (and so CI) installs it.

Runs ``pip wheel --no-deps --no-cache-dir`` for the extra's requirement in ``pyproject.toml`` (no cached wheel is
reused) with ``CMAKE_BUILD_PARALLEL_LEVEL`` set to the CPU count, shows the compile steps as a progress bar, and
writes ``llama_cpp_build.{json,md}`` to ``--out``: wall, user and system seconds, the version built, the wheel's
size, the compiler and the CPU. The full build log goes beside them in ``--log-dir`` (default ``outputs``).

    .venv/bin/python benchmarks/llama_cpp_build.py
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from tqdm.auto import tqdm

from _env import environment_record, provenance_line, write_result_files

NAME = "llama_cpp_build"
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
STEP = re.compile(r"\[(\d+)/(\d+)\]")  # ninja's "[12/150] Building C object ..."
WHEEL = re.compile(r"filename=(llama_cpp_python-(\S+?)-\S+\.whl)")


def extra_requirement(extra: str = "llama") -> str:
    """The requirement the optional extra `extra` names in ``pyproject.toml`` (its only one)."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (requirement,) = extras[extra]
    return requirement


def compiler_version() -> str:
    """The first line of ``cc --version`` (what CMake finds first), or why there is none."""
    try:
        return subprocess.run(["cc", "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError) as error:
        return f"no C compiler found ({error})"


def build_wheel(requirement: str, wheel_dir: Path, log_path: Path) -> dict:
    """Builds `requirement` into `wheel_dir` with pip, logging to `log_path`; returns the times and the wheel's name."""
    command = [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-cache-dir", "-w", str(wheel_dir),
               requirement]
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    wheel = version = None
    with open(log_path, "w") as log, tqdm(desc="compiling llama.cpp", unit="step") as bar:
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in process.stdout:
            log.write(line)
            if step := STEP.search(line):
                done, total = int(step[1]), int(step[2])
                bar.total = total
                bar.update(done - bar.n)
            if found := WHEEL.search(line):
                wheel, version = found[1], found[2]
        returncode = process.wait()
    wall = time.perf_counter() - started
    if returncode != 0 or wheel is None:
        raise SystemExit(f"pip wheel {requirement} failed (exit {returncode}); its output is in {log_path}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"command": shlex.join(command), "wall_seconds": round(wall, 1),
            "user_seconds": round(after.ru_utime - before.ru_utime, 1),
            "system_seconds": round(after.ru_stime - before.ru_stime, 1),
            "wheel": wheel, "version": version, "wheel_bytes": (wheel_dir / wheel).stat().st_size}


def markdown(result: dict, env: dict) -> str:
    minutes, seconds = divmod(round(result["wall_seconds"]), 60)
    return "\n".join([
        "# Building the optional extra `llama` (llama-cpp-python from source)",
        "",
        f"`{result['requirement']}`, built by pip with `CMAKE_BUILD_PARALLEL_LEVEL={result['parallel_level']}` and no "
        "cached wheel, as `make test-llama` (and CI, through `.ci/run`) installs it on a fresh machine. Pip keeps the "
        "wheel it builds in its cache, so later installs on the same machine take seconds.",
        "",
        "| version | wall | user | system | wheel | compiler |",
        "|---|---|---|---|---|---|",
        f"| {result['version']} | {minutes} min {seconds} s | {result['user_seconds']:.0f} s | "
        f"{result['system_seconds']:.0f} s | {result['wheel_bytes'] / 2**20:.1f} MiB | {result['compiler']} |",
        "",
        provenance_line(env),
        "",
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--log-dir", type=Path, default=REPO / "outputs")
    args = parser.parse_args(argv)

    requirement = extra_requirement()
    env = environment_record()
    args.log_dir.mkdir(parents=True, exist_ok=True)
    log_path = args.log_dir / f"{NAME}.log"
    with tempfile.TemporaryDirectory() as wheel_dir:
        built = build_wheel(requirement, Path(wheel_dir), log_path)
    result = {"requirement": requirement, "parallel_level": os.cpu_count(), "compiler": compiler_version(), **built,
              "log": str(log_path), "environment": env}
    write_result_files(args.out, NAME, result, markdown(result, env))


if __name__ == "__main__":
    main()
