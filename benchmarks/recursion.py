"""What recursion depth buys and costs: self-ask exact match against ``max_depth`` for each training mode.

Three self-ask LoRA adapters are trained on the same trees with the same tokens (``recipes/selfask_sft.py`` with
``recipes/configs/smollm2/selfask_lora.yaml``, ``max_steps`` rows of packed episodes), differing only in
``data.mode``: ``flat`` (one episode per tree, the leaves as follow-ups), ``recursive`` (one episode per inner node,
so a compositional follow-up is taught as a question of its own) and ``mix`` (both). The variant
``recursive+leaves`` also gives every leaf its own ``No.`` episode (``data.leaf_episodes=true``). Each is evaluated with
``max_depth`` 0 (the question answered directly), 1, 2 and 3 on:

- Compositional Celebrities (two-hop, the regression check): ``--n-cc`` questions drawn at random (seed 0);
  follow-ups answered by the MiniLM retriever over the questions' gold sub-answers (``Q1/A1``, ``Q2/A2``).
- The held-out deep questions (`peftprompt.recursive.sources.deep_eval_trees`): 2WikiMultiHopQA dev bridge
  comparisons and inference questions (gold evidence), ProbTree 2WikiMultiHopQA trees nested two levels or more and
  3-/4-hop MuSiQue dev questions, minus any question a training tree asks. Follow-ups are answered by the retriever
  over the LEAF facts only (`knowledge_base(..., leaves_only=True)`, which never holds an operator step's answer):
  a follow-up that is itself compositional finds nothing and the model self-asks it one level deeper (directly at
  ``max_depth``).

Each layer's follow-ups go to ``--answerers`` (default: the shipped config's ``data.eval_answerers``,
``operators+retriever``): a follow-up in an operator's template is computed (`peftprompt.operators`), the others
are retrieved. Per cell the report adds EM by question type, faithfulness (the share of final answers the trace
supports, `evaluate.supported_by_trace`) and operator coverage (operator follow-ups computed, and every one that
was not, with why). The results measured before operators existed (adapters trained without operator steps,
follow-ups to the retriever alone) are kept in ``recursion_no_operators.json`` and shown beside these
(``--baseline``); ``--compare CHANGE WITHOUT WITH`` labels that side-by-side table when the baseline lacks something
else, e.g. the mirrored comparisons (``--train-args data.mirror_comparisons=true --baseline results/recursion.json
--compare "mirrored comparisons" "..." "..."``). The held-out questions never include one a training tree asks,
mirrored comparisons included, so runs with and without them are scored on the same questions.

Runs are reused: a mode trained before with the same config (its ``results.json`` and ``train_config.yaml`` under
``--runs``, `_runs.run_recipe`) is not trained again, an interrupted one continues from its newest checkpoint, and
every evaluated cell is kept under ``--runs/cells`` (``--fresh`` recomputes them). Writes
``recursion.{json,md,png}`` to ``--out``:

    .venv/bin/python benchmarks/recursion.py [--modes flat recursive mix] [--depths 0 1 2 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from transformers.utils import logging as transformers_logging

from _env import environment_record, provenance_line
from _runs import QUICK_TRAINING, finished_run, requested_config, run_recipe
from peftprompt import load_adapter, load_backbone
from peftprompt.atomic import write_file_atomically
from peftprompt.recursive import Node, convert, training_trees
from peftprompt.recursive.operator_steps import COMPARISON_WORDING, mirrored_comparisons
from peftprompt.recursive.sources import DEEP_EVAL_SETS, deep_eval_trees
from peftprompt.selfask import RetrieverAnswerer, SelfAskRunner, answerers_from_names
from peftprompt.selfask.evaluate import evaluate_selfask, knowledge_base, sample_trees
from peftprompt.training import load_config

NAME = "recursion"
SEED = 0
REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "recipes/configs/smollm2/selfask_lora.yaml"
MODES = ("flat", "recursive", "mix")
VARIANTS = {"recursive+leaves": ("recursive", ["data.leaf_episodes=true"]),
            "mix+leaves": ("mix", ["data.leaf_episodes=true"])}
"""Training variants beyond the config's: name -> (data.mode, more overrides)."""
DATASETS = {"compositional_celebrities": "Compositional Celebrities", "deep": "held-out deep questions"}
KNOWLEDGE = {"compositional_celebrities": "retriever over the gold sub-answers (Q1/A1, Q2/A2)",
             "deep": "retriever over the leaf facts only (no inner-node answer)"}
TARGETS = {"deep_em": 0.70, "comparison_em": 0.85, "cc_em": 0.83, "cc_well_formed": 0.99, "faithfulness": 0.95,
           "recursive_gain": 0.05}
BASELINE = Path(__file__).resolve().parent / "results" / "recursion_no_operators.json"
MODEL_FINAL = "_model_final"
"""The file suffix of cells evaluated with the model writing the final answer after an operator step."""
N_WRONG = 4


def train_mode(name: str, run_dir: Path, overrides: list[str]) -> bool:
    """Train the self-ask adapter of mode or variant `name` into `run_dir` with ``accelerate launch`` (2 CPU
    processes, or one GPU), unless it is done (`_runs.run_recipe`); an interrupted run continues from its newest
    checkpoint. Return whether it trained now."""
    mode, extra = VARIANTS.get(name, (name, []))
    overrides = [f"data.mode={mode}", *extra, "data.generate_eval=0", *overrides]
    if finished_run(run_dir, requested_config(CONFIG, overrides, run_dir)) is not None:
        return False
    try:
        run_recipe(CONFIG, overrides, run_dir, recipe="selfask_sft.py", processes=2, resume=True)
    except RuntimeError as err:
        raise SystemExit(f"recursion: {err}") from None
    return True


def per_depth(records: list[dict], depth_of: dict[str, int]) -> dict[str, dict]:
    """Exact match, well-formed rate and count per tree depth (levels of follow-ups below the question)."""
    groups: dict[int, list[dict]] = defaultdict(list)
    for record in records:
        groups[depth_of[record["question"]]].append(record)
    return {str(d): {"n": len(rs), "em": sum(r["em"] for r in rs) / len(rs),
                     "well_formed": sum(r["well_formed"] for r in rs) / len(rs)} for d, rs in sorted(groups.items())}


def question_type(tree: Node) -> str:
    """A held-out question's type for the by-type table: ``<set>/<2WikiMultiHopQA type>``, else
    ``<set>/comparison`` for a question that compares (the converter gave it an operator step or said why not, or
    its wording compares: "..., A or B?", "the same", "both") or ``<set>/chain``."""
    if "type" in tree.meta:
        return f"{tree.dataset}/{tree.meta['type']}"
    compares = "operator" in tree.meta or "operator_skipped" in tree.meta or COMPARISON_WORDING.search(tree.question)
    return f"{tree.dataset}/{'comparison' if compares else 'chain'}"


COMPARISON_TYPES = ("comparison", "bridge_comparison")


def per_type(correct: list[bool], trees: list[Node]) -> dict[str, dict]:
    """Exact match and count per `question_type`, and over every comparison (``all comparisons``)."""
    groups: dict[str, list[bool]] = defaultdict(list)
    for tree, right in zip(trees, correct):
        kind = question_type(tree)
        groups[kind].append(right)
        if kind.endswith(COMPARISON_TYPES):
            groups["all comparisons"].append(right)
    return {kind: {"n": len(rs), "em": sum(rs) / len(rs)} for kind, rs in sorted(groups.items())}


def evaluate_cell(model, tokenizer, trees: list[Node], layers: list, max_depth: int, operator_ends: bool = True) -> dict:
    """Self-ask `trees` at `max_depth` (follow-ups: the answerer of each layer, the model recursing where they find
    nothing; with `operator_ends`, an operator's answer is the final answer)."""
    runner = SelfAskRunner(model, tokenizer, answerer=layers, max_depth=max_depth, batch_size=16,
                           progress=f"max_depth {max_depth}", operator_ends=operator_ends)
    started = time.perf_counter()
    summary = evaluate_selfask(trees, runner, "self_ask", sub_question_check=False, return_records=True)
    seconds = time.perf_counter() - started
    records = summary.pop("records")
    summary.pop("examples")
    summary.update(
        max_depth=max_depth, seconds=seconds, seconds_per_question=seconds / len(trees),
        max_generated_tokens=max(r["generated_tokens"] for r in records),
        per_tree_depth=per_depth(records, {t.question: t.depth() - 1 for t in trees}),
        per_set=per_set(records, trees),
        per_type=per_type([bool(r["em"]) for r in records], trees),
        wrong=[{k: r[k] for k in ("question", "gold", "answer", "issues", "text")}
               for r in records if not r["em"]][:N_WRONG],
        answers=[r["answer"] for r in records],
        correct=[bool(r["em"]) for r in records],
    )
    return summary


def per_set(records: list[dict], trees: list[Node]) -> dict[str, dict]:
    """Exact match and count per source data set (``tree.dataset``)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for tree, record in zip(trees, records):
        groups[tree.dataset].append(record)
    return {name: {"n": len(rs), "em": sum(r["em"] for r in rs) / len(rs)} for name, rs in groups.items()}


def paired_bootstrap(a: list[bool], b: list[bool], samples: int = 2000) -> dict:
    """The exact-match difference ``mean(b) - mean(a)`` on the same questions and its 95 % bootstrap interval."""
    rng = random.Random(SEED)
    n = len(a)
    diffs = []
    for _ in range(samples):
        idx = [rng.randrange(n) for _ in range(n)]
        diffs.append(sum(b[i] - a[i] for i in idx) / n)
    diffs.sort()
    return {"difference": (sum(b) - sum(a)) / n, "ci95": [diffs[int(0.025 * samples)], diffs[int(0.975 * samples)]]}


BASELINE_CHANGE = ("operators", "the adapters trained before operator steps existed, follow-ups to the retriever "
                   "alone", "this run's adapters, trained on the same trees plus their operator steps for the same "
                   "steps")
"""The default ``--compare``: what this run adds, what the baseline is, and what this run is."""


def baseline_cells(path: Path, sets: dict[str, list[Node]], compare: tuple[str, str, str] = BASELINE_CHANGE
                   ) -> Optional[dict]:
    """The cells of `path` (results measured without `compare`'s change, by default without operators) on the same
    questions, each with its EM by `question_type` computed from its per-question ``correct``; `None` without the
    file."""
    if not path.is_file():
        return None
    old = json.loads(path.read_text())
    cells = {}
    for name, cell in old["cells"].items():
        key = name.split("/")[1]
        if cell["n"] == len(sets[key]):
            cells[name] = {k: cell[k] for k in ("em", "f1", "well_formed", "mean_follow_ups", "correct") if k in cell}
            cells[name]["per_type"] = per_type(cell["correct"], sets[key])
    change, without, with_ = compare
    return {"file": path.name, "commit": old["environment"].get("git_commit"),
            "machine": old["environment"].get("machine"), "cells": cells, "change": change, "without": without,
            "with": with_}


def _slim(cell: dict) -> dict:
    return {k: cell[k] for k in ("em", "well_formed", "faithfulness", "operator_parsed", "operator_follow_ups")}


def training_record(run_dir: Path) -> dict:
    run = json.loads((run_dir / "results.json").read_text())
    keys = ("global_step", "train_seconds", "eval_loss", "trainable_params", "adapter_bytes", "world_size",
            "mixed_precision", "command")
    return {k: run[k] for k in keys if k in run}


def _cell_row(mode: str, depth: int, c: dict, deep: bool) -> str:
    row = (f"| {mode} | {depth} | {c['em']:.3f} | {c['f1']:.3f} | {c['well_formed']:.3f} | "
           f"{c['faithfulness']:.3f} | {c['operator_parsed']} / {c['operator_follow_ups']} | "
           f"{c['mean_follow_ups']:.2f} | {c['mean_generated_tokens']:.1f} ({c['max_generated_tokens']}) "
           f"| {c['seconds_per_question']:.2f} |")
    if deep:
        row += " " + ", ".join(f"{d}: {v['em']:.2f} ({v['n']})" for d, v in c["per_tree_depth"].items()) + " |"
    return row


def _interval(then: dict, now: dict) -> str:
    """`paired_bootstrap`'s interval of ``now - then`` on the same questions, or nothing without both records."""
    if "correct" not in then or "correct" not in now:
        return ""
    low, high = paired_bootstrap(then["correct"], now["correct"])["ci95"]
    return f" ({low:+.3f} .. {high:+.3f})"


def _side_by_side(result: dict) -> list[str]:
    """The with / without operators table: every mode and depth measured both ways."""
    cells, old = result["cells"], (result.get("baseline") or {}).get("cells", {})
    pairs = sorted({tuple(k.split("/")[::2]) for k in cells if k in old and "/deep/" in k}, key=lambda p: (p[0], int(p[1])))
    if not pairs:
        return []
    base = result["baseline"]
    change, without, with_ = (base.get(k, v) for k, v in zip(("change", "without", "with"), BASELINE_CHANGE))
    lines = [f"## With and without {change}", "",
             f"Without: {without} (`{base['file']}`, commit {base['commit']}, {base['machine'].get('cpu_model')}). "
             f"With: {with_}, follow-ups to `{' / '.join(result['answerers'])}`. Same questions, same knowledge; in "
             "brackets, the paired bootstrap 95 % interval of the difference.", "",
             "| mode | max_depth | deep EM without → with | comparisons EM without → with | Compositional Celebrities "
             "EM without → with | faithfulness with |",
             "|---|---:|---|---|---|---:|"]
    for mode, depth in pairs:
        now, then = cells[f"{mode}/deep/{depth}"], old[f"{mode}/deep/{depth}"]
        comp_now, comp_then = (c["per_type"].get("all comparisons", {}).get("em") for c in (now, then))
        cc_now, cc_then = cells.get(f"{mode}/compositional_celebrities/{depth}"), old.get(
            f"{mode}/compositional_celebrities/{depth}")
        cc = f"{cc_then['em']:.3f} → {cc_now['em']:.3f}{_interval(cc_then, cc_now)}" if cc_now and cc_then else "—"
        lines.append(f"| {mode} | {depth} | {then['em']:.3f} → {now['em']:.3f}{_interval(then, now)} | "
                     f"{comp_then:.3f} → {comp_now:.3f} | {cc} | {now['faithfulness']:.3f} |")
    lines += ["", "EM by question type (held-out deep questions):", ""]
    kinds = sorted({k for mode, depth in pairs for k in cells[f"{mode}/deep/{depth}"]["per_type"]})
    lines += ["| type | n | " + " | ".join(f"{m} d{d} without → with" for m, d in pairs) + " |",
              "|---|---:|" + "---|" * len(pairs)]
    for kind in kinds:
        n = cells[f"{pairs[0][0]}/deep/{pairs[0][1]}"]["per_type"].get(kind, {}).get("n", 0)
        row = [f"{old[f'{m}/deep/{d}']['per_type'][kind]['em']:.3f} → {cells[f'{m}/deep/{d}']['per_type'][kind]['em']:.3f}"
               if kind in cells[f"{m}/deep/{d}"]["per_type"] else "—" for m, d in pairs]
        lines.append(f"| {kind} | {n} | " + " | ".join(row) + " |")
    return lines + [""]


def _coverage(result: dict) -> list[str]:
    """Operator coverage per cell, and every operator follow-up that was not computed."""
    lines = ["## Operator coverage", "",
             "Follow-ups the model wrote in an operator's template, and those the operator computed; the others went "
             "on to the next answerer (the model, one layer deeper) and are listed with why.", ""]
    for name, c in sorted(result["cells"].items()):
        if not c.get("operator_follow_ups"):
            continue
        lines.append(f"- {name}: {c['operator_parsed']} of {c['operator_follow_ups']} computed")
        seen = set()
        for u in c["operator_unparsed"]:
            if u["question"] not in seen:
                seen.add(u["question"])
                lines.append(f"  - `{u['question']}`: {u['failure']}")
    return lines + [""]


def write_results(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2, ensure_ascii=False) + "\n"
    write_file_atomically(out / f"{NAME}.json", lambda f: f.write(text))
    cells, depths, modes = result["cells"], result["depths"], result["modes"]
    lines = ["# Recursion depth on SmolLM2-135M-Instruct + LoRA, with operators: exact match against max_depth, "
             "per training mode", "",
             f"Each mode trained on the same {result['training_trees']} trees ({', '.join(result['sources'])}), "
             "comparison trees ending with their operator step"
             + (f" ({result['mirrored']} of them date comparisons asked the other way round, "
                "`data.mirror_comparisons`)" if result.get("mirrored") else "") + ", "
             f"for the same {result['training_steps']} steps of packed 512-token rows; greedy decoding. max_depth 0 "
             "answers the question directly; at max_depth d a follow-up the answerers cannot answer is self-asked "
             f"by the model one layer deeper, directly at layer d. Answerers of every layer: "
             f"`{' / '.join(result['answerers'])}` (a follow-up in an operator's template is computed, the others "
             "go to the retriever). "
             + ("An operator step ends the question, its answer the final answer (the runner's operator_ends). "
                if result["operator_ends"] else "After an operator step the model writes the final answer. ")
             + "Faithful: the share of final answers the trace supports (the last operator "
             "answer, or an intermediate answer the final answer repeats).", ""]
    for key, title in DATASETS.items():
        n = result["n"][key]
        lines += [f"## {title} (n={n}; follow-ups: {KNOWLEDGE[key]})", ""]
        if key == "deep":
            held = result["held_out"]
            lines += ["Held out: " + ", ".join(f"{held['kept'][s]} {DEEP_EVAL_SETS[s]}" for s in held["kept"])
                      + f". Dropped because a training tree asks them: {sum(held['dropped_as_training'].values())} "
                      f"({held['dropped_as_training']}); repeats across the sets: "
                      f"{sum(held['dropped_as_repeat'].values())}.", ""]
        lines += ["| mode | max_depth | EM | F1 | well-formed | faithful | operator follow-ups computed | follow-ups / q "
                  "| generated tokens / q (max) | s / q |" + (" EM by tree depth (n) |" if key == "deep" else ""),
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---|" if key == "deep" else "")]
        for mode in modes:
            for depth in depths:
                c = cells.get(f"{mode}/{key}/{depth}")
                if c is not None:
                    lines.append(_cell_row(mode, depth, c, key == "deep"))
        lines.append("")
    lines += _side_by_side(result)
    summary = result["summary"]
    lines += ["## Findings", ""]
    for line in summary["lines"]:
        lines.append(f"- {line}")
    lines += [""] + _coverage(result)
    lines += ["## What each mode gets wrong (held-out deep questions, best max_depth)", ""]
    for mode, wrong in summary["wrong"].items():
        lines.append(f"### {mode}")
        for w in wrong:
            lines.append(f"- {w['question']} gold {w['gold'][0]!r}, answered {w['answer']!r}"
                         + (f" ({', '.join(w['issues'])})" if w["issues"] else ""))
            lines.append("  ```\n  " + w["text"].replace("\n", "\n  ") + "\n  ```")
        lines.append("")
    lines += [provenance_line(result["environment"])]
    (out / f"{NAME}.md").write_text("\n".join(lines) + "\n")

    figure = Figure(figsize=(14, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    old = (result.get("baseline") or {}).get("cells", {})
    change = (result.get("baseline") or {}).get("change", BASELINE_CHANGE[0])
    shipped = result["summary"].get("shipped")
    if shipped:  # EM by question type, with and without operators, in the shipped configuration
        ax = figure.add_subplot(1, 3, 3)
        name = f"{shipped['mode']}/deep/{shipped['max_depth']}"
        kinds = list(cells[name]["per_type"])
        for j, (label, cell) in enumerate(((f"without {change}", old.get(name)), (change, cells[name]))):
            if cell is not None:
                ax.barh([k + j * 0.4 for k in range(len(kinds))], [cell["per_type"][k]["em"] for k in kinds],
                        height=0.4, label=label, color="C7" if j == 0 else "C0")
        ax.set_yticks([k + 0.2 for k in range(len(kinds))],
                      [f"{k} ({cells[name]['per_type'][k]['n']})" for k in kinds], fontsize=7)
        ax.set_xlim(0, 1)
        ax.set_xlabel("exact match")
        ax.set_title(f"deep questions by type ({shipped['mode']}, max_depth {shipped['max_depth']})", fontsize=10)
        ax.grid(alpha=0.3, axis="x")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    for i, (key, title) in enumerate(DATASETS.items()):
        ax = figure.add_subplot(1, 3, i + 1)
        for j, mode in enumerate(modes):
            colour = f"C{j}"
            points = [(d, cells[f"{mode}/{key}/{d}"]["em"]) for d in depths if f"{mode}/{key}/{d}" in cells]
            if points:
                ax.plot(*zip(*points), marker="o", color=colour, label=f"{mode}, {change}")
            before = [(d, old[f"{mode}/{key}/{d}"]["em"]) for d in depths if f"{mode}/{key}/{d}" in old]
            if before:
                ax.plot(*zip(*before), marker="x", linestyle="--", color=colour, alpha=0.6,
                        label=f"{mode}, without {change}")
        ax.set_xticks(depths)
        ax.set_xlabel("max_depth (0 = direct answer)")
        ax.set_ylabel("exact match")
        ax.set_ylim(0, 1)
        ax.set_title(f"{title} (n={result['n'][key]})", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figure.suptitle(f"SmolLM2-135M self-ask LoRA: exact match against recursion depth, with and without {change}",
                    fontsize=11)
    figure.savefig(out / f"{NAME}.png", dpi=120)


def summarise(result: dict, shipped_mode: str, shipped_depth: int) -> dict:
    """The findings: the shipped mode at the shipped `max_depth` against `TARGETS`, recursive against flat at each
    one's best depth, and the wrong answers of each mode at its best depth."""
    cells, depths, modes = result["cells"], result["depths"], result["modes"]
    best = {m: max((d for d in depths if f"{m}/deep/{d}" in cells), key=lambda d: cells[f"{m}/deep/{d}"]["em"])
            for m in modes if any(f"{m}/deep/{d}" in cells for d in depths)}
    lines = []
    for mode, depth in best.items():
        deep, cc = cells[f"{mode}/deep/{depth}"], cells.get(f"{mode}/compositional_celebrities/{depth}")
        lines.append(f"{mode}: best deep EM {deep['em']:.3f} at max_depth {depth}"
                     + (f"; Compositional Celebrities EM {cc['em']:.3f}, well-formed {cc['well_formed']:.3f}"
                        if cc else ""))
    for mode in modes:
        evaluated = [(d, cells[f"{mode}/compositional_celebrities/{d}"]) for d in depths
                     if f"{mode}/compositional_celebrities/{d}" in cells]
        if mode not in best and evaluated:
            depth, cc = max(evaluated, key=lambda pair: pair[1]["em"])
            lines.append(f"{mode} (Compositional Celebrities only): best EM {cc['em']:.3f} at max_depth {depth}, "
                         f"{cc['mean_follow_ups']:.2f} follow-ups / question")
    out = {"best_depth": best, "lines": lines, "wrong": {}}
    if "flat" in best and "recursive" in best:
        flat = cells[f"flat/deep/{best['flat']}"]["correct"]
        rec = cells[f"recursive/deep/{best['recursive']}"]["correct"]
        test = paired_bootstrap(flat, rec)
        out["recursive_vs_flat"] = test
        verdict = "holds" if test["difference"] >= TARGETS["recursive_gain"] else "does not hold"
        lines.append(f"Hypothesis 'recursive beats flat by >= 5 points on the deep questions' {verdict}: "
                     f"{test['difference']:+.3f} (95 % paired bootstrap interval {test['ci95'][0]:+.3f} .. "
                     f"{test['ci95'][1]:+.3f}), each at its best max_depth.")
    if f"{shipped_mode}/deep/{shipped_depth}" in cells:
        depth = shipped_depth
        deep, cc = cells[f"{shipped_mode}/deep/{depth}"], cells.get(f"{shipped_mode}/compositional_celebrities/{depth}")
        targets = {"deep_em": deep["em"], "comparison_em": deep["per_type"].get("all comparisons", {}).get("em"),
                   "faithfulness": deep["faithfulness"], "cc_em": cc["em"] if cc else None,
                   "cc_well_formed": cc["well_formed"] if cc else None}
        met = {k: v is not None and v >= TARGETS[k] for k, v in targets.items()}
        out["shipped"] = {"mode": shipped_mode, "max_depth": depth, **targets, "met": met}
        lines.append(f"Shipped configuration ({shipped_mode}, max_depth {depth}, answerers "
                     f"{' / '.join(result['answerers'])}): " + "; ".join(
                         f"{name} {value:.3f} (>= {TARGETS[name]}: {'met' if met[name] else 'missed'})"
                         for name, value in targets.items() if value is not None))
    for name, cell in cells.items():
        if cell.get("reused_from"):
            lines.append(f"{name} is the cell of {cell['reused_from']}.")
    for key, cell in result.get("model_final_answer", {}).items():
        lines.append(f"{DATASETS[key]}, {shipped_mode} at max_depth {shipped_depth} with the model writing the final "
                     f"answer after an operator step (operator_ends off): EM {cell['em']:.3f}, faithfulness "
                     f"{cell['faithfulness']:.3f}, well-formed {cell['well_formed']:.3f}.")
    worst = max(c["max_generated_tokens"] for c in cells.values())
    lines.append(f"Token budget: the most tokens any question generated, over every cell, is {worst} "
                 "(max_total_tokens 384 per self-ask run; deeper runs have their own).")
    for mode, depth in best.items():
        out["wrong"][mode] = cells[f"{mode}/deep/{depth}"]["wrong"]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=[*MODES, *VARIANTS],
                        help="training modes and variants to compare (default: flat recursive mix)")
    parser.add_argument("--depths", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--n-cc", type=int, default=300, help="Compositional Celebrities questions (default 300)")
    parser.add_argument("--n-deep", type=int, default=200, help="held-out deep questions drawn at random (seed 0; "
                        "default 200 of the 266)")
    parser.add_argument("--runs", type=Path, default=REPO / "outputs/recursion", help="trained runs and cells")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threshold", type=float, default=0.8, help="retriever similarity needed to answer")
    parser.add_argument("--answerers", nargs="+", default=None, metavar="NAME",
                        help="who answers each layer's follow-ups (default: the config's data.eval_answerers)")
    parser.add_argument("--model-final-answer", action="store_true",
                        help="the model writes the final answer after an operator step (the runner's operator_ends "
                             "off); its cells are kept apart and reported beside the shipped runner's")
    parser.add_argument("--baseline", type=Path, default=BASELINE,
                        help="results measured without operators, shown beside these (default %(default)s)")
    parser.add_argument("--compare", nargs=3, default=list(BASELINE_CHANGE), metavar=("CHANGE", "WITHOUT", "WITH"),
                        help="what the baseline lacks and this run adds (a few words), what the baseline is and what "
                             "this run is (a phrase each; default: operators)")
    parser.add_argument("--shipped", default=None, choices=MODES,
                        help="the mode the shipped config trains (default: its data.mode)")
    parser.add_argument("--fresh", action="store_true", help="recompute the evaluated cells")
    parser.add_argument("--sets", nargs="+", default=list(DATASETS), choices=list(DATASETS),
                        help="evaluate these sets (default both; the others' cells evaluated before are reported)")
    parser.add_argument("--cached-only", action="store_true",
                        help="train and evaluate nothing: write the results of the cells evaluated before")
    parser.add_argument("--quick", action="store_true", help="5 training steps, 8 questions per set, depths 0 and 2")
    parser.add_argument("--train-args", nargs="*", default=[], metavar="key=value", help="training overrides")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    overrides = list(args.train_args)
    if args.quick:  # its own runs, so the full benchmark's trained adapters and cells stay untouched
        args.n_cc, args.n_deep, args.depths, args.runs = 8, 8, [0, 2], args.runs / "quick"
        overrides += QUICK_TRAINING
    import yaml

    config = yaml.safe_load(CONFIG.read_text())
    sources = config["data"]["sources"]
    shipped = args.shipped or config["data"].get("mode", "flat")
    shipped_depth = config["data"].get("eval_max_depth", 2)  # the depth the shipped runner self-asks to
    answerers = args.answerers or config["data"].get("eval_answerers", ["retriever"])
    trained = training_trees(sources, load_config(CONFIG, overrides).data.mirror_comparisons)
    # held out: no question of the trees, nor of their mirrored comparisons, whether or not this run trains on them
    mirrored = [] if any("mirrored_from" in tree.meta for tree in trained) else mirrored_comparisons(trained)
    deep, held_out = deep_eval_trees(trained + mirrored)
    deep = sample_trees(deep, args.n_deep, seed=SEED)
    cc = sample_trees(convert("compositional_celebrities"), args.n_cc, seed=SEED)
    print(f"held-out deep questions: {len(deep)} {held_out}; Compositional Celebrities: {len(cc)}")

    transformers_logging.set_verbosity_error()
    trained_now, evaluated_now = set(), set()
    for mode in args.modes:
        if not args.cached_only and train_mode(mode, (args.runs / mode).resolve(), overrides):
            trained_now.add(mode)

    sets = {"compositional_celebrities": cc, "deep": deep}
    retrievers = {"compositional_celebrities": RetrieverAnswerer(knowledge_base(cc), threshold=args.threshold),
                  "deep": RetrieverAnswerer(knowledge_base(deep, leaves_only=True), threshold=args.threshold)}
    layers = {key: answerers_from_names(answerers, retriever=retriever) for key, retriever in retrievers.items()}
    cells: dict[str, dict] = {}
    cell_dir = args.runs / "cells"
    cell_dir.mkdir(parents=True, exist_ok=True)
    for mode in args.modes:
        model: Optional[object] = None
        for key, trees in sets.items():
            for depth in args.depths:
                path = cell_dir / f"{mode}_{key}_{depth}{MODEL_FINAL if args.model_final_answer else ''}.json"
                cached = json.loads(path.read_text()) if path.is_file() and not args.fresh else None
                if cached is not None and cached["n"] == len(trees) and cached.get("answerers") == answerers and (
                        cached.get("operator_ends", True) != args.model_final_answer):
                    cached["per_type"] = per_type(cached["correct"], trees)  # by today's question types
                    cells[f"{mode}/{key}/{depth}"] = cached
                    continue
                if args.cached_only or key not in args.sets:
                    continue
                if model is None:
                    base, tokenizer = load_backbone(args.model, task="causal_lm")
                    model = load_adapter(base, args.runs / mode / "adapter").eval()
                print(f"{mode} / {DATASETS[key]} / max_depth {depth}", flush=True)
                cell = evaluate_cell(model, tokenizer, trees, layers[key], depth, not args.model_final_answer)
                cell.update(answerers=answerers, operator_ends=not args.model_final_answer)
                text = json.dumps(cell, ensure_ascii=False)
                write_file_atomically(path, lambda f: f.write(text))
                cells[f"{mode}/{key}/{depth}"] = cell
                evaluated_now.add(f"{mode}/{key}/{depth}")

    result = {
        "benchmark": NAME, "model": args.model, "threshold": args.threshold, "seed": SEED, "modes": args.modes,
        "depths": args.depths, "sources": sources, "training_trees": len(trained),
        "mirrored": sum("mirrored_from" in tree.meta for tree in trained),
        "training_steps": training_record(args.runs / args.modes[0]).get("global_step"),
        "training": {mode: training_record(args.runs / mode) for mode in args.modes
                     if (args.runs / mode / "results.json").is_file()},
        "n": {key: len(trees) for key, trees in sets.items()}, "held_out": held_out,
        "knowledge": KNOWLEDGE, "answerers": answerers, "targets": TARGETS, "cells": cells,
        "baseline": baseline_cells(args.baseline, sets, tuple(args.compare)),
        "operator_ends": not args.model_final_answer,
        "model_final_answer": {key: _slim(json.loads(p.read_text())) for key in sets
                               if (p := cell_dir / f"{shipped}_{key}_{shipped_depth}{MODEL_FINAL}.json").is_file()},
    }
    result["summary"] = summarise(result, shipped, shipped_depth)
    # run_all's estimate: the whole benchmark, trainings and reused cells counted at the time they took
    reused = sum(cell["seconds"] for key, cell in cells.items() if key not in evaluated_now)
    trained_before = sum(r.get("train_seconds", 0) for mode, r in result["training"].items() if mode not in trained_now)
    result["wall_seconds"] = time.perf_counter() - started + reused + trained_before
    result["environment"] = environment_record()
    write_results(result, args.out)
    print((args.out / f"{NAME}.md").read_text())


if __name__ == "__main__":
    main()
