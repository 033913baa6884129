"""PEFT methods side by side on three tasks at one fixed budget, in the columns of PEFT's own method comparison
(``method_comparison/`` in huggingface/peft): trainable parameters, score, seconds per step, peak memory, adapter
size and forgetting, with the Pareto front of score against trainable parameters per task.

Tasks (``--tasks``):

- ``sst2``: SST-2 on MiniLM (``recipes/sst2_classification.py``), accuracy on ``test.tsv`` (698 sentences);
  validation: the first 1000 ``dev.tsv`` rows of at least 10 words (``convergence.VALIDATION``).
- ``conll03``: CoNLL-2003 on MiniLM (``recipes/conll03_ner.py``), entity F1 on ``eng.testb``; validation: the first
  1000 sentences of ``eng.testa``.
- ``selfask``: self-ask on SmolLM2-135M-Instruct (``recipes/selfask_sft.py`` with
  ``recipes/configs/smollm2/selfask_lora.yaml``, flat episodes, packed), scored by exact match on ``N_CC``
  Compositional Celebrities questions and on ``N_DEEP`` held-out deep questions
  (`peftprompt.recursive.sources.deep_eval_trees`, minus the validation trees), both drawn with seed 0 and
  self-asked as the shipped runner does (follow-ups: ``operators+retriever`` per layer, the retriever over the
  Compositional Celebrities sub-answers / over the deep questions' leaf facts only; ``max_depth`` 2;
  `recursion.evaluate_cell`); validation: the recipe's loss on its held-out ProbTree 2WikiMultiHopQA trees.

Methods (``--methods``; a method a task has no variant of is skipped there): the variants of
`adapter_methods.VARIANTS` on MiniLM and of `selfask_methods.VARIANTS` on SmolLM2 (``lora`` is LoRA r8: on
query/value for MiniLM, on every projection for SmolLM2, like LoRA's presets there), by default `ENCODER_METHODS` and
`SELFASK_METHODS`. EVA is left out: it needs batches of training inputs at ``attach``, which the recipes do not pass.

Budget, the same for every method of a task:

- MiniLM: ``ENCODER_STEPS`` (300) optimiser steps x batch 16 (a fifth of an SST-2 epoch, a third of CoNLL-2003's),
  batches grouped by length, linear schedule with 6 % warm-up, one thread per run, two runs side by side; validation
  and test scored once, at the last step. Learning rates: ``ENCODER_GRID`` (1, 3, 9) x the variant's starting rate
  (its config file's, or `adapter_methods.OTHER_METHODS`'): in the 300-step sweeps of ``sst2.json`` and
  ``conll03.json`` the chosen multiple of the config rate was 3 or 9 in 21 of 22 cases, never 0.3. A grid whose
  best rate lies at an edge is widened by one rate beyond it (x 3 or / 3), up to ``WIDEN`` (2) times per method; the
  report names the methods whose best rate is still at an edge.
- SmolLM2: ``SELFASK_STEPS`` (80) optimiser steps of 2 rows of 512 packed tokens (2 processes), cosine schedule, no
  in-training generation; learning rates ``SELFASK_GRID`` (1, 3) x the variant's rate in `selfask_methods`.
- Every run trains in fp32 (``PRECISION``), whatever the CPU: the sessions run on different machines, and ``auto``
  would pick bf16 on those with native bf16, so neither the scores nor the seconds of one table would share a
  precision. A record trained with ``auto`` that ran in fp32 counts (`_runs.finished_run`).
- Per method and task the rate with the best validation score (SST-2 accuracy / CoNLL entity F1 / the lowest
  self-ask validation loss; ties: the smaller rate) is chosen; its test score is reported, and every run of the grid
  is in the JSON and the Markdown. Self-ask exact match is measured for the chosen rate only.

Columns: trainable parameters (with the task head), score, seconds per optimiser step (training's ``step_seconds``
over its steps: evaluation and start-up excluded), peak memory (the run's peak RSS; self-ask: the larger of its two
processes), adapter bytes (the saved adapter; full fine-tuning: the whole model), forgetting (`_forgetting`: on
MiniLM the drift of its sentence embeddings, ``1 - cos`` against the frozen backbone, mean over ``FORGETTING_TEXTS``
held-out Wikipedia paragraphs; on SmolLM2 the rise of the causal-LM loss on the same paragraphs with the adapter
active; the paragraphs are the HotpotQA distractor train split's, which no task trains on), and Pareto: no other
method of the task reaches at least its score with at most its trainable parameters.

Runs live in ``--run-dir`` as ``<task>_<method>_lr<LR>`` and survive interruptions: an interrupted run continues
from its newest checkpoint (MiniLM every 100 steps, SmolLM2 every 20; `_runs.run_recipe`), and each finished run
leaves a record under ``--records`` (``benchmarks/results/method_comparison_runs/`` in the repository: results,
config, evaluation log, ``forgetting.json``, ``selfask_eval.json`` for a chosen self-ask rate, the CPU; a few KB)
that later sessions read instead of training again. Results written before every run is done say PARTIAL and list
what is missing. Writes ``method_comparison.{json,md,png}`` to ``--out`` (one table and one Pareto plot per task;
``convergence.py`` reads the 300-step grids of the methods ``sst2.json`` / ``conll03.json`` lack from here).

Time of the default run, sized for about ten hours on 2 CPU cores without native bf16 (fp32, as on the AMD EPYC
host; `ESTIMATE`) from the seconds per step recorded in ``benchmarks/results``; the report's first line sets the
measured wall time of the recorded runs against it:

- SST-2, 31 methods x 3 rates = 93 runs, ~1.7 h: 300 steps at the fp32 records' s/step of ``convergence_runs/``
  (1 thread, 2 runs side by side, batches grouped by length: LoRA 0.18, full 0.25, BitFit 0.15; IA3, prefix,
  prompt and P-tuning from their bf16 records x 1.6, LoRA's fp32 / bf16 ratio), the other tuners at 1.7 x LoRA's
  (their mean ratio in a ``methods_overview.py --quick`` run of every method on this host), 8,200 s of training in
  all, plus ~40 s a run for start-up, evaluation (1,698 sentences) and forgetting; two runs at a time.
- CoNLL-2003, 93 runs, ~2.9 h: the same with LoRA 0.35 s, full 0.38, BitFit 0.24 (bf16 x 1.9), 15,400 s of
  training, plus ~60 s a run (4,453 sentences evaluated).
- Self-ask, 12 methods x 2 rates = 24 runs, ~5.1 h: 80 steps at ~4.4 s for LoRA (``demo_time_amd_no_avx512``: 100
  steps in 8.4 min with start-up), the other methods scaled by their ratio to LoRA in ``selfask_methods.json`` (full
  2.6x, IA3 0.84x, BitFit 0.7x) or on MiniLM (DoRA 1.3x, the other tuners up to 1.7x), 10,200 s of training; ~110 s a
  run for start-up, validation loss and forgetting; then per method ~445 s for the chosen rate's 100 + 100 questions
  (``recursion.json``: 1.2 s and 3.1 s a question at max_depth 2 on this host).

    .venv/bin/python benchmarks/method_comparison.py [--tasks sst2 conll03 selfask] [--methods lora dora vera]
    .venv/bin/python benchmarks/method_comparison.py --quick --model TINY_BERT --lm-model TINY_LLAMA  # a smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Optional

import torch
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm import tqdm
from transformers.utils import logging as transformers_logging

import selfask_methods
from _env import environment_record, provenance_line
from _forgetting import SEED as TEXT_SEED, SOURCE as TEXT_SOURCE, SPLIT as TEXT_SPLIT
from _forgetting import embedding_drift, held_out_texts, lm_loss, sentence_embeddings
from _plot import scatter_labelled
from _runs import (CONFIG_FILE, MACHINE_FILE, RESULTS_FILE, finished_dir, keep_record, load_trained, requested_config,
                   run_recipe)
from adapter_methods import TASKS as ENCODER_TASKS, VARIANTS as ENCODER_VARIANTS, config_learning_rate, config_path
from convergence import VALIDATION
from params_vs_accuracy import pareto_flags
from peftprompt import load_backbone
from peftprompt.recursive import convert
from peftprompt.recursive.sources import deep_eval_trees
from peftprompt.report import format_bytes
from peftprompt.selfask import RetrieverAnswerer, answerers_from_names
from peftprompt.selfask.evaluate import knowledge_base, sample_trees
from recursion import evaluate_cell

NAME = "method_comparison"
REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
TASK_TITLES = {"sst2": "SST-2 accuracy (MiniLM, test.tsv)", "conll03": "CoNLL-2003 entity F1 (MiniLM, eng.testb)",
               "selfask": "Self-ask exact match (SmolLM2-135M-Instruct)"}
TASK_NAMES = {"sst2": "SST-2", "conll03": "CoNLL-2003", "selfask": "self-ask"}
ENCODER_STEPS, ENCODER_GRID, ENCODER_SAVE_EVERY = 300, (1.0, 3.0, 9.0), 100
WIDEN = 2  # MiniLM: rates added beyond an edge of a method's grid while its best rate lies at that edge
SELFASK_STEPS, SELFASK_GRID, SELFASK_SAVE_EVERY = 80, (1.0, 3.0), 20
PRECISION = "mixed_precision=no"  # fp32 on every machine: one precision per table
N_CC, N_DEEP, MAX_DEPTH = 100, 100, 2
QUESTION_SETS = ("compositional_celebrities", "deep")  # the self-ask scores: keys of ``selfask_eval.json``
FORGETTING_TEXTS = 64
FORGETTING_LENGTH = {"encoder": 128, "causal_lm": 256}  # tokens per paragraph: MiniLM's training length, SmolLM2's
SELFASK_NAMES = {"lora": "lora_r8"}  # this benchmark's method name -> the selfask_methods variant
ENCODER_METHODS = ("full", "lora", "ia3", "bitfit", "prefix", "prompt", "ptuning", "osf", "lora_all_linear", "dora",
                   "rslora", "pissa", "olora", "loraplus", "lora_fa", "adalora", "vera", "loha", "lokr", "boft", "oft",
                   "hra", "fourierft", "waveft", "ln_tuning", "miss", "shira", "c3a", "randlora", "delora", "gralora")
SELFASK_METHODS = ("full", "lora", "ia3", "bitfit", "dora", "rslora", "pissa", "loraplus", "adalora", "vera", "loha",
                   "fourierft")
ESTIMATE = {  # hours of the default run on 2 cores without native bf16 (see the module docstring)
    "sst2": 1.7,
    "conll03": 2.9,
    "selfask": 5.1,
}
QUICK_STEPS, QUICK_N, QUICK_TEXTS = 3, 2, 4
QUICK_METHODS = ("lora", "bitfit")
QUICK_ENCODER = ("max_train_samples=64", "max_eval_samples=16")
QUICK_VALIDATION_TREES = 8
QUICK_SELFASK = ("max_train_samples=40", f"max_eval_samples={QUICK_VALIDATION_TREES}")
FORGETTING_FILE, EVAL_FILE = "forgetting.json", "selfask_eval.json"


class Job:
    """One training run: a method of a task at one learning rate, its recipe, config and overrides."""

    def __init__(self, task: str, method: str, lr: float, args: argparse.Namespace):
        self.task, self.method, self.lr = task, method, lr
        self.name = f"{task}_{method}_lr{lr:g}"
        self.run_dir, self.record = args.run_dir / self.name, args.records / self.name
        if task == "selfask":
            variant = SELFASK_NAMES.get(method, method)
            self.config, self.recipe, self.processes = selfask_methods.CONFIG, "selfask_sft.py", args.processes
            extra = list(QUICK_SELFASK if args.quick else [])
            self.overrides = [*selfask_methods.train_overrides(variant, args.selfask_steps, args.lm_model, extra),
                              f"learning_rate={lr:g}", f"save_every={SELFASK_SAVE_EVERY}", "keep_checkpoints=1",
                              PRECISION]
            self.env = None
        else:
            steps = args.encoder_steps
            self.config, self.recipe, self.processes = config_path(task, method), ENCODER_TASKS[task][0], 1
            self.overrides = [f"max_steps={steps}", f"eval_every={steps}", f"save_every={ENCODER_SAVE_EVERY}",
                              "keep_checkpoints=1", "group_by_length=true", f"learning_rate={lr:g}", PRECISION,
                              *ENCODER_VARIANTS[method].overrides, *VALIDATION[task],
                              *(QUICK_ENCODER if args.quick else []), *([f"model={args.model}"] if args.model else [])]
            self.env = {"OMP_NUM_THREADS": "1"}
        self.requested = requested_config(self.config, self.overrides, self.run_dir)

    def finished(self) -> Optional[Path]:
        """Where this run's finished result lies (its record first, then its run directory), or `None`."""
        return finished_dir(self.requested, self.record, self.run_dir)

    def train(self) -> Path:
        """Train (or continue, or find finished) this run in its run directory; return that directory."""
        run_recipe(self.config, self.overrides, self.run_dir, recipe=self.recipe, processes=self.processes,
                   resume=True, log=self.run_dir.parent / f"{self.name}.log", env=self.env)
        return self.run_dir


def has_variant(task: str, method: str) -> bool:
    if task == "selfask":
        return SELFASK_NAMES.get(method, method) in selfask_methods.VARIANTS
    return method in ENCODER_VARIANTS


def grid_rates(task: str, method: str, args: argparse.Namespace) -> list[float]:
    """The learning rates `method` trains with on `task`: the grid's multiples of its starting rate."""
    if task == "selfask":
        base, grid = selfask_methods.VARIANTS[SELFASK_NAMES.get(method, method)].learning_rate, args.selfask_grid
    else:
        base, grid = config_learning_rate(task, method), args.encoder_grid
    return [float(f"{base * m:.3g}") for m in grid]


# --- forgetting -------------------------------------------------------------------------------------------------


class Forgetting:
    """Forgetting of finished runs against their frozen backbones, each backbone's side computed once."""

    def __init__(self, texts: list[str]):
        self.texts, self.base = texts, {}

    def spec(self, task: str) -> dict:
        """The texts measured for a model of `task` (``causal_lm``, ``seq_cls``, ``token_cls``)."""
        return {"source": TEXT_SOURCE, "split": TEXT_SPLIT, "n": len(self.texts), "seed": TEXT_SEED,
                "max_length": FORGETTING_LENGTH["causal_lm" if task == "causal_lm" else "encoder"]}

    def measure(self, run_dir: Path, config: dict) -> dict:
        """The forgetting record of the run in `run_dir`, trained with `config` (``measure``, ``texts``, ``base``,
        ``trained``, ``forgetting``)."""
        key = (config["model"], config["task"], config["load_in_8bit"], config["load_in_4bit"])
        max_length = self.spec(config["task"])["max_length"]
        value: Callable = (lambda m, t: lm_loss(m, t, self.texts, max_length)) if config["task"] == "causal_lm" \
            else (lambda m, t: sentence_embeddings(m, t, self.texts, max_length))
        if key not in self.base:
            base, tokenizer = load_backbone(config["model"], task=config["task"], num_labels=config.get("num_labels"),
                                            load_in_8bit=config["load_in_8bit"], load_in_4bit=config["load_in_4bit"])
            self.base[key] = value(base.eval(), tokenizer)
        model, tokenizer = load_trained(run_dir)
        trained = value(model, tokenizer)
        if config["task"] == "causal_lm":
            return {"measure": "causal-LM loss rise", "texts": self.spec(config["task"]), "base": self.base[key],
                    "trained": trained, "forgetting": trained - self.base[key]}
        return {"measure": "sentence-embedding drift (1 - cos)", "texts": self.spec(config["task"]), "base": None,
                "trained": None, "forgetting": embedding_drift(self.base[key], trained)}

    def ensure(self, run_dir: Path) -> None:
        """Write ``forgetting.json`` in `run_dir` unless it holds one for the same texts."""
        saved = run_dir / FORGETTING_FILE
        config = yaml.safe_load((run_dir / CONFIG_FILE).read_text())
        if not (saved.is_file() and json.loads(saved.read_text())["texts"] == self.spec(config["task"])):
            saved.write_text(json.dumps(self.measure(run_dir, config), indent=2) + "\n")


def recorded(job: Job, forgetting: Forgetting) -> Optional[Path]:
    """The record of `job` when it is finished and its forgetting measured on the current texts; `None` otherwise."""
    directory = job.finished()
    if directory is None or directory != job.record:
        return None
    saved = directory / FORGETTING_FILE
    texts = forgetting.spec(job.requested["task"])
    return directory if saved.is_file() and json.loads(saved.read_text())["texts"] == texts else None


def complete(job: Job, forgetting: Forgetting, records: Path) -> Path:
    """Train `job` unless its record is complete, measure its forgetting and keep its record; return the record."""
    done = recorded(job, forgetting)
    if done is not None:
        return done
    run_dir = job.train()
    forgetting.ensure(run_dir)
    return keep_record(run_dir, records, extra=(FORGETTING_FILE, EVAL_FILE))


def failure(job: Job, err: Exception) -> str:
    """The one line a failed job leaves in the report; the other jobs go on."""
    message = f"{job.name}: {err}" if isinstance(err, RuntimeError) else f"{job.name}: {type(err).__name__}: {err}"
    tqdm.write(f"method_comparison: {message}")
    return message


def run_jobs(jobs: list[Job], forgetting: Forgetting, args: argparse.Namespace, parallel: int) -> list[str]:
    """Complete every job (`complete`), `parallel` at a time; return the messages of those that failed (training,
    or loading the trained model to measure it: one method's failure does not stop the others)."""
    failed = []
    with tqdm(total=len(jobs), desc="method comparison runs", unit="run") as bar, ThreadPoolExecutor(parallel) as pool:
        futures = {pool.submit(complete, job, forgetting, args.records): job for job in jobs}
        for future in as_completed(futures):
            try:
                future.result()
            except Exception as err:  # reported; the sweep goes on
                failed.append(failure(futures[future], err))
            bar.set_postfix_str(futures[future].name)
            bar.update()
    return failed


# --- self-ask evaluation ----------------------------------------------------------------------------------------


def selfask_sets(args: argparse.Namespace) -> tuple[dict[str, list], dict]:
    """The Compositional Celebrities and held-out deep questions (seed 0), and how the deep set was drawn: the deep
    questions minus any that a training or validation tree of the recipe asks."""
    config = yaml.safe_load(selfask_methods.CONFIG.read_text())
    data = config["data"]
    max_eval = QUICK_VALIDATION_TREES if args.quick else config["max_eval_samples"]
    validation = [t for source in data["eval_sources"] for t in convert(source)][:max_eval]
    training = [t for source in data["sources"] for t in convert(source)]
    deep, report = deep_eval_trees([*training, *validation])
    sets = {"compositional_celebrities": sample_trees(convert("compositional_celebrities"), args.n_cc, seed=0),
            "deep": sample_trees(deep, args.n_deep, seed=0)}
    return sets, {**report, "validation_trees": len(validation), "deep_pool": len(deep)}


def evaluate_selfask_run(run_dir: Path, sets: dict[str, list], answerers: list[str], threshold: float) -> dict:
    """Self-ask exact match of the model trained in `run_dir` on each set (`recursion.evaluate_cell`)."""
    model, tokenizer = load_trained(run_dir)
    out = {}
    for key, trees in sets.items():
        retriever = RetrieverAnswerer(knowledge_base(trees, leaves_only=key == "deep"), threshold=threshold)
        cell = evaluate_cell(model, tokenizer, trees, answerers_from_names(answerers, retriever=retriever), MAX_DEPTH)
        out[key] = {k: cell[k] for k in ("n", "em", "f1", "well_formed", "faithfulness", "seconds", "per_set")}
    return out


def ensure_selfask_eval(job: Job, sets: dict[str, list], question_spec: dict, forgetting: Forgetting,
                        args: argparse.Namespace) -> None:
    """Give the record of `job` (a chosen self-ask rate) its ``selfask_eval.json`` for `question_spec`, training
    the run again first when its run directory no longer holds it."""
    saved = job.record / EVAL_FILE
    if saved.is_file() and json.loads(saved.read_text())["questions"] == question_spec:
        return
    run_dir = job.train()  # finds the finished run in its directory, or trains it again
    forgetting.ensure(run_dir)
    scores = evaluate_selfask_run(run_dir, sets, question_spec["answerers"], question_spec["threshold"])
    (run_dir / EVAL_FILE).write_text(json.dumps({"questions": question_spec, **scores}, indent=2) + "\n")
    keep_record(run_dir, args.records, extra=(FORGETTING_FILE, EVAL_FILE))


# --- rows -------------------------------------------------------------------------------------------------------


def run_row(job: Job, directory: Path, question_spec: Optional[dict] = None) -> dict:
    """A finished run's row: its ``results.json`` (scores, trainable parameters, adapter bytes, peak memory...),
    seconds per step, forgetting, the CPU that ran it, and its ``selfask_eval.json`` scores where it has them for
    `question_spec`."""
    results = json.loads((directory / RESULTS_FILE).read_text())
    forgetting = json.loads((directory / FORGETTING_FILE).read_text())
    machine = directory / MACHINE_FILE
    row = {**results, "method": job.method, "learning_rate": job.lr, "label": label(job.task, job.method),
           "seconds_per_step": results["step_seconds"] / results["global_step"],
           "forgetting": forgetting["forgetting"], "forgetting_detail": forgetting,
           "cpu_model": json.loads(machine.read_text())["cpu_model"] if machine.is_file() else None}
    evaluation = directory / EVAL_FILE
    scores = json.loads(evaluation.read_text()) if evaluation.is_file() else None
    if scores is not None and scores["questions"] == question_spec:
        row.update({f"{key}_{k}": scores[key][k] for key in QUESTION_SETS
                    for k in ("em", "well_formed", "n", "seconds")})
    return row


def label(task: str, method: str) -> str:
    if task == "selfask":
        return selfask_methods.VARIANTS[SELFASK_NAMES.get(method, method)].label
    return ENCODER_VARIANTS[method].label


SCORES = {  # task: (validation key, higher is better, [(score key, heading)])
    "sst2": ("dev_accuracy", True, [("accuracy", "test accuracy")]),
    "conll03": ("dev_entity_f1", True, [("entity_f1", "test entity F1")]),
    "selfask": ("eval_loss", False, [("compositional_celebrities_em", "Compositional Celebrities EM"),
                                     ("deep_em", "held-out deep EM")]),
}


def choose(task: str, runs: list[dict]) -> dict:
    """The run with the best validation score (ties: the smaller learning rate)."""
    key, higher, _ = SCORES[task]
    return max(runs, key=lambda r: ((r[key] if higher else -r[key]), -r["learning_rate"]))


def with_pareto(task: str, rows: list[dict]) -> list[dict]:
    """`rows` sorted by trainable parameters, each with ``pareto_<score>`` per score of the task."""
    rows = sorted(rows, key=lambda r: r["trainable_params"])
    for score, _ in SCORES[task][2]:
        scored = [r for r in rows if r.get(score) is not None]
        for r, flag in zip(scored, pareto_flags([(r["trainable_params"], r[score]) for r in scored])):
            r[f"pareto_{score}"] = flag
    return rows


# --- the task loop ----------------------------------------------------------------------------------------------


def run_task(task: str, args: argparse.Namespace, requested: list[str], forgetting: Forgetting, sets: Optional[dict],
             question_spec: Optional[dict]) -> dict:
    """Train, evaluate and gather the `requested` methods of `task` (those it has a variant of): its results,
    sweep, and what is missing, skipped or failed."""
    methods = [m for m in requested if has_variant(task, m)]
    jobs = {m: [Job(task, m, lr, args) for lr in grid_rates(task, m, args)] for m in methods}
    failed: list[str] = []
    if not args.report_only:
        todo = [job for grid in jobs.values() for job in grid if recorded(job, forgetting) is None]
        torch.set_num_threads(1 if task != "selfask" else args.eval_threads)
        failed = run_jobs(todo, forgetting, args, runs_at_once(task, args.parallel))
    if task != "selfask":
        failed += widen_grids(task, jobs, forgetting, args)
    if not args.report_only:
        if task == "selfask":
            for method, grid in jobs.items():
                done = [(job, job.record) for job in grid if recorded(job, forgetting) is not None]
                if len(done) == len(grid):
                    best = choose(task, [run_row(job, d) for job, d in done])
                    chosen = next(job for job in grid if job.lr == best["learning_rate"])
                    try:
                        ensure_selfask_eval(chosen, sets, question_spec, forgetting, args)
                    except Exception as err:  # reported; the other methods go on
                        failed.append(failure(chosen, err))
    rows, sweep, missing = [], [], []
    for method, grid in jobs.items():
        done = [(job, recorded(job, forgetting)) for job in grid]
        runs = [run_row(job, d, question_spec) for job, d in done if d is not None]
        sweep += runs
        missing += [job.name for job, d in done if d is None]
        if any(d is None for _, d in done[:len(grid_rates(task, method, args))]):
            continue  # the grid is not complete (a widened rate still missing: chosen from the runs so far)
        best = choose(task, runs)
        if task == "selfask" and "deep_em" not in best:
            missing.append(f"{task}_{method}_lr{best['learning_rate']:g} (self-ask evaluation)")
            continue
        rows.append({**best, "grid_edge": grid_edge(best["learning_rate"], [r["learning_rate"] for r in runs])})
    return {"methods": methods, "skipped": [m for m in requested if m not in methods],
            "results": with_pareto(task, rows), "sweep": sweep, "missing": missing, "failed": failed,
            "step_hours": sum(r["step_seconds"] for r in sweep) / 3600,
            "train_hours": sum(r["train_seconds"] for r in sweep) / 3600,
            "question_hours": sum(r.get(f"{key}_seconds", 0) for r in rows for key in QUESTION_SETS) / 3600}


def runs_at_once(task: str, parallel: int) -> int:
    """How many runs of `task` train side by side: `parallel` on MiniLM, one on SmolLM2 (a run takes 2 processes)."""
    return 1 if task == "selfask" else parallel


def wall_hours(task: str, data: dict, parallel: int) -> float:
    """A task's measured wall time: its training with evaluation, `runs_at_once` at a time, plus the self-ask
    question sets (start-up and forgetting excluded)."""
    return data["train_hours"] / runs_at_once(task, parallel) + data["question_hours"]


def widen_grids(task: str, jobs: dict[str, list[Job]], forgetting: Forgetting, args: argparse.Namespace) -> list[str]:
    """Widen each method's grid of `jobs` (MiniLM) whose best validated rate is at an edge: add the next rate beyond
    that edge (the grid's ratio) and train it (not with ``--report-only``: there it is missing until recorded), at most
    ``--widen`` times per method, a round over every method at a time; return the failures."""
    multiples = sorted(args.encoder_grid)
    if len(multiples) < 2:
        return []
    ratio, failed = multiples[-1] / multiples[-2], []
    for _ in range(args.widen):
        added = []
        for method, grid in jobs.items():
            done = [recorded(job, forgetting) for job in grid]
            if any(d is None for d in done):
                continue
            best = choose(task, [run_row(job, d) for job, d in zip(grid, done)])["learning_rate"]
            edge = grid_edge(best, [job.lr for job in grid])
            if edge is not None:
                grid.append(Job(task, method, float(f"{best * ratio if edge == 'top' else best / ratio:.3g}"), args))
                added.append(grid[-1])
        if not added:
            break
        if not args.report_only:
            failed += run_jobs([job for job in added if recorded(job, forgetting) is None], forgetting, args,
                               args.parallel)
    return failed


def grid_edge(rate: float, rates: list[float]) -> Optional[str]:
    """``"top"`` or ``"bottom"`` when the chosen `rate` is the highest or lowest of its grid's `rates` (the best
    rate may lie beyond the grid), else `None`."""
    return "top" if rate == max(rates) else "bottom" if rate == min(rates) else None


# --- output -----------------------------------------------------------------------------------------------------


def _mark(flag: Optional[bool]) -> str:
    return "yes" if flag else ""


def _cpu(row: dict) -> str:
    return row.get("cpu_model") or "a CPU not recorded"


def machines(sweep: list[dict]) -> tuple[Optional[str], str]:
    """The CPU that ran most of a task's `sweep` and a line saying which CPUs ran its runs and their hours of
    optimiser steps: seconds per step compare only within one machine, so the report marks the rows measured on
    another."""
    runs, hours = Counter(), Counter()
    for r in sweep:
        cpu = _cpu(r)
        runs[cpu] += 1
        hours[cpu] += r["step_seconds"] / 3600
    counts = runs.most_common()
    if len(counts) == 1:
        return counts[0][0], f"Machine: every run on {counts[0][0]}."
    others = ", ".join(cpu for cpu, _ in counts[1:])
    return counts[0][0], ("Machines: " + ", ".join(f"{n} run{'s' * (n > 1)} on {cpu} ({hours[cpu]:.1f} h of steps)"
                                                   for cpu, n in counts)
                          + f". Seconds per step compare only within one machine: those marked * were measured on "
                          f"{others}.")


def task_lines(task: str, data: dict, result: dict) -> list[str]:
    key, _, scores = SCORES[task]
    usual_cpu, machine_line = machines(data["sweep"]) if data["sweep"] else (None, "")

    def per_step(row: dict, digits: int) -> str:
        mark = "" if _cpu(row) == usual_cpu else " *"
        return f"{row['seconds_per_step']:.{digits}f}{mark}"

    budget = result["budgets"]["selfask" if task == "selfask" else "encoder"]
    partial = " (PARTIAL)" if data["missing"] else ""
    lines = [f"## {TASK_TITLES[task]}{partial}", ""]
    if task == "selfask":
        spec = result["questions"]
        lines += [f"{budget['steps']} steps of {budget['batch']}; learning rate: the lowest validation loss (held-out "
                  f"ProbTree 2WikiMultiHopQA trees) over {budget['grid']}; exact match on "
                  f"{spec['n']['compositional_celebrities']} Compositional Celebrities and {spec['n']['deep']} "
                  "held-out deep questions (seed 0), self-ask with "
                  f"{', '.join(spec['answerers'])} per layer, max_depth {MAX_DEPTH}. Forgetting: the rise of the "
                  "causal-LM loss on the held-out paragraphs with the adapter active (base "
                  + (f"{data['results'][0]['forgetting_detail']['base']:.4f}" if data["results"] else "-") + ").", ""]
        head = ("| method | trainable params | trainable % | adapter size | learning rate | validation loss | "
                "CC EM | deep EM | well-formed (CC / deep) | s / step | peak memory (MB) | forgetting (loss rise) | "
                "Pareto (CC / deep) |")
        lines += [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|"]
        for r in data["results"]:
            lines.append(
                f"| {r['label']} | {r['trainable_params']:,} | {r['trainable_pct']:.3f} | "
                f"{format_bytes(r['adapter_bytes'])} | {r['learning_rate']:g} | {r['eval_loss']:.4f} | "
                f"{r['compositional_celebrities_em']:.3f} | {r['deep_em']:.3f} | "
                f"{r['compositional_celebrities_well_formed']:.2f} / {r['deep_well_formed']:.2f} | "
                f"{per_step(r, 2)} | {r['peak_memory_mb']:.0f} | {r['forgetting']:+.4f} | "
                f"{_mark(r.get('pareto_compositional_celebrities_em'))} / {_mark(r.get('pareto_deep_em'))} |")
    else:
        score, heading = scores[0]
        lines += [f"{budget['steps']} steps x batch {budget['batch']}; learning rate: the best {key} over "
                  f"{budget['grid']}, widened by the grid's ratio beyond the edge where the best rate lies (up to "
                  f"{budget['widen']} times); {heading} at the last step. Forgetting: sentence-embedding drift of the "
                  "encoder (1 - cos to the frozen backbone) on the held-out paragraphs.", "",
                  f"| method | trainable params | trainable % | adapter size | learning rate | {key} | {heading} | "
                  "s / step | peak memory (MB) | forgetting (drift) | Pareto |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|"]
        for r in data["results"]:
            lines.append(
                f"| {r['label']} | {r['trainable_params']:,} | {r['trainable_pct']:.3f} | "
                f"{format_bytes(r['adapter_bytes'])} | {r['learning_rate']:g} | {r[key]:.4f} | {r[score]:.4f} | "
                f"{per_step(r, 3)} | {r['peak_memory_mb']:.0f} | {r['forgetting']:.4f} | "
                f"{_mark(r.get(f'pareto_{score}'))} |")
    grid = {}
    for r in data["sweep"]:
        grid.setdefault(r["label"], []).append((r["learning_rate"], r[key]))
    if grid:
        lines += ["", f"Every run of the grid ({key} per learning rate): " + "; ".join(
            f"{name} {', '.join(f'{lr:g}: {score:.4f}' for lr, score in sorted(cells))}"
            for name, cells in grid.items()) + "."]
    edges = {edge: [r["label"] for r in data["results"] if r.get("grid_edge") == edge] for edge in ("top", "bottom")}
    if edges["top"] or edges["bottom"]:
        at_edges = [f"the {edge} rate for {', '.join(names)}" for edge, names in edges.items() if names]
        widened = f" after widening it (up to {budget['widen']} rates beyond an edge)" if task != "selfask" else ""
        lines += ["", f"Chosen at an edge of the grid{widened}, so a rate beyond it may score better: "
                  + "; ".join(at_edges) + "."]
    if data["sweep"]:
        side_by_side, wall = runs_at_once(task, result["parallel"]), wall_hours(task, data, result["parallel"])
        questions = (f", plus {data['question_hours']:.1f} h for the question sets of the {len(data['results'])} "
                     "chosen rates" if data["question_hours"] else "")
        lines += ["", f"Compute: {len(data['sweep'])} runs, {data['step_hours']:.1f} h of optimiser steps and "
                  f"{data['train_hours']:.1f} h of training with its evaluation summed over them ({side_by_side} at a "
                  f"time{questions}: about {wall:.1f} h of wall time; start-up and "
                  f"forgetting come on top). The budget was sized for {result['estimate_hours'][task]} h of wall time "
                  "for the whole task."]
        lines += ["", machine_line]
    if data["skipped"]:
        lines += ["", "No variant on this task: " + ", ".join(data["skipped"]) + "."]
    if data["missing"]:
        lines += ["", "Not finished yet: " + ", ".join(data["missing"]) + "."]
    if data["failed"]:
        lines += ["", "Failed: " + "; ".join(data["failed"]) + "."]
    return lines + [""]


def write_results(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# PEFT methods at one fixed budget{' (PARTIAL: runs missing)' if result['partial'] else ''}", "",
             "Columns as PEFT's method comparison: trainable parameters (task head included), score, seconds per "
             "optimiser step (evaluation and start-up excluded), peak memory (the run's peak RSS), adapter size, "
             f"forgetting on {result['forgetting']['texts']}. Pareto: no other method of the task reaches at least "
             "its score with at most its trainable parameters.", ""]
    walls = {task: wall_hours(task, data, result["parallel"]) for task, data in result["tasks"].items()}
    per_task = ", ".join(f"{TASK_NAMES[task]} {hours:.1f} h" for task, hours in walls.items())
    lines += [f"Measured wall time{' so far' if result['partial'] else ''}: about {sum(walls.values()):.1f} h "
              f"({per_task}; start-up and forgetting excluded), against the "
              f"{sum(result['estimate_hours'][t] for t in walls):.1f} h the budgets were sized for.", ""]
    for task, data in result["tasks"].items():
        lines += task_lines(task, data, result)
    lines += [provenance_line(result["environment"]), ""]
    (out / f"{NAME}.md").write_text("\n".join(lines))
    plot(result, out / f"{NAME}.png")


def plot(result: dict, path: Path) -> None:
    """One panel per task score: score against trainable parameters (log x), the Pareto front joined."""
    panels = [(task, score, heading) for task, data in result["tasks"].items() for score, heading in SCORES[task][2]
              if any(r.get(score) is not None for r in data["results"])]
    figure = Figure(figsize=(6.4 * max(min(len(panels), 2), 1), 4.4 * max((len(panels) + 1) // 2, 1)))
    FigureCanvasAgg(figure)
    if not panels:
        figure.text(0.5, 0.5, "PARTIAL: no method has finished its grid yet", ha="center", va="center")
    for i, (task, score, heading) in enumerate(panels):
        rows = result["tasks"][task]["results"]
        ax = figure.add_subplot((len(panels) + 1) // 2, min(len(panels), 2), i + 1)
        ax.set_xscale("log")
        ax.set_xlim(min(r["trainable_params"] for r in rows) / 2, max(r["trainable_params"] for r in rows) * 10)
        front = [r for r in rows if r.get(f"pareto_{score}")]
        ax.plot([r["trainable_params"] for r in front], [r[score] for r in front], "--", color="0.5", linewidth=1,
                zorder=1)
        colors = ["tab:red" if r.get(f"pareto_{score}") else "tab:blue" for r in rows]
        scatter_labelled(ax, figure.canvas.get_renderer(), [(r["trainable_params"], r[score]) for r in rows],
                         [r["label"] for r in rows], colors, fontsize=6)
        ax.set_xlabel("trainable parameters (log scale)")
        ax.set_ylabel(heading)
        ax.set_title(f"{TASK_TITLES[task]}{' (PARTIAL)' if result['tasks'][task]['missing'] else ''}\n"
                     "red: Pareto front (dashed)", fontsize=9)
        ax.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The command line, with the budgets, grids, question counts and folders that ``--quick`` and the defaults set."""
    all_methods = sorted({*ENCODER_VARIANTS, *SELFASK_NAMES, *selfask_methods.VARIANTS} - {*SELFASK_NAMES.values()})
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=list(TASK_TITLES), default=list(TASK_TITLES))
    parser.add_argument("--methods", nargs="+", choices=all_methods, default=None,
                        help="default: ENCODER_METHODS on MiniLM, SELFASK_METHODS on SmolLM2; with --quick "
                             f"{', '.join(QUICK_METHODS)}")
    parser.add_argument("--parallel", type=int, default=2, help="MiniLM runs side by side (one thread each)")
    parser.add_argument("--processes", type=int, choices=(1, 2), default=2, help="processes per self-ask run")
    parser.add_argument("--eval-threads", type=int, default=2, help="threads of the self-ask evaluation")
    parser.add_argument("--n-cc", type=int, default=N_CC, help="Compositional Celebrities questions")
    parser.add_argument("--n-deep", type=int, default=N_DEEP, help="held-out deep questions")
    parser.add_argument("--threshold", type=float, default=0.8, help="retriever similarity needed to answer")
    parser.add_argument("--model", default=None, help="the MiniLM tasks' backbone (default: the configs' minilm)")
    parser.add_argument("--lm-model", default="smollm2-135m", help="the self-ask backbone")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="default outputs/method_comparison (outputs/method_comparison_quick with --quick)")
    parser.add_argument("--records", type=Path, default=None,
                        help="finished runs' records (default benchmarks/results/method_comparison_runs; with "
                             "--quick, records/ in --run-dir)")
    parser.add_argument("--widen", type=int, default=WIDEN,
                        help="MiniLM: rates added beyond a grid's edge while the best rate lies there, per method")
    parser.add_argument("--report-only", action="store_true", help="train nothing: report the finished runs")
    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke run: {QUICK_STEPS} steps, the grids' first rate, {QUICK_N} questions per set, "
                             f"{QUICK_TEXTS} forgetting paragraphs, methods {', '.join(QUICK_METHODS)}")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.encoder_steps, args.selfask_steps = ENCODER_STEPS, SELFASK_STEPS
    args.encoder_grid, args.selfask_grid, args.texts = ENCODER_GRID, SELFASK_GRID, FORGETTING_TEXTS
    if args.quick:
        args.encoder_steps = args.selfask_steps = QUICK_STEPS
        args.encoder_grid, args.selfask_grid = ENCODER_GRID[:1], SELFASK_GRID[:1]
        args.n_cc, args.n_deep, args.texts = min(args.n_cc, QUICK_N), min(args.n_deep, QUICK_N), QUICK_TEXTS
    args.run_dir = (args.run_dir or REPO / "outputs" / (f"{NAME}_quick" if args.quick else NAME)).resolve()
    args.records = (args.records or (args.run_dir / "records" if args.quick else RESULTS / f"{NAME}_runs")).resolve()
    return args


def compare(args: argparse.Namespace) -> dict:
    """Run (or read) every task of `args` and return the whole result."""
    started = time.perf_counter()
    forgetting = Forgetting(held_out_texts(args.texts))
    question_spec, sets, drawn = None, None, None
    if "selfask" in args.tasks:
        sets, drawn = selfask_sets(args)
        answerers = yaml.safe_load(selfask_methods.CONFIG.read_text())["data"]["eval_answerers"]
        question_spec = {"n": {k: len(v) for k, v in sets.items()}, "seed": 0, "answerers": answerers,
                         "threshold": args.threshold, "max_depth": MAX_DEPTH}
    tasks = {}
    for task in args.tasks:
        default = QUICK_METHODS if args.quick else SELFASK_METHODS if task == "selfask" else ENCODER_METHODS
        tasks[task] = run_task(task, args, args.methods or list(default), forgetting, sets, question_spec)
    return {
        "benchmark": NAME, "quick": args.quick,
        "partial": any(data["missing"] for data in tasks.values()),
        "budgets": {
            "encoder": {"steps": args.encoder_steps, "batch": "16", "save_every": ENCODER_SAVE_EVERY,
                        "grid": " / ".join(f"{m:g}x" for m in args.encoder_grid) + " the starting rate",
                        "widen": args.widen,
                        "group_by_length": True},
            "selfask": {"steps": args.selfask_steps, "batch": "2 x 512 packed tokens",
                        "save_every": SELFASK_SAVE_EVERY,
                        "grid": " / ".join(f"{m:g}x" for m in args.selfask_grid) + " the variant's rate"},
        },
        "forgetting": {"texts": f"{len(forgetting.texts)} paragraphs of {TEXT_SOURCE}/{TEXT_SPLIT} (seed {TEXT_SEED})",
                       "encoder": "mean 1 - cos(sentence embedding of the frozen backbone, of the trained model)",
                       "causal_lm": "causal-LM loss with the adapter active minus the frozen backbone's"},
        "questions": {**question_spec, "deep_drawn": drawn} if question_spec else None,
        "estimate_hours": ESTIMATE, "parallel": args.parallel, "tasks": tasks,
        "wall_seconds": time.perf_counter() - started,
        "environment": environment_record(),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    transformers_logging.set_verbosity_error()
    write_results(compare(args), args.out)
    print((args.out / f"{NAME}.md").read_text())


if __name__ == "__main__":
    main()
