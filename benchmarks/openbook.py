"""Open-book multi-hop QA: self-ask with retrieval per follow-up against single-step retrieval and closed-book
answers, on SmolLM2-135M.

Data (`peftprompt.retrieval.passages`): HotpotQA distractor ``test``, 2WikiMultiHopQA ``dev`` and MuSiQue ``dev``,
minus every question that a training tree of the adapters asks (any node, normalised text; counts reported).
Each data set's paragraphs, all questions pooled, make one passage index (BM25 + MiniLM, reciprocal rank fusion;
built once under ``--runs/index``). Every follow-up is answered from RETRIEVED paragraphs: never from gold
sub-answers or a question's own paragraphs.

Systems (run by `peftprompt.selfask.open_book.run_open_book`, scored by its `summarise_open_book` and `per_kind`,
as ``peftprompt eval selfask --index`` runs and scores them):

- ``closed_book``: the base model answers directly (4-shot, `FEW_SHOT_DIRECT`); no retrieval.
- ``single_step``: the top ``k`` passages of the whole question, read by the fine-tuned reader.
- ``few_shot_self_ask``: the base model self-asks (4-shot, `FEW_SHOT_SELF_ASK`); each follow-up's top ``k``
  passages are read by the base model (2-shot reader prompt, `few_shot_reader`).
- ``fine_tuned_self_ask``: the fine-tuned decomposer self-asks (0-shot); a follow-up in an operator's template is
  computed (`peftprompt.operators`: which date is later, whether two values are the same, ...), each other
  follow-up's top ``k`` passages are read by the fine-tuned reader; ``max_depth`` 1 (a follow-up the reader cannot
  answer stays ``unknown``).
- ``fine_tuned_recursive``: the same with ``max_depth`` 2: a follow-up the reader cannot answer is self-asked one
  layer deeper, its own follow-ups retrieved and read again (answered directly at the depth limit).

The fine-tuned systems run with each adapter variant (``--variants``): ``one`` (decomposer and reader episodes in
one LoRA, ``recipes/configs/smollm2/selfask_openbook_lora.yaml``) and ``two`` (the shipped self-ask LoRA,
``selfask_lora.yaml``, as adapter ``decomposer`` and ``reader_lora.yaml`` as adapter ``reader`` on one backbone).

Metrics per system and data set, and per question type (HotpotQA bridge / comparison; 2WikiMultiHopQA
compositional / comparison / bridge_comparison / inference; MuSiQue 2- / 3- / 4-hop): exact match and token F1
(best over the answer and its aliases), supporting-paragraph recall (the share of a question's supporting
paragraphs among all passages its run retrieved), follow-ups and seconds per question.

Runs are reused: the trained adapters (`_runs.run_recipe`, an interrupted training continues from its newest
checkpoint), the indexes, and every evaluated cell (system x variant x data set, under ``--runs/cells``), so the
benchmark can span several sessions; results written before every cell is done say so (``partial``). A cell is
reused only with the same questions, ``k``, weight dtype and answerers (cells of the fine-tuned systems written
before operators existed answered every follow-up by retrieval, so they are evaluated again). The cells of the
results file written before (``--out``) are carried over where their files are gone (another machine, a fresh
clone) and this run does not evaluate them: the table names each row's weight dtype and CPU. The results measured
before operators existed are kept in ``openbook_no_operators.json`` and shown beside these (``--baseline``). Writes
``openbook.{json,md,png}`` to ``--out`` (``openbook_n{N}.*``, with cells of their own, for ``--n N`` questions
drawn per data set):

    .venv/bin/python benchmarks/openbook.py [--n 0] [--systems ...] [--variants one two] [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any, Optional

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from transformers.utils import logging as transformers_logging

from _env import environment_record, provenance_line
from _runs import QUICK_TRAINING, run_recipe
from peftprompt import load_adapter, load_backbone
from peftprompt.atomic import write_file_atomically
from peftprompt.recursive import training_trees
from peftprompt.recursive.tree import question_key
from peftprompt.retrieval.index import PassageIndex
from peftprompt.retrieval.embed import native_bf16
from peftprompt.retrieval.passages import pooled_passages, read_questions
from peftprompt.retrieval.recall import recall_at_k
from peftprompt.selfask.answerers import UNKNOWN
from peftprompt.selfask.open_book import SYSTEM_ANSWERERS, per_kind, run_open_book, summarise_open_book
from peftprompt.training import load_config

NAME = "openbook"
SEED = 0
REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "recipes/configs/smollm2"
DATASETS = {  # key: (source, split, title)
    "hotpotqa": ("hotpotqa_distractor", "test", "HotpotQA (distractor test)"),
    "2wikimultihopqa": ("2wikimultihopqa_context", "dev", "2WikiMultiHopQA (dev)"),
    "musique": ("musique_context", "dev", "MuSiQue-Ans (dev)"),
}
SYSTEMS = ("closed_book", "single_step", "few_shot_self_ask", "fine_tuned_self_ask", "fine_tuned_recursive")
FINE_TUNED = ("single_step", "fine_tuned_self_ask", "fine_tuned_recursive", "fine_tuned_fallback")
DERIVED = {"fine_tuned_fallback": ("fine_tuned_self_ask", "single_step")}
"""Rows computed from two evaluated cells: the first system's answer, or the second's where the first ends
``unknown`` (the same model, reader and index answer the same question the same way, so nothing runs again)."""
ROWS = (*SYSTEMS, *DERIVED)
LABELS = {
    "closed_book": "closed-book, direct (base, 4-shot)",
    "single_step": "single-step retrieval + reader",
    "few_shot_self_ask": "few-shot self-ask + retrieval (base, 4-shot)",
    "fine_tuned_self_ask": "fine-tuned self-ask + retrieval",
    "fine_tuned_recursive": "fine-tuned recursive self-ask + retrieval",
    "fine_tuned_fallback": "fine-tuned self-ask, single-step where it ends unknown (derived)",
}
VARIANTS = ("one", "two")
TRAININGS = {  # run name: (config, overrides)
    "openbook": ("selfask_openbook_lora.yaml", ["data.generate_eval=0"]),
    "decomposer": ("selfask_lora.yaml", ["data.mode=flat", "data.generate_eval=0"]),  # = recursion.py's flat run
    "reader": ("reader_lora.yaml", ["data.generate_eval=0"]),
}
KNOWLEDGE = "retrieved paragraphs (top k of the data set's pooled index); never gold sub-answers"
RECALL_KS = (2, 5, 10)
TARGETS = {"self_ask_over_single_step_em": 0.10, "2wikimultihopqa_em": 0.45, "hotpotqa_comparison_em": 0.45,
           "faithfulness": 0.95}
BASELINE = Path(__file__).resolve().parent / "results" / f"{NAME}_no_operators.json"


def train(run: str, run_dir: Path, overrides: list[str]) -> Path:
    """Train (or reuse) run `run` of `TRAININGS` in `run_dir`; returns it."""
    config, extra = TRAININGS[run]
    run_dir = run_dir.resolve()
    try:  # a finished run of the same config is reused, an interrupted one resumed
        run_recipe(CONFIGS / config, [*extra, *overrides], run_dir, recipe="selfask_sft.py", processes=2, resume=True)
    except RuntimeError as err:
        raise SystemExit(f"openbook: {err}") from None
    return run_dir


def training_questions() -> set[str]:
    """Normalised text of every question (any node) of the training trees of every run in `TRAININGS`, and of the
    questions their reader episodes come from (training splits): the same set whichever variants run."""
    keys: set[str] = set()
    for config, overrides in TRAININGS.values():
        data = load_config(CONFIGS / config, overrides).data
        keys |= {question_key(node.question) for tree in training_trees(data.sources, data.mirror_comparisons)
                 for _, node in tree.iter_nodes()}
        for source in data.reader_sources:
            keys |= {question_key(q.question) for q in read_questions(source, "train")}
    return keys


def load_index(source: str, split: str, runs: Path, encoder: str) -> tuple[PassageIndex, dict]:
    """The passage index of every paragraph of every question of `source`'s `split` (built once under
    ``runs/index``), and its recall@k of supporting paragraphs for whole questions and gold hops, per ranking."""
    directory = runs / "index" / f"{source}_{split}"
    report_file = directory.parent / f"{source}_{split}.recall.json"
    if (directory / "manifest.json").is_file() and report_file.is_file():
        return PassageIndex.load(directory), json.loads(report_file.read_text())
    questions = read_questions(source, split)
    index = PassageIndex.build(pooled_passages(questions), encoder=encoder)
    index.save(directory)
    info = {"passages": len(index), "build_seconds": index.settings["build_seconds"],
            "recall": {mode: recall_at_k(index, questions, ks=RECALL_KS, mode=mode).as_dict()
                       for mode in ("bm25", "dense", "hybrid")}}
    info = json.loads(json.dumps(info))  # the same keys (k as text) whether built now or read back
    write_file_atomically(report_file, lambda f: json.dump(info, f))
    return index, info


def index_speed(runs: Path, encoder: str, queries: int = 200) -> dict:
    """Build, load and query times of one index over every paragraph of the three evaluation splits pooled (over
    5,000 passages), measured once and kept in ``runs/index/speed.json``: build seconds (embedding and BM25), save,
    `PassageIndex.load` (the encoder loads apart, at the first query: timed separately), and hybrid search latency
    one query at a time over `queries` questions."""
    path = runs / "index" / "speed.json"
    if path.is_file():
        return json.loads(path.read_text())
    questions = [q for source, split, _ in DATASETS.values() for q in read_questions(source, split)]
    passages = pooled_passages(questions)
    began = time.perf_counter()
    index = PassageIndex.build(passages, encoder=encoder)
    built = time.perf_counter() - began
    directory = runs / "index" / "speed_index"
    index.save(directory)
    began = time.perf_counter()
    loaded = PassageIndex.load(directory)
    load_seconds = time.perf_counter() - began
    began = time.perf_counter()
    loaded.search("warm up: loads the encoder", k=3)
    encoder_seconds = time.perf_counter() - began
    latencies = []
    for question in random.Random(SEED).sample(questions, queries):
        began = time.perf_counter()
        loaded.search(question.question, k=3)
        latencies.append(1000 * (time.perf_counter() - began))
    latencies.sort()
    info = {"passages": len(passages), "build_seconds": built, "load_seconds": load_seconds,
            "encoder_load_seconds": encoder_seconds, "queries": queries,
            "query_ms": {"mean": sum(latencies) / queries, "p50": latencies[queries // 2],
                         "p95": latencies[int(0.95 * queries)]},
            "targets": {"build_seconds": 60, "load_seconds": 1, "query_ms": 20}}
    write_file_atomically(path, lambda f: json.dump(info, f))
    return info


def derived_cell(first: dict, second: dict) -> dict:
    """`DERIVED`: `first`'s records, with `second`'s answer (and its passages) where `first` answered ``unknown``;
    seconds: `first`'s plus `second`'s per question for each fallback."""
    records = []
    for a, b in zip(first["records"], second["records"]):
        fallback = a["answer"].strip().lower() in ("", UNKNOWN)
        records.append({**a, **{k: b[k] for k in ("answer", "em", "f1")}, "fallback": True,
                        "support_recall": max(x for x in (a["support_recall"], b["support_recall"], 0) if x is not None)}
                       if fallback else {**a, "fallback": False})
    falls = sum(r["fallback"] for r in records)
    seconds = first["seconds"] + second["seconds"] * falls / len(records)
    return {"ids": first["ids"], "k": first["k"], "dtype": first.get("dtype"), "answerers": first.get("answerers"),
            "cpu": first.get("cpu"), "seconds": seconds,
            "fallbacks": falls, "summary": summarise_open_book(records), "per_kind": per_kind(records),
            "records": records}


def cell_key(system: str, variant: Optional[str], dataset: str) -> str:
    return f"{system}/{variant}/{dataset}" if variant else f"{system}/{dataset}"


def cell_settings(cell: dict, system: str) -> tuple:
    """What a cell's numbers depend on besides the adapters: its questions, ``k``, weight dtype and answerers (who
    answers each system's follow-ups, `SYSTEM_ANSWERERS`; a cell written before operators existed lacks them and
    answered every follow-up by retrieval)."""
    answerers = cell.get("answerers", "retrieval" if system in SYSTEM_ANSWERERS else None)
    return cell["ids"], cell["k"], cell.get("dtype"), answerers


def baseline_cells(path: Path) -> Optional[dict]:
    """The fine-tuned self-ask cells of the results measured before operators existed (`path`, ``--baseline``), with
    that file's name; `None` where it is absent."""
    if not path.is_file():
        return None
    before = json.loads(path.read_text())
    return {"file": path.name, "cells": {key: cell for key, cell in before["cells"].items()
                                         if key.split("/")[0] in SYSTEM_ANSWERERS
                                         and key.split("/")[0] != "few_shot_self_ask"}}


def reusable(cell: Optional[dict], system: str, wanted: tuple, any_dtype: bool) -> bool:
    """Whether `cell` (a cell file, or a cell of the results written before) holds `system`'s numbers for the
    `wanted` settings (`cell_settings`); with `any_dtype`, whichever weight dtype it was measured in."""
    if cell is None:
        return False
    ids, k, dtype, answerers = cell_settings(cell, system)
    return (ids, k, answerers) == (wanted[0], wanted[1], wanted[3]) and (any_dtype or dtype == wanted[2])


def resolve_dtype(requested: str) -> str:
    """``auto``: bfloat16 on a CUDA GPU that has it or a CPU with native bf16 (AMX, AVX512-BF16), where reading
    passages is about 2x faster; float32 elsewhere (a CPU without them emulates bf16 matmuls, ~100x slower)."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if native_bf16() else "float32"


def summarise_targets(cells: dict) -> Optional[dict]:
    """The shipped variant (the one whose fine-tuned self-ask has the higher mean exact match over the data sets
    evaluated) and its targets: exact match minus the best single-step system's per data set, exact match on
    2WikiMultiHopQA and on HotpotQA's comparison questions, and faithfulness per data set. `None` until a fine-tuned
    self-ask cell exists."""
    means = {}
    for variant in VARIANTS:
        ems = [cells[cell_key("fine_tuned_self_ask", variant, d)]["summary"]["em"] for d in DATASETS
               if cell_key("fine_tuned_self_ask", variant, d) in cells]
        if ems:
            means[variant] = sum(ems) / len(ems)
    if not means:
        return None
    shipped = max(means, key=means.get)
    ours = {d: cells[cell_key("fine_tuned_self_ask", shipped, d)] for d in DATASETS
            if cell_key("fine_tuned_self_ask", shipped, d) in cells}
    gains = {}
    for d, cell in ours.items():
        single = [cells[cell_key("single_step", v, d)]["summary"]["em"] for v in VARIANTS
                  if cell_key("single_step", v, d) in cells]
        if single:
            gains[d] = cell["summary"]["em"] - max(single)
    twowiki = ours.get("2wikimultihopqa", {}).get("summary", {}).get("em")
    comparison = ours.get("hotpotqa", {}).get("per_kind", {}).get("comparison", {}).get("em")
    faithful = {d: cell["summary"].get("faithfulness") for d, cell in ours.items()}
    return {"shipped_variant": shipped, "mean_em": means, "gain_over_best_single_step": gains,
            "hotpotqa_comparison_em": comparison, "faithfulness": faithful,
            "met": {"2wikimultihopqa_gain": gains.get("2wikimultihopqa", -1) >= TARGETS["self_ask_over_single_step_em"],
                    "musique_gain": gains.get("musique", -1) >= TARGETS["self_ask_over_single_step_em"],
                    "hotpotqa_not_worse": gains.get("hotpotqa", -1) >= 0,
                    "2wikimultihopqa_em": twowiki is not None and twowiki >= TARGETS["2wikimultihopqa_em"],
                    "hotpotqa_comparison_em": comparison is not None
                    and comparison >= TARGETS["hotpotqa_comparison_em"],
                    "faithfulness": bool(faithful) and all(f is not None and f >= TARGETS["faithfulness"]
                                                           for f in faithful.values())}}


def write_results(result: dict, out: Path, name: str = NAME) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    cells = result["cells"]
    datasets = [d for d in DATASETS if any(key.endswith(f"/{d}") for key in cells)]
    lines = [f"# Open-book multi-hop QA on {result['model']}{' (PARTIAL: cells missing)' if result['partial'] else ''}",
             "", f"Follow-ups answered from: {KNOWLEDGE}; in the fine-tuned systems a follow-up in an operator's "
             f"template is computed (operators+retrieval). Greedy decoding. Top k = {result['k']} passages per question or follow-up,"
             f" hybrid ranking. Questions asked in a training tree dropped: "
             + ", ".join(f"{DATASETS[d][2]} {result['dropped'][d]} of {result['available'][d]}" for d in result["dropped"])
             + ". Faithful: the share of final answers the trace supports (`supported_by_trace`; self-ask systems "
             "only). Seconds per question depend on the row's weights and CPU.", "",
             "| system | adapters | weights, CPU | " + " | ".join(
                 f"{DATASETS[d][2]} EM / F1 / recall / faithful / follow-ups / s" for d in datasets)
             + " |", "|---|---|---|" + "---|" * len(datasets)]
    for system in ROWS:
        for variant in (VARIANTS if system in FINE_TUNED else (None,)):
            row = [cells.get(cell_key(system, variant, d)) for d in datasets]
            if not any(row):
                continue
            parts = []
            for cell in row:
                if cell is None:
                    parts.append("—")
                    continue
                s = cell["summary"]
                recall = "—" if s["support_recall"] is None else f"{s['support_recall']:.2f}"
                faithful = "—" if s.get("faithfulness") is None else f"{s['faithfulness']:.3f}"
                parts.append(f"{s['em']:.3f} / {s['f1']:.3f} / {recall} / {faithful} / {s['follow_ups']:.1f} / "
                             f"{cell['seconds'] / s['n']:.2f}")
            where = "; ".join(sorted({f"{c.get('dtype')}, {short_cpu(c.get('cpu'))}" for c in row if c}))
            lines.append(f"| {LABELS[system]} | {variant or 'base'} | {where} | " + " | ".join(parts) + " |")
    lines += ["", "n per data set: " + ", ".join(f"{DATASETS[d][2]} {result['n'][d]}" for d in datasets), ""]
    if result["partial"]:
        lines += ["Not evaluated: " + ", ".join(result["missing"]) + ".", ""]
    lines += ["## Per question type (exact match)", ""]
    for d in datasets:
        kinds = sorted({kind for key, cell in cells.items() if key.endswith(f"/{d}") for kind in cell["per_kind"]})
        lines += [f"{DATASETS[d][2]}:", "", "| system | adapters | " + " | ".join(kinds) + " |",
                  "|---|---|" + "---:|" * len(kinds)]
        for system in ROWS:
            for variant in (VARIANTS if system in FINE_TUNED else (None,)):
                cell = cells.get(cell_key(system, variant, d))
                if cell:
                    lines.append(f"| {LABELS[system]} | {variant or 'base'} | " + " | ".join(
                        f"{cell['per_kind'][k]['em']:.3f} (n={cell['per_kind'][k]['n']})" if k in cell["per_kind"]
                        else "—" for k in kinds) + " |")
        lines.append("")
    lines += ["## Passage indexes", "",
              "Every paragraph of every question of the split, pooled. Recall@k: the mean share of the supporting "
              "paragraphs in the top k, for whole questions (query: the question) and gold hops (query: the gold "
              "sub-question; none for HotpotQA).", "",
              "| data set | passages | build s | ranking | " + " | ".join(
                  f"questions @{k}" for k in RECALL_KS) + " | " + " | ".join(f"hops @{k}" for k in RECALL_KS) + " |",
              "|---|---:|---:|---|" + "---:|" * (2 * len(RECALL_KS))]
    for d, info in result["indexes"].items():
        for mode, report in info["recall"].items():
            hops = report["hops"]
            lines.append(f"| {DATASETS[d][2]} | {info['passages']} | {info['build_seconds']:.1f} | {mode} | "
                         + " | ".join(f"{report['questions']['recall'][str(k)]:.3f}" for k in RECALL_KS) + " | "
                         + " | ".join(f"{hops['recall'][str(k)]:.3f}" if hops else "—" for k in RECALL_KS) + " |")
    speed = result.get("index_speed")
    if speed:
        lines += ["", f"One index over the three evaluation splits pooled ({speed['passages']:,} passages): built in "
                  f"{speed['build_seconds']:.1f} s (target < {speed['targets']['build_seconds']} s), loaded in "
                  f"{speed['load_seconds']:.2f} s (target < {speed['targets']['load_seconds']} s; the encoder loads "
                  f"apart at the first query, {speed['encoder_load_seconds']:.2f} s), hybrid search "
                  f"{speed['query_ms']['mean']:.1f} ms a query on average (p50 {speed['query_ms']['p50']:.1f}, p95 "
                  f"{speed['query_ms']['p95']:.1f}; target < {speed['targets']['query_ms']} ms), one query at a time "
                  f"over {speed['queries']} questions."]
    summary = result.get("summary")
    if summary:
        targets = result["targets"]
        gains = ", ".join(f"{DATASETS[d][2]} {g:+.3f}" for d, g in summary["gain_over_best_single_step"].items())
        comparison = summary.get("hotpotqa_comparison_em")
        faithful = ", ".join(f"{DATASETS[d][2]} {f:.3f}" for d, f in summary.get("faithfulness", {}).items()
                             if f is not None)
        lines += ["", f"Shipped variant (higher mean fine-tuned self-ask EM): **{summary['shipped_variant']}** "
                  f"({', '.join(f'{v} {m:.3f}' for v, m in summary['mean_em'].items())}). Its EM minus the best "
                  f"single-step system's: {gains} (targets: >= +{targets['self_ask_over_single_step_em']:.2f} on "
                  "2WikiMultiHopQA and MuSiQue, >= 0 on HotpotQA); >= "
                  f"{targets['2wikimultihopqa_em']:.2f} EM on 2WikiMultiHopQA; HotpotQA comparisons "
                  + ("—" if comparison is None else f"{comparison:.3f}")
                  + f" (target >= {targets.get('hotpotqa_comparison_em', 0):.2f}); faithfulness {faithful or '—'} "
                  f"(target >= {targets.get('faithfulness', 0):.2f}). Met: "
                  + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in summary["met"].items()) + "."]
    lines += baseline_lines(result, datasets)
    lines += ["", f"Targets: {json.dumps(result['targets'])}.", "", provenance_line(result["environment"]), ""]
    (out / f"{name}.md").write_text("\n".join(lines))
    plot(result, out / f"{name}.png", datasets)


def short_cpu(name: Optional[str]) -> str:
    """``AMD EPYC`` / ``Intel Xeon``: the vendor and family of a ``model name`` line, for table cells."""
    if not name:
        return "unknown CPU"
    words = [w for w in name.replace("(R)", "").replace("(TM)", "").split() if w not in ("Processor", "CPU")]
    return " ".join(words[:2])


def baseline_lines(result: dict, datasets: list[str]) -> list[str]:
    """The fine-tuned systems' exact match before operators (``baseline``) and now, per data set and per comparison
    question type, side by side."""
    baseline = result.get("baseline")
    if not baseline:
        return []
    cells, before = result["cells"], baseline["cells"]
    kinds = {"hotpotqa": ["comparison"], "2wikimultihopqa": ["comparison", "bridge_comparison"]}
    columns = [(d, None) for d in datasets] + [(d, k) for d in datasets for k in kinds.get(d, [])]
    lines = ["", "## With and without operators", "",
             f"Exact match before operators existed (`{baseline['file']}`: the decomposer trained without operator "
             "steps, every follow-up retrieved and read) -> now (operator steps in training, operators+retrieval). "
             "Follow-ups answered from retrieved paragraphs in both.", "",
             "| system | adapters | " + " | ".join(DATASETS[d][2] + (f" {k}" if k else "") for d, k in columns) + " |",
             "|---|---|" + "---:|" * len(columns)]

    def em(cell: Optional[dict], kind: Optional[str]) -> Optional[float]:
        if cell is None:
            return None
        return cell["summary"]["em"] if kind is None else cell["per_kind"].get(kind, {}).get("em")

    for system in ("fine_tuned_self_ask", "fine_tuned_recursive", "fine_tuned_fallback"):
        for variant in VARIANTS:
            pairs = []
            for d, k in columns:  # compared only on the same questions
                then, now = before.get(cell_key(system, variant, d)), cells.get(cell_key(system, variant, d))
                same = then is not None and now is not None and then.get("ids") == now.get("ids")
                pairs.append((em(then, k), em(now, k)) if same else (None, None))
            if not any(a is not None and b is not None for a, b in pairs):
                continue
            lines.append(f"| {LABELS[system]} | {variant} | " + " | ".join(
                "—" if a is None or b is None else f"{a:.3f} -> {b:.3f} ({b - a:+.3f})" for a, b in pairs) + " |")
    return lines


def plot(result: dict, path: Path, datasets: list[str]) -> None:
    cells = result["cells"]
    rows = [(system, variant) for system in ROWS for variant in (VARIANTS if system in FINE_TUNED else (None,))
            if any(cell_key(system, variant, d) in cells for d in datasets)]
    figure = Figure(figsize=(14, 4.8))
    FigureCanvasAgg(figure)
    axis = figure.add_subplot()
    width = 0.8 / max(len(rows), 1)
    for i, (system, variant) in enumerate(rows):
        values = [cells.get(cell_key(system, variant, d), {}).get("summary", {}).get("em", 0.0) for d in datasets]
        axis.bar([x + i * width for x in range(len(datasets))], values, width,
                 label=f"{LABELS[system]}" + (f" [{variant}]" if variant else ""))
    axis.set_xticks([x + width * (len(rows) - 1) / 2 for x in range(len(datasets))],
                    [DATASETS[d][2] for d in datasets])
    axis.set_ylabel("exact match")
    axis.set_title(f"Open-book multi-hop QA, {result['model']} (follow-ups: retrieved paragraphs)")
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def sample_suffix(args: argparse.Namespace) -> str:
    """``_n{N}`` for a sample of ``--n N`` questions (its own cells and result files), else nothing (``--quick``
    keeps the plain names in its own directories)."""
    return f"_n{args.n}" if args.n and not args.quick else ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--n", type=int, default=0,
                        help="questions per data set (0: all; else n drawn at random, seed 0, in file order)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                        help="the model's weights while evaluating (auto: bfloat16 where the CPU or GPU has it "
                             "natively, about 2x faster on a CPU with AMX; else float32)")
    parser.add_argument("--k", type=int, default=3, help="passages read per question or follow-up")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--runs", type=Path, default=REPO / "outputs/openbook", help="trained runs, indexes, cells")
    parser.add_argument("--decomposer-run", type=Path, default=REPO / "outputs/recursion/flat",
                        help="the two-adapter variant's decomposer run (default: the run benchmarks/recursion.py trains "
                             "as flat, the same config, so the two benchmarks share it)")
    parser.add_argument("--encoder", default="minilm", help="the passage index's dense encoder")
    parser.add_argument("--cached-only", action="store_true", help="evaluate nothing: write the cells done before")
    parser.add_argument("--render", action="store_true",
                        help="evaluate nothing: rewrite the .md and .png from the .json this command wrote before")
    parser.add_argument("--index-speed", action="store_true",
                        help="also time one index over the three evaluation splits pooled (build, load, query)")
    parser.add_argument("--quick", action="store_true", help="5 training steps, 6 questions per data set")
    parser.add_argument("--train-args", nargs="*", default=[], metavar="key=value", help="training overrides")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--baseline", type=Path, default=BASELINE,
                        help="results measured before operators existed, shown side by side")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    args.dtype = resolve_dtype(args.dtype)
    overrides = list(args.train_args)
    if args.quick:
        args.n, args.runs, args.decomposer_run = 6, args.runs / "quick", args.runs / "quick" / "decomposer"
        overrides += QUICK_TRAINING
    if args.render:
        name = NAME + sample_suffix(args)
        result = json.loads((args.out / f"{name}.json").read_text())
        write_results(result, args.out, name)
        print((args.out / f"{name}.md").read_text())
        return
    transformers_logging.set_verbosity_error()

    runs_needed = {"one": ["openbook"], "two": ["decomposer", "reader"]}
    run_dirs = {}
    for variant in args.variants:
        for run in runs_needed[variant]:
            run_dir = args.decomposer_run if run == "decomposer" else args.runs / run
            run_dirs[run] = run_dir if args.cached_only else train(run, run_dir, overrides)
    seen = training_questions()

    questions, available, dropped = {}, {}, {}
    for key in DATASETS:  # every data set's questions: the cells of those not evaluated now are still reported
        source, split, _ = DATASETS[key]
        every = read_questions(source, split)
        fresh = [q for q in every if question_key(q.question) not in seen]
        available[key], dropped[key] = len(every), len(every) - len(fresh)
        if args.n and args.n < len(fresh):
            drawn = set(random.Random(SEED).sample(range(len(fresh)), args.n))
            fresh = [q for i, q in enumerate(fresh) if i in drawn]
        questions[key] = fresh

    sample = sample_suffix(args)  # sampled and whole-split results live side by side
    name, cell_dir = NAME + sample, args.runs / f"cells{sample}"
    cell_dir.mkdir(parents=True, exist_ok=True)
    cells: dict[str, dict] = {}
    previous_file = args.out / f"{name}.json"
    previous = json.loads(previous_file.read_text()) if previous_file.is_file() and not args.quick else {}
    carried = {key: {**cell, "cpu": cell.get("cpu", previous["environment"]["machine"].get("cpu_model"))}
               for key, cell in previous.get("cells", {}).items()}
    cpu = environment_record()["machine"].get("cpu_model")
    indexes: dict[str, dict] = {}
    models: dict[Optional[str], Any] = {}

    def model_for(variant: Optional[str]):
        if variant not in models:
            models.clear()  # one model in memory at a time
            base, tokenizer = load_backbone(args.model, task="causal_lm", dtype=getattr(torch, args.dtype))
            if variant == "one":
                base = load_adapter(base, run_dirs["openbook"] / "adapter")
            elif variant == "two":
                base = load_adapter(base, run_dirs["decomposer"] / "adapter", adapter_name="decomposer")
                base.load_adapter(str(run_dirs["reader"] / "adapter"), adapter_name="reader")
                base.set_adapter("decomposer")
            models[variant] = (base.to(getattr(torch, args.dtype)).eval(), tokenizer)
        return models[variant]

    for system in SYSTEMS:  # every cell evaluated before is reported; the asked-for ones are evaluated
        for variant in (VARIANTS if system in FINE_TUNED else [None]):
            for key in DATASETS:
                source, split, title = DATASETS[key]
                path = cell_dir / f"{system}_{variant or 'base'}_{key}.json"
                ids = [q.id for q in questions[key]]
                wanted = (ids, args.k, args.dtype, SYSTEM_ANSWERERS.get(system))
                cached = json.loads(path.read_text()) if path.is_file() else None
                before = carried.get(cell_key(system, variant, key))
                asked = (not args.cached_only and system in args.systems and key in args.datasets
                         and (not variant or variant in args.variants))
                if reusable(cached, system, wanted, any_dtype=False):
                    cells[cell_key(system, variant, key)] = cached
                    continue
                if reusable(before, system, wanted, any_dtype=not asked):  # the table names its dtype and CPU
                    cells[cell_key(system, variant, key)] = before
                    continue
                if not asked:
                    continue
                index, indexes[key] = load_index(source, split, args.runs, args.encoder)
                # the base systems run with the adapters off, on whichever model is loaded
                model, tokenizer = model_for(variant if system in FINE_TUNED else next(iter(models), args.variants[0]))
                print(f"{LABELS[system]} [{variant or 'base'}] / {title}: {len(ids)} questions", flush=True)
                began = time.perf_counter()
                records = run_open_book(system, questions[key], index, model, tokenizer, k=args.k,
                                        reader_adapter="reader" if variant == "two" else None,
                                        progress=system if variant is None else f"{system} ({variant})")
                cell = {"ids": ids, "k": args.k, "dtype": args.dtype, "answerers": SYSTEM_ANSWERERS.get(system),
                        "cpu": cpu, "seconds": time.perf_counter() - began, "summary": summarise_open_book(records),
                        "per_kind": per_kind(records), "records": records}
                text = json.dumps(cell, ensure_ascii=False)
                write_file_atomically(path, lambda f: f.write(text))
                cells[cell_key(system, variant, key)] = cell

    for key in args.datasets:
        source, split, _ = DATASETS[key]
        report_file = args.runs / "index" / f"{source}_{split}.recall.json"
        if key not in indexes and report_file.is_file():
            indexes[key] = json.loads(report_file.read_text())
    for key, info in previous.get("indexes", {}).items():
        indexes.setdefault(key, info)
    expected = {cell_key(s, v, d) for s in ROWS for v in (VARIANTS if s in FINE_TUNED else [None])
                for d in DATASETS}
    speed_file = args.runs / "index" / "speed.json"
    speed = index_speed(args.runs, args.encoder) if args.index_speed and not args.cached_only else (
        json.loads(speed_file.read_text()) if speed_file.is_file() else previous.get("index_speed"))
    for row, (first, second) in DERIVED.items():
        for variant in VARIANTS:
            for key in DATASETS:
                a, b = cells.get(cell_key(first, variant, key)), cells.get(cell_key(second, variant, key))
                if a and b and a["ids"] == b["ids"] and "records" in a and "records" in b:  # carried: no records
                    cells[cell_key(row, variant, key)] = derived_cell(a, b)
    result = {
        "benchmark": NAME, "model": args.model, "dtype": args.dtype, "k": args.k, "seed": SEED, "knowledge": KNOWLEDGE,
        "targets": TARGETS, "partial": bool(expected - set(cells)), "missing": sorted(expected - set(cells)),
        "n": {**previous.get("n", {}), **{key: len(qs) for key, qs in questions.items()}},
        "available": {**previous.get("available", {}), **available}, "dropped": {**previous.get("dropped", {}), **dropped},
        "indexes": indexes, "index_speed": speed,
        "cells": {k: {kk: vv for kk, vv in c.items() if kk != "records"} for k, c in cells.items()},
        "baseline": baseline_cells(args.baseline), "summary": summarise_targets(cells),
        "wall_seconds": time.perf_counter() - started, "environment": environment_record(),
    }
    write_results(result, args.out, name)
    print((args.out / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
