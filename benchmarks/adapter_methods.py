"""Every adapter method under the same budget on SST-2 (accuracy) or CoNLL-2003 (entity F1), through the recipes,
with the learning rate tuned per method on the validation split.

Runs ``recipes/<recipe>.py --config recipes/configs/minilm/<task>_<config>.yaml max_steps=N learning_rate=LR ...``
for each method variant (`VARIANTS`: a config file plus overrides, e.g. ``lora_r4`` is the LoRA config with
``method_args.r=4 method_args.lora_alpha=8``, ``qlora_4bit`` the LoRA config with ``load_in_4bit=true``, ``dora`` the
LoRA config with ``method=dora``: every method of `OTHER_METHODS` is there, run when ``--methods`` names it) and each
LR of ``--lr-grid`` (multiples of the variant's starting rate: its config file's, or its own in `OTHER_METHODS`),
``--parallel`` runs at a time, one thread each. Each run scores the validation split (SST-2 ``dev.tsv`` / CoNLL
``eng.testa``, first 1000) and the test split (always in full); per variant the rate with the best validation score
is chosen and its test score reported. Writes ``<task>.{json,md,png}`` under ``--out`` (every run of the sweep is in
the JSON and the Markdown).

    .venv/bin/python benchmarks/adapter_methods.py --task sst2 [--steps 600] [--lr-grid 0.3 1 3] [--methods lora bitfit]

Runs live in ``--run-dir`` as ``<task>_<variant>_lr<LR>``. ``--reuse`` reads the runs already finished there whose
saved config equals the requested one (`_runs.run_recipe`), so a grid can be widened, or variants added, without
repeating it; a run that is repeated starts from an empty directory. ``--quick``: LoRA, IA3 and BitFit only
(unless ``--methods``), 20 steps, the config's rate only, 200 validation sentences, runs under
``outputs/bench_quick``. ``--model`` trains another backbone (a path; the tests use a tiny random BERT).
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import yaml
from tqdm import tqdm

from _env import environment_record, provenance_line
from _plot import params_scatter
from _runs import run_recipe
from peftprompt.report import format_bytes

REPO = Path(__file__).resolve().parents[1]
TASKS = {  # task: (recipe, test metric, validation metric, title)
    "sst2": ("sst2_classification.py", "accuracy", "dev_accuracy", "SST-2 accuracy (test.tsv, 698 sentences)"),
    "conll03": ("conll03_ner.py", "entity_f1", "dev_entity_f1", "CoNLL-2003 entity F1 (eng.testb)"),
}


class Variant(NamedTuple):
    """A method variant: the config file it starts from (``recipes/configs/minilm/<task>_<config>.yaml``), its
    overrides of that file, its label, and its starting learning rate (None: the config file's)."""

    config: str
    overrides: tuple[str, ...]
    label: str
    learning_rate: Optional[float] = None


# The configs' LoRA is r 8, alpha 16 on query/value.
VARIANTS: dict[str, Variant] = {
    "full": Variant("full", (), "full"),
    "lora_r4": Variant("lora", ("method_args.r=4", "method_args.lora_alpha=8"), "LoRA r4"),
    "lora": Variant("lora", (), "LoRA r8"),
    "lora_r16": Variant("lora", ("method_args.r=16", "method_args.lora_alpha=32"), "LoRA r16"),
    "prefix": Variant("prefix", (), "prefix"),
    "prompt": Variant("prompt", (), "prompt"),
    "ptuning": Variant("ptuning", (), "P-tuning"),
    "ia3": Variant("ia3", (), "IA3"),
    "bitfit": Variant("bitfit", (), "BitFit"),
    "qlora_8bit": Variant("lora", ("load_in_8bit=true",), "QLoRA 8-bit (r8)"),
    "qlora_4bit": Variant("lora", ("load_in_4bit=true",), "QLoRA 4-bit (r8)"),
}
DEFAULT_METHODS = tuple(VARIANTS)
"""The variants swept by default (``sst2.json``, ``conll03.json``); the others run when named in ``--methods``."""
# The other PEFT methods of `peftprompt.methods` (LoRA's presets and the other tuners, at the catalog's defaults),
# trained through the LoRA config with ``method=<name>``: name -> (label, starting learning rate). The rates are
# set by hand, like the config files' (about a third of what a 300-step run of the method family takes: LoRA's
# family 1e-3, or 3e-3 where a part is frozen; vector / frequency methods higher, OSF near full fine-tuning's), and
# are what a grid multiplies.
OTHER_METHODS: dict[str, tuple[str, float]] = {
    "osf": ("OSF", 5e-5),
    "lora_all_linear": ("LoRA all-linear", 1e-3),
    "dora": ("DoRA", 1e-3),
    "rslora": ("rsLoRA", 3e-4),
    "pissa": ("PiSSA", 3e-4),
    "olora": ("OLoRA", 3e-4),
    "loraplus": ("LoRA+", 3e-4),
    "lora_fa": ("LoRA-FA", 3e-3),
    "adalora": ("AdaLoRA", 1e-3),
    "vera": ("VeRA", 3e-3),
    "loha": ("LoHa", 1e-3),
    "lokr": ("LoKr", 1e-3),
    "boft": ("BOFT", 1e-3),
    "oft": ("OFT", 1e-3),
    "hra": ("HRA", 1e-3),
    "fourierft": ("FourierFT", 3e-3),  # its updates are scaled by 150: 1e-2 moved a tiny BERT far in 3 steps
    "waveft": ("WaveFT", 3e-3),
    "ln_tuning": ("LN tuning", 1e-3),
    "miss": ("MiSS", 1e-3),
    "shira": ("SHiRA", 1e-3),
    "c3a": ("C3A", 3e-3),
    "randlora": ("RandLoRA", 1e-3),
    "delora": ("DeLoRA", 1e-3),
    "gralora": ("GraLoRA", 1e-3),
}
VARIANTS.update({name: Variant("lora", (f"method={name}",), label, rate)
                 for name, (label, rate) in OTHER_METHODS.items()})
LORA_PRESETS = ("lora_all_linear", "dora", "rslora", "pissa", "olora", "loraplus", "lora_fa")
OTHER_TUNERS = tuple(name for name in OTHER_METHODS if name not in (*LORA_PRESETS, "osf"))
"""The PEFT tuners of `OTHER_METHODS` that are neither LoRA presets nor OSF (AdaLoRA, VeRA, LoHa, ...)."""
METHODS = tuple(VARIANTS)
LABELS = {variant: v.label for variant, v in VARIANTS.items()}
QUICK_STEPS, QUICK_EVAL_SAMPLES = 20, 200
QUICK_METHODS = ("lora", "ia3", "bitfit")  # --quick without --methods: a smoke run of three methods


def config_path(task: str, variant: str) -> Path:
    return REPO / f"recipes/configs/minilm/{task}_{VARIANTS[variant].config}.yaml"


def config_learning_rate(task: str, variant: str) -> float:
    """The variant's starting learning rate: its own, else its config file's."""
    own = VARIANTS[variant].learning_rate
    return own if own is not None else float(yaml.safe_load(config_path(task, variant).read_text())["learning_rate"])


def run_grid(
    task: str,
    jobs: list[tuple[str, float]],
    steps: int,
    parallel: int,
    run_dir: Path,
    reuse: bool = False,
    model: Optional[str] = None,
    extra: Sequence[str] = (),
) -> list[dict]:
    """Run the recipe for each ``(variant, learning_rate)`` of `jobs` (at most `parallel` at a time, one thread
    each) with the variant's overrides, ``model=`` `model` when given and the `extra` overrides; return their
    ``results.json`` with ``learning_rate``, ``method`` (the variant) and ``label`` set, in `jobs` order. With
    `reuse`, a run already done with the same config is read instead of repeated (to widen a grid)."""
    recipe = TASKS[task][0]

    def train(method: str, lr: float) -> dict:
        name = f"{task}_{method}_lr{lr:g}"
        overrides = [f"max_steps={steps}", f"eval_every={steps}", f"learning_rate={lr:g}", *VARIANTS[method][1],
                     *([f"model={model}"] if model else []), *extra]
        run = run_recipe(config_path(task, method), overrides, run_dir / name, recipe=recipe, reuse=reuse,
                         log=run_dir / f"{name}.log", env={"OMP_NUM_THREADS": "1"})
        return {**run, "method": method, "label": LABELS[method], "learning_rate": lr}

    results = {}
    with tqdm(total=len(jobs), desc=f"{task} runs", unit="run") as bar, ThreadPoolExecutor(parallel) as pool:
        futures = {pool.submit(train, method, lr): index for index, (method, lr) in enumerate(jobs)}
        try:
            for future in as_completed(futures):
                index = futures[future]
                results[index] = future.result()
                bar.set_postfix_str(f"{task}_{jobs[index][0]}_lr{jobs[index][1]:g}")
                bar.update()
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # start no other run; those running finish
            raise
    return [results[i] for i in range(len(jobs))]


def choose(task: str, runs: list[dict], methods: list[str]) -> list[dict]:
    """Per variant, the run with the best validation score (ties: the smaller learning rate)."""
    dev = TASKS[task][2]
    return [max((r for r in runs if r["method"] == m), key=lambda r: (r[dev], -r["learning_rate"])) for m in methods]


def write_outputs(task: str, rows: list[dict], sweep: list[dict], record: dict, out: Path) -> None:
    _, metric, dev, title = TASKS[task]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{task}.json").write_text(json.dumps({**record, "results": rows, "sweep": sweep}, indent=2) + "\n")
    grid = ", ".join(f"{m:g}" for m in record["lr_grid"])
    lines = [
        f"# {title}, MiniLM, every method under the same budget",
        "",
        f"{record['steps']} optimiser steps x batch {record['batch_size']} for every method, linear schedule with 6 % "
        f"warm-up, mixed precision as `auto` chose ({rows[0]['mixed_precision']}), one thread per run, "
        f"{record['parallel']} runs at a time. Learning rate per method: the best {dev} (validation split, first "
        f"{record['validation_samples']}) over {grid} x the config file's rate; {metric} is on the test split at the "
        "last step.",
        "",
        f"| method | trainable params | trainable % | adapter size | learning rate | {dev} | {metric} | "
        "train seconds | peak memory (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        peak = "-" if r.get("peak_memory_mb") is None else f"{r['peak_memory_mb']:.0f}"
        lines.append(
            f"| {r['label']} | {r['trainable_params']:,} | {r['trainable_pct']:.3f} | "
            f"{format_bytes(r['adapter_bytes'])} | {r['learning_rate']:g} | {r[dev]:.4f} | {r[metric]:.4f} | "
            f"{r['train_seconds']:.0f} | {peak} |"
        )
    variants = [f"{LABELS[m]} = `{' '.join(VARIANTS[m][1])}`" for m in record["variants"] if VARIANTS[m][1]]
    if variants:
        lines += ["", "Variants (overrides of the config file of their method): " + "; ".join(variants) + "."]
    if len(sweep) > len(rows):
        lines += ["", f"Every run of the sweep ({dev} / {metric}):", "",
                  "| method | learning rate | " + dev + " | " + metric + " |", "|---|---:|---:|---:|"]
        lines += [f"| {r['label']} | {r['learning_rate']:g} | {r[dev]:.4f} | {r[metric]:.4f} |" for r in sweep]
    env = record["environment"]
    lines += ["", provenance_line(env)]
    (out / f"{task}.md").write_text("\n".join(lines) + "\n")

    params_scatter(rows, metric, f"{metric} (test)",
                   f"{title}\n{record['steps']} steps x batch {record['batch_size']}, tuned learning rates",
                   out / f"{task}.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), required=True)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                        help=f"default: {', '.join(DEFAULT_METHODS)}; with --quick {', '.join(QUICK_METHODS)}")
    parser.add_argument("--steps", type=int, default=600, help="optimiser steps per run")
    parser.add_argument("--lr-grid", type=float, nargs="+", default=[0.3, 1.0, 3.0], metavar="MULTIPLE",
                        help="learning rates tried per method, as multiples of its config file's rate")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--reuse", action="store_true",
                        help="read the finished runs of the same steps under --run-dir instead of repeating them")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="where the runs live (default outputs/bench, outputs/bench_quick with --quick)")
    parser.add_argument("--model", default=None, help="train this backbone instead of the config's (model=...)")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_STEPS} steps, the config's rate only, {QUICK_EVAL_SAMPLES} validation "
                             f"sentences, methods {', '.join(QUICK_METHODS)} unless --methods")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    extra = [f"max_eval_samples={QUICK_EVAL_SAMPLES}"] if args.quick else []
    args.methods = args.methods or list(QUICK_METHODS if args.quick else DEFAULT_METHODS)
    if args.quick:
        args.steps, args.lr_grid = min(args.steps, QUICK_STEPS), [1.0]
    run_dir = args.run_dir or REPO / "outputs" / ("bench_quick" if args.quick else "bench")
    started = time.perf_counter()
    jobs = [(method, float(f"{config_learning_rate(args.task, method) * m:.3g}"))
            for method in args.methods for m in args.lr_grid]
    sweep = run_grid(args.task, jobs, args.steps, args.parallel, run_dir, args.reuse, args.model, extra)
    rows = choose(args.task, sweep, args.methods)
    config = yaml.safe_load(config_path(args.task, args.methods[0]).read_text())
    record = {
        "benchmark": args.task,
        "steps": args.steps,
        "batch_size": int(config["per_device_train_batch_size"]),
        "lr_grid": args.lr_grid,
        "selection": f"best {TASKS[args.task][2]} per method",
        "parallel": args.parallel,
        "variants": {m: {"config": str(config_path(args.task, m).relative_to(REPO)), "overrides": list(VARIANTS[m][1]),
                         "label": LABELS[m]} for m in args.methods},
        "validation_samples": QUICK_EVAL_SAMPLES if args.quick else int(config["max_eval_samples"]),
        "model": args.model or config["model"],
        "quick": args.quick,
        "wall_seconds": time.perf_counter() - started,
        "environment": environment_record(),
    }
    write_outputs(args.task, rows, sweep, record, args.out)
    print((args.out / f"{args.task}.md").read_text())


if __name__ == "__main__":
    main()
