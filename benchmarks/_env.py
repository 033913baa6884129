"""The environment a benchmark ran in (machine, load, threads, versions, git commit, command), for its JSON, and the
JSON and Markdown files its result goes to."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Optional

import torch

from peftprompt.atomic import write_file_atomically

PACKAGES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "peftprompt")
REPO_ROOT = Path(__file__).resolve().parents[1]


def _cpuinfo_field(name: str) -> Optional[str]:
    """The first ``name`` line of ``/proc/cpuinfo`` (Linux), else `None`."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == name:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> Optional[str]:
    """The ``model name`` line of ``/proc/cpuinfo`` (Linux), else `None`."""
    return _cpuinfo_field("model name")


def cpu_flags() -> Optional[list[str]]:
    """The CPU's feature flags (``flags`` of ``/proc/cpuinfo``: avx512_bf16, amx_bf16, ...), else `None`."""
    flags = _cpuinfo_field("flags")
    return sorted(flags.split()) if flags else None


def gpus() -> list[str]:
    """The CUDA devices' names (empty without CUDA)."""
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def package_versions() -> dict[str, Optional[str]]:
    """Installed versions of the packages a result depends on (`None` when one is missing)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> Optional[str]:
    """``HEAD``'s commit hash, suffixed ``-dirty`` when the tree has changes; `None` outside git or before a commit."""
    def git(*args: str) -> Optional[str]:
        try:
            result = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
        except (OSError, subprocess.CalledProcessError):
            return None
        return result.stdout.strip()

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return None
    return commit + ("-dirty" if git("status", "--porcelain") else "")


def environment_record() -> dict:
    """Threads, machine (CPU count, model and flags, GPUs, platform, load average), package versions, git commit and
    command."""
    return {
        "threads": torch.get_num_threads(),
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_model": cpu_model(),
            "cpu_flags": cpu_flags(),
            "gpus": gpus(),
            "load_avg_1_5_15": list(os.getloadavg()),
        },
        "versions": package_versions(),
        "git_commit": git_commit(),
        "command": shlex.join(sys.orig_argv),
    }


def matmul_gflops(seconds: float = 3.0, size: int = 1024) -> float:
    """The host's speed as one core sees it now: GFLOP/s of float32 ``size`` x ``size`` matmuls on one thread for
    about `seconds`. The same CPU model can run a third slower on a busy host, so a timing records this beside it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        torch.mm(a, b)  # warm-up
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            torch.mm(a, b)
            done += 1
        return 2 * size**3 * done / (time.perf_counter() - started) / 1e9
    finally:
        torch.set_num_threads(threads)


def provenance_line(env: dict) -> str:
    """The Markdown line under every result table: machine, commit and the exact command."""
    machine = env["machine"]
    return (f"Machine: {machine.get('cpu_model')} ({machine['cpu_count']} CPUs); commit {env['git_commit']}; "
            f"command `{env['command']}`.")


def write_result_files(out: Path, name: str, result: dict, markdown: str) -> None:
    """Write ``<name>.json`` (`result`) and ``<name>.md`` (`markdown`) to `out`, each atomically, and print the
    Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    write_file_atomically(out / f"{name}.json", lambda f: json.dump(result, f, indent=2))
    write_file_atomically(out / f"{name}.md", lambda f: f.write(markdown))
    print(markdown)
