"""Self-ask exact match per adapter method on SmolLM2-135M-Instruct: every method trained the same way, then asked
Compositional Celebrities questions zero-shot.

Each variant (`VARIANTS`) trains ``recipes/selfask_sft.py --config recipes/configs/smollm2/selfask_lora.yaml`` for
``--steps`` optimiser steps with its own ``method``, ``method_args`` (replacing the config's LoRA arguments whole),
quantisation (``load_in_8bit`` / ``load_in_4bit`` for QLoRA) and learning rate, without the in-training generation
(``data.generate_eval=0``), under ``accelerate launch`` on 2 CPU processes like ``make demo``
(``recipes/accelerate/cpu_2proc.yaml``; one GPU process with ``single_gpu.yaml`` where CUDA is available;
``--processes 1``: a plain single process). The saved adapter then answers ``--n`` Compositional Celebrities
questions (drawn at random with seed 0, never trained on) by zero-shot self-ask, follow-ups answered by the MiniLM
retriever over the questions' own gold sub-answers, as the fine-tuned approach of ``benchmarks/selfask.py``; a
quantised variant answers on the backbone quantised as in training.

Learning rates: one per method, no grid (one variant takes minutes on 2 CPU cores). LoRA of any rank and QLoRA use
the config's 1e-3 (the rate ``make demo`` trains with). Every other method gets 1e-3 times the ratio of its tuned
rate to LoRA's on MiniLM: the geometric mean of the SST-2 and CoNLL-2003 ratios in
``benchmarks/results/{sst2,conll03}.json`` (LoRA 3e-3 on both; full 1.5e-4 and 1.5e-4 -> 0.05; prefix 0.03 and
0.09 -> 17; prompt 0.27 and 0.27 -> 90, the top of that grid, so a lower bound; P-tuning 0.003 and 0.009 -> 1.7; IA3
0.009 and 0.027 -> 5.2; BitFit 0.006 and 0.018 -> 3.5), rounded to one significant figure. The methods of
`adapter_methods.OTHER_METHODS` (LoRA's presets at rank 8 on every projection, the other PEFT tuners at the catalog's
defaults) run when ``--methods`` names them, at their MiniLM starting rate (LoRA's is 1e-3 on both).

Prompt tuning, P-tuning and prefix tuning train on padded episodes, one a row (the recipe's ``data.packing: auto``:
under virtual tokens packed episodes would attend to each other), in batches of ``UNPACKED_BATCH`` episodes per
process, about the episodes of one packed row, so that every method sees about as many episodes per step.

Writes ``selfask_methods.{json,md,png}`` to ``--out``:

    .venv/bin/python benchmarks/selfask_methods.py [--steps 100] [--n 100] [--methods lora_r16 ia3] [--reuse]

Runs live in ``--run-dir`` as ``selfask_<variant>`` (with ``train.log`` and ``selfask_eval.json``). ``--reuse``
keeps a run whose saved config (``train_config.yaml``, next to its ``results.json``) equals the requested one
(`_runs.run_recipe`) and an evaluation of the same questions; anything repeated starts from an empty directory.
``--quick``: LoRA r16 and BitFit only (unless ``--methods``), 5 steps on 200 training trees, 10 questions, runs
under ``outputs/bench_quick``. ``--model`` trains another causal LM (the tests use a tiny one).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import NamedTuple, Optional

from tqdm import tqdm
from transformers.utils import logging as transformers_logging

from _env import environment_record, provenance_line
from _plot import params_scatter
from _runs import load_trained, run_recipe
from adapter_methods import OTHER_METHODS
from peftprompt.recursive import convert
from peftprompt.report import format_bytes
from peftprompt.selfask import RetrieverAnswerer, SelfAskRunner
from peftprompt.selfask.evaluate import evaluate_selfask, knowledge_base, sample_trees

NAME = "selfask_methods"
REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "recipes/configs/smollm2/selfask_lora.yaml"
SOURCE = "compositional_celebrities"
SEED = 0
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUICK_STEPS, QUICK_N, QUICK_TRAIN_TREES, QUICK_EVAL_TREES = 5, 10, 200, 16
QUICK_METHODS = ("lora_r16", "bitfit")  # --quick without --methods
UNPACKED_BATCH = 5  # episodes per process and step without packing: 956 flat episodes make 204 packed rows of 512


class Variant(NamedTuple):
    method: str
    method_args: dict
    quantised: Optional[str]  # "8bit" / "4bit": load_in_8bit / load_in_4bit
    learning_rate: float
    label: str
    batch_size: int = 1  # per process; the config's one packed row, or `UNPACKED_BATCH` padded episodes

    def overrides(self) -> list[str]:
        """The recipe's config overrides for this variant."""
        quantised = [f"load_in_{self.quantised}=true"] if self.quantised else []
        return [f"method={self.method}", f"method_args={json.dumps(self.method_args)}",
                f"learning_rate={self.learning_rate:g}", f"per_device_train_batch_size={self.batch_size}", *quantised]


def lora(r: int) -> dict:
    """LoRA of rank `r` (alpha 2 r, no dropout: PEFT's default, and no method here trains with dropout) on every
    projection."""
    return {"r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0, "target_modules": PROJECTIONS}


VARIANTS = {
    "lora_r4": Variant("lora", lora(4), None, 1e-3, "LoRA r4"),
    "lora_r8": Variant("lora", lora(8), None, 1e-3, "LoRA r8"),
    "lora_r16": Variant("lora", lora(16), None, 1e-3, "LoRA r16"),  # the shipped config (make demo) without dropout
    "ia3": Variant("ia3", {}, None, 5e-3, "IA3"),
    "bitfit": Variant("bitfit", {}, None, 3e-3, "BitFit"),
    "prompt": Variant("prompt", {}, None, 9e-2, "prompt", UNPACKED_BATCH),
    "ptuning": Variant("ptuning", {}, None, 2e-3, "P-tuning", UNPACKED_BATCH),
    "prefix": Variant("prefix", {}, None, 2e-2, "prefix", UNPACKED_BATCH),
    "qlora_4bit": Variant("lora", lora(16), "4bit", 1e-3, "QLoRA 4-bit (r16)"),
    "qlora_8bit": Variant("lora", lora(16), "8bit", 1e-3, "QLoRA 8-bit (r16)"),
    "full": Variant("full", {}, None, 5e-5, "full"),
}
DEFAULT_METHODS = tuple(VARIANTS)
"""The variants run by default (``selfask_methods.json``); the others run when named in ``--methods``."""
LORA_PRESETS = ("dora", "rslora", "pissa", "olora", "loraplus", "lora_fa")
"""LoRA's presets, at rank 8 on every projection like ``lora_r8``."""
# The other methods of `adapter_methods.OTHER_METHODS` at their MiniLM starting rate (LoRA's is 1e-3 on both), the
# tuners at the catalog's defaults (PEFT's target modules for Llama); LoRA on every linear layer is ``lora_r8`` here.
VARIANTS.update({
    name: Variant(name, lora(8) if name in LORA_PRESETS else {}, None, rate, label)
    for name, (label, rate) in OTHER_METHODS.items() if name != "lora_all_linear"
})
RATE_RULE = ("LoRA and QLoRA: the config's 1e-3; others: 1e-3 x (their tuned rate / LoRA's) on MiniLM, geometric "
             "mean over SST-2 and CoNLL-2003, one significant figure; methods of adapter_methods.OTHER_METHODS: their "
             "MiniLM starting rate")


def train_overrides(variant: str, steps: int, model: str, extra: list[str]) -> list[str]:
    """The recipe's config overrides that train `variant` for `steps` steps on `model`."""
    return [f"model={model}", *VARIANTS[variant].overrides(), f"max_steps={steps}", "data.generate_eval=0", *extra]


def evaluate(run: Path, trees: list, retriever: RetrieverAnswerer, label: str) -> dict:
    """Zero-shot self-ask of `run`'s model on `trees` (follow-ups: `retriever`): EM, F1, well-formed, ..."""
    started = time.perf_counter()
    model, tokenizer = load_trained(run)
    runner = SelfAskRunner(model, tokenizer, answerer=retriever, progress=f"{label} self-ask")
    scores = evaluate_selfask(trees, runner, "self_ask", sub_question_check=False)
    keys = ("n", "em", "f1", "well_formed", "mean_follow_ups", "mean_generated_tokens", "issues")
    return {**{k: scores[k] for k in keys}, "eval_seconds": time.perf_counter() - started}


def run_variant(variant: str, args: argparse.Namespace, extra: list[str], trees: list, retriever) -> dict:
    """Train `variant` (unless `args.reuse` finds it done), evaluate it (same), and return its row."""
    run = args.run_dir / f"selfask_{variant}"
    v = VARIANTS[variant]
    trained = run_recipe(CONFIG, train_overrides(variant, args.steps, args.model, extra), run,
                         recipe="selfask_sft.py", processes=args.processes, reuse=args.reuse, log=run / "train.log")
    questions = {"source": SOURCE, "n": len(trees), "seed": SEED, "threshold": args.threshold}
    saved = run / "selfask_eval.json"
    scores = json.loads(saved.read_text()) if args.reuse and saved.is_file() else None
    if scores is None or scores["questions"] != questions:
        scores = {"questions": questions, **evaluate(run, trees, retriever, v.label)}
        saved.write_text(json.dumps(scores, indent=2) + "\n")
    keys = ("trainable_params", "total_params", "trainable_pct", "adapter_bytes", "global_step", "train_seconds",
            "peak_memory_mb", "world_size", "mixed_precision", "eval_loss", "command")
    return {"method": variant, "label": v.label, "peft_method": v.method, "method_args": v.method_args,
            "quantised": v.quantised, "learning_rate": v.learning_rate,
            **{k: trained.get(k) for k in keys}, **{k: value for k, value in scores.items() if k != "questions"}}


def write_results(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}.json").write_text(json.dumps(result, indent=2) + "\n")
    rows, env = result["results"], result["environment"]
    lines = [
        f"# Self-ask per adapter method on {result['model']}: Compositional Celebrities, {result['n']} questions",
        "",
        f"Each method trained by `recipes/selfask_sft.py` ({result['config']}) for {result['steps']} optimiser steps "
        f"({rows[0]['world_size']} processes, mixed precision {rows[0]['mixed_precision']}), then asked "
        f"{result['n']} Compositional Celebrities questions (random, seed {SEED}, never trained on) by zero-shot "
        f"self-ask, follow-ups answered by the MiniLM retriever over their gold sub-answers (threshold "
        f"{result['threshold']}); greedy decoding. Learning rates: {RATE_RULE}. LoRA is on every projection "
        "(alpha = 2 r); the quantised variants are evaluated on the quantised backbone. Peak memory: the largest "
        "peak RSS of the training processes.",
        "",
        "| method | trainable params | trainable % | adapter size | learning rate | EM | F1 | well-formed | "
        "eval loss | train seconds | peak memory (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        peak = "-" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
        lines.append(
            f"| {r['label']} | {r['trainable_params']:,} | {r['trainable_pct']:.3f} | "
            f"{format_bytes(r['adapter_bytes'])} | {r['learning_rate']:g} | {r['em']:.3f} | {r['f1']:.3f} | "
            f"{r['well_formed']:.3f} | {r['eval_loss']:.3f} | {r['train_seconds']:.0f} | {peak} |"
        )
    lines += ["", provenance_line(env)]
    (out / f"{NAME}.md").write_text("\n".join(lines) + "\n")

    params_scatter(rows, "em", "exact match (zero-shot self-ask)",
                   f"{result['model']} self-ask, Compositional Celebrities (n={result['n']})\n"
                   f"{result['steps']} training steps per method", out / f"{NAME}.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=VARIANTS, default=None,
                        help=f"default: {', '.join(DEFAULT_METHODS)}; with --quick {', '.join(QUICK_METHODS)}")
    parser.add_argument("--steps", type=int, default=100, help="optimiser steps per method (default 100)")
    parser.add_argument("--n", type=int, default=100, help="Compositional Celebrities questions (default 100)")
    parser.add_argument("--model", default="smollm2-135m", help="the causal LM to train")
    parser.add_argument("--threshold", type=float, default=0.8, help="retriever similarity needed to answer")
    parser.add_argument("--processes", type=int, choices=(1, 2), default=2,
                        help="training processes on a CPU (2: accelerate launch, as make demo)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the finished runs and evaluations under --run-dir instead of repeating them")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_STEPS} steps on {QUICK_TRAIN_TREES} training trees, {QUICK_N} questions")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="where the runs live (default outputs/bench, outputs/bench_quick with --quick)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    extra = []
    args.methods = args.methods or list(QUICK_METHODS if args.quick else DEFAULT_METHODS)
    if args.quick:
        args.steps, args.n = min(args.steps, QUICK_STEPS), min(args.n, QUICK_N)
        extra = [f"max_train_samples={QUICK_TRAIN_TREES}", f"max_eval_samples={QUICK_EVAL_TREES}"]
    args.run_dir = args.run_dir or REPO / "outputs" / ("bench_quick" if args.quick else "bench")
    started = time.perf_counter()
    transformers_logging.set_verbosity_error()
    trees = sample_trees(convert(SOURCE), args.n, seed=SEED)
    retriever = RetrieverAnswerer(knowledge_base(trees), threshold=args.threshold)
    rows = []
    for variant in (bar := tqdm(args.methods, desc="self-ask methods", unit="method")):
        bar.set_postfix_str(variant)
        rows.append(run_variant(variant, args, extra, trees, retriever))
    result = {
        "benchmark": NAME, "model": args.model, "config": str(CONFIG.relative_to(REPO)), "steps": args.steps,
        "n": len(trees), "source": SOURCE, "seed": SEED, "threshold": args.threshold, "processes": args.processes,
        "learning_rates": {m: VARIANTS[m].learning_rate for m in args.methods}, "learning_rate_rule": RATE_RULE,
        "overrides": extra, "quick": args.quick, "results": rows, "wall_seconds": time.perf_counter() - started,
        "environment": environment_record(),
    }
    write_results(result, args.out)
    print((args.out / f"{NAME}.md").read_text())


if __name__ == "__main__":
    main()
