"""Self-ask on SmolLM2-135M-Instruct: direct answering vs few-shot self-ask vs fine-tuned self-ask.

Two evaluation sets, neither ever trained on:

- Compositional Celebrities: ``--n`` questions drawn at random (seed 0) from all its categories;
- 2WikiMultiHopQA questions that have ProbTree trees (``probtree_2wiki``, held out by the self-ask recipe):
  ``--n-2wiki`` drawn at random (seed 0).

Follow-ups are answered by the MiniLM retriever over each set's own gold sub-answers (Compositional Celebrities
``Q1/A1``, ``Q2/A2``; ProbTree leaf answers), so the comparison measures decomposition, not memorised facts; a
follow-up in an operator's template is computed first (``operators+retriever``, `peftprompt.operators`). The
fine-tuned adapter is the one ``make demo`` (``recipes/selfask_sft.py`` with ``recipes/configs/smollm2/
selfask_lora.yaml``) trains; its training sources and command are read from the run's ``results.json``.

``--approaches`` evaluates some approaches only; the others are carried over from the results written before where
they ran on the same questions (the base model's rows do not depend on the adapter), each row naming its CPU,
commit and answerers. Writes ``selfask.{json,md,png}`` to ``--out``:

    .venv/bin/python benchmarks/selfask.py --adapter outputs/demo_selfask/adapter [--n 300] [--n-2wiki 200] \
        [--approaches fine_tuned_self_ask] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Optional

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from transformers.utils import logging as transformers_logging

from _env import environment_record
from peftprompt import load_adapter, load_backbone, merged_for_inference
from peftprompt.recursive import convert, training_trees
from peftprompt.recursive.tree import question_key
from peftprompt.selfask.evaluate import APPROACHES, compare_approaches, sample_trees

NAME = "selfask"
SEED = 0
DATASETS = {  # result key: (source, title)
    "compositional_celebrities": ("compositional_celebrities", "Compositional Celebrities"),
    "2wikimultihopqa": ("probtree_2wiki", "2WikiMultiHopQA (ProbTree trees)"),
}
LABELS = {"direct": "direct (4-shot)", "few_shot_self_ask": "few-shot self-ask (4-shot)",
          "fine_tuned_self_ask": "fine-tuned self-ask (LoRA, 0-shot)"}
ANSWERERS = "operators+retriever"
TARGET = "fine-tuned self-ask EM >= few-shot self-ask EM + 0.20 on Compositional Celebrities, well-formed >= 0.98"


def training_record(adapter_dir: Path) -> dict:
    """What the adapter was trained on and how, from its run's ``results.json`` and ``train_config.yaml`` (next to
    ``adapter/``)."""
    results = adapter_dir.parent / "results.json"
    if not results.is_file():
        return {"adapter": str(adapter_dir), "note": f"no {results} (training record unknown)"}
    run = json.loads(results.read_text())
    keys = ("method", "model", "trainable_params", "trainable_pct", "adapter_bytes", "global_step",
            "train_seconds", "world_size", "mixed_precision", "eval_loss", "selfask_em", "selfask_well_formed",
            "command")
    record = {"adapter": str(adapter_dir), **{k: run[k] for k in keys if k in run}}
    config = adapter_dir.parent / "train_config.yaml"
    if config.is_file():
        data = yaml.safe_load(config.read_text()).get("data", {})
        record.update(datasets=data.get("sources"), held_out=data.get("eval_sources"), mode=data.get("mode"))
    return record


def asked_in_training(trees: list, sources: Optional[list[str]]) -> Optional[int]:
    """How many of `trees`' questions a training tree of `sources` asks (any node, normalised text, the mirrored
    comparisons included); `None` when the adapter's training sources are unknown."""
    if not sources:
        return None
    seen = {question_key(node.question) for tree in training_trees(sources, mirror_comparisons=True)
            for _, node in tree.iter_nodes()}
    return sum(question_key(tree.question) in seen for tree in trees)


def carried_rows(previous: dict, key: str, n: int, args: argparse.Namespace) -> dict[str, dict]:
    """The rows of `previous` (the results written before) for data set `key` that this run does not evaluate,
    where they were measured on the same `n` questions, model and threshold; each says where and how it ran."""
    data = previous.get(key, {})
    if (data.get("n"), previous.get("model"), previous.get("threshold")) != (n, args.model, args.threshold):
        return {}
    environment = previous.get("environment", {})
    where = {"cpu": (environment.get("machine") or {}).get("cpu_model"), "commit": environment.get("git_commit"),
             "answerers": previous.get("answerers", "retriever")}
    return {approach: {**row, "carried": row.get("carried", where)} for approach, row in data.items()
            if approach in APPROACHES and approach not in args.approaches and approach != "fine_tuned_self_ask"}


def write_results(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    training = result["training"]
    lines = ["# Self-ask on SmolLM2-135M-Instruct: direct vs few-shot self-ask vs fine-tuned self-ask", "",
             "Follow-ups answered by the MiniLM retriever over each set's own gold sub-answers (threshold "
             f"{result['threshold']}), a follow-up in an operator's template computed first ({result.get('answerers', 'retriever')}); greedy decoding; questions drawn at random (seed {SEED}). Fine-tuned adapter: "
             f"LoRA trained on {', '.join(training.get('datasets', ['?']))} ({training.get('global_step', '?')} "
             "steps, never on Compositional Celebrities; 2WikiMultiHopQA's training split only, the ProbTree trees "
             "evaluated here are dev questions). Evaluated questions a training tree asks (normalised text): "
             + ", ".join(f"{title} {result[key].get('asked_in_training', 'not checked')} of {result[key]['n']}"
                         for key, (_, title) in DATASETS.items() if key in result) + ".", ""]
    for key, (_, title) in DATASETS.items():
        if key not in result:
            continue
        data = result[key]
        lines += [f"## {title}, {data['n']} questions", "",
                  "| approach | EM | F1 | well-formed | faithful | operator follow-ups computed | follow-ups / question "
                  "| generated tokens / question | compositionality gap (support) | seconds | measured |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for approach in APPROACHES:
            r = data.get(approach)
            if r is None:
                continue
            gap = "-" if r["compositionality_gap"] is None else f"{r['compositionality_gap']:.3f} ({r['gap_support']})"
            faithful = "—" if r.get("faithfulness") is None else f"{r['faithfulness']:.3f}"
            operators = "—" if "operator_follow_ups" not in r else f"{r['operator_parsed']}/{r['operator_follow_ups']}"
            carried = r.get("carried")
            measured = (f"carried: {carried['cpu']}, commit {str(carried['commit'])[:7]}, {carried['answerers']}"
                        if carried else "this run")
            lines.append(f"| {LABELS[approach]} | {r['em']:.3f} | {r['f1']:.3f} | {r['well_formed']:.3f} | "
                         f"{faithful} | {operators} | {r['mean_follow_ups']:.2f} | {r['mean_generated_tokens']:.1f} | "
                         f"{gap} | {r['seconds']:.0f} | {measured} |")
        lines.append("")
    target = result.get("target")
    lines += [f"Target: {TARGET}. " + (f"Measured: EM difference {target['em_gain']:+.3f}, well-formed "
              f"{target['well_formed']:.3f} ({'met' if target['met'] else 'missed'})." if target else
              "Not measured: both self-ask rows are needed."), "",
              f"Machine: {result['environment']['machine'].get('cpu_model')} "
              f"({result['environment']['machine']['cpu_count']} CPUs); commit {result['environment']['git_commit']}; "
              f"command `{result['environment']['command']}`."]
    (out / f"{NAME}.md").write_text("\n".join(lines) + "\n")

    keys = [k for k in DATASETS if k in result]
    figure = Figure(figsize=(8, 4), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    width = 0.8 / len(APPROACHES)
    for i, approach in enumerate(APPROACHES):
        values = [result[k].get(approach, {}).get("em", 0.0) for k in keys]
        bars = ax.bar([x + (i - 1) * width for x in range(len(keys))], values, width, label=LABELS[approach])
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(len(keys)), [f"{DATASETS[k][1]}\n(n={result[k]['n']})" for k in keys])
    ax.set_ylabel("exact match")
    ax.set_title(f"{result['model']} self-ask; follow-ups answered by a retriever over gold sub-answers", fontsize=10)
    ax.legend(fontsize=8)
    figure.savefig(out / f"{NAME}.png", dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", type=Path, default=Path("outputs/demo_selfask/adapter"),
                        help="the fine-tuned self-ask adapter (default: the one `make demo` trains)")
    parser.add_argument("--model", default="smollm2-135m", help="the base causal LM of the adapter")
    parser.add_argument("--n", type=int, default=300, help="Compositional Celebrities questions (default 300)")
    parser.add_argument("--n-2wiki", type=int, default=200, help="2WikiMultiHopQA questions (default 200)")
    parser.add_argument("--threshold", type=float, default=0.8, help="retriever similarity needed to answer")
    parser.add_argument("--approaches", nargs="+", choices=APPROACHES, default=list(APPROACHES),
                        help="approaches to evaluate; the others are carried over from the results written before "
                             "(the base model's rows do not depend on the adapter), each named with where it ran")
    parser.add_argument("--quick", action="store_true", help="20 questions per set")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    if not (args.adapter / "adapter_config.json").is_file():
        parser.error(f"no adapter at {args.adapter}: train one first (`make demo`, or `accelerate launch "
                     "recipes/selfask_sft.py --config recipes/configs/smollm2/selfask_lora.yaml`)")
    started = time.perf_counter()
    sizes = {"compositional_celebrities": 20 if args.quick else args.n,
             "2wikimultihopqa": 20 if args.quick else args.n_2wiki}
    transformers_logging.set_verbosity_error()
    model, tokenizer = load_backbone(args.model, task="causal_lm")
    tuned = merged_for_inference(load_adapter(load_backbone(args.model, task="causal_lm")[0], args.adapter))
    result: dict = {"benchmark": NAME, "model": args.model, "threshold": args.threshold, "seed": SEED,
                    "answerers": ANSWERERS, "training": training_record(args.adapter)}
    previous_file = args.out / f"{NAME}.json"
    previous = json.loads(previous_file.read_text()) if previous_file.is_file() else {}
    for key, (source, title) in DATASETS.items():
        trees = sample_trees(convert(source), sizes[key], seed=SEED)
        print(f"{title}: {len(trees)} questions")
        result[key] = compare_approaches(trees, model.eval(), tokenizer, adapter_model=tuned, approaches=args.approaches,
                                         threshold=args.threshold, progress=True)
        result[key].update(carried_rows(previous, key, len(trees), args))
        result[key]["asked_in_training"] = asked_in_training(trees, result["training"].get("datasets"))
    cc = result["compositional_celebrities"]
    if {"fine_tuned_self_ask", "few_shot_self_ask"} <= set(cc):
        em_gain = cc["fine_tuned_self_ask"]["em"] - cc["few_shot_self_ask"]["em"]
        well_formed = cc["fine_tuned_self_ask"]["well_formed"]
        result["target"] = {"text": TARGET, "em_gain": em_gain, "well_formed": well_formed,
                            "met": em_gain >= 0.20 and well_formed >= 0.98}
    result["wall_seconds"] = time.perf_counter() - started
    result["environment"] = environment_record()
    write_results(result, args.out)
    print((args.out / f"{NAME}.md").read_text())


if __name__ == "__main__":
    main()
