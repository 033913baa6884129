"""The recursive collator on the ProbTree trees (2WikiMultiHopQA + HotpotQA + MuSiQue) with SmolLM2's tokenizer.

Measures, in one run:

1. throughput of the whole data path (convert + unroll + tokenise + collate), as episodes/s and tokens/s;
2. the share of pad tokens when episodes are padded per batch vs packed into rows of ``--max-length``;
3. the cost of collating one training batch (cold: from trees, unrolled and tokenised; warm: cached) as a
   fraction of one LoRA optimiser step of SmolLM2-135M on that batch.

Writes ``collator.{json,md,png}`` to ``--out``:

    .venv/bin/python benchmarks/collator.py [--max-length 512] [--batch-size 8] [--steps 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm import tqdm
from transformers import AutoTokenizer

from _env import environment_record
from peftprompt import attach, load_backbone
from peftprompt.backbones import resolve_backbone
from peftprompt.recursive import convert
from peftprompt.recursive.collator import EpisodeEncoder, SelfAskCollator, pack_rows
from peftprompt.recursive.unroll import Unroller

NAME = "collator"
SOURCES = ("probtree_2wiki", "probtree_hotpotqa", "probtree_musique")
SEED = 0


def batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def data_path(tokenizer, max_length: int, limit: int | None) -> dict:
    """Time each stage of trees -> batches over every source, and return the pieces later steps need."""
    timings, counts = {}, {}
    start = time.perf_counter()
    trees = [tree for source in tqdm(SOURCES, desc="convert") for tree in convert(source, limit=limit)]
    timings["convert_s"] = time.perf_counter() - start

    unroller = Unroller(mode="recursive")
    start = time.perf_counter()
    episodes = [e for tree in tqdm(trees, desc="unroll") for e in unroller(tree)]
    timings["unroll_s"] = time.perf_counter() - start

    encoder = EpisodeEncoder(tokenizer, max_length=max_length, unroller=unroller)
    start = time.perf_counter()
    encoded = [e for e in (encoder.encode(e) for e in tqdm(episodes, desc="tokenise")) if e is not None]
    timings["tokenise_s"] = time.perf_counter() - start

    rows = [e.as_features() for e in encoded]
    random.Random(SEED).shuffle(rows)
    start = time.perf_counter()
    packed_rows = pack_rows(rows, max_length)
    timings["pack_s"] = time.perf_counter() - start
    counts.update(
        trees=len(trees),
        episodes=len(episodes),
        episodes_kept=len(encoded),
        episodes_dropped=dict(encoder.dropped + unroller.skipped),
        tokens=sum(len(e) for e in encoded),
        trained_tokens=sum(e.trained_tokens for e in encoded),
        max_episode_tokens=max(len(e) for e in encoded),
        median_episode_tokens=statistics.median(len(e) for e in encoded),
        packed_rows=len(packed_rows),
    )
    return {"timings": timings, "counts": counts, "rows": rows, "packed_rows": packed_rows, "trees": trees}


def pad_fractions(tokenizer, rows: list[dict], packed_rows: list[dict], batch_size: int, max_length: int) -> dict:
    """Pad share of all batches: padded per batch of episodes, packed in-batch, and packed over the data set."""
    padded = SelfAskCollator(tokenizer, max_length=max_length)
    in_batch = SelfAskCollator(tokenizer, max_length=max_length, packing=True)
    # rows packed over the data set are padded to exactly max_length, as a fixed-shape packed data set would be
    dataset_packed = SelfAskCollator(tokenizer, max_length=max_length, pad_to_multiple_of=max_length)
    start = time.perf_counter()
    for batch in tqdm(batches(rows, batch_size), desc="collate padded"):
        padded(batch)
    collate_s = time.perf_counter() - start
    for batch in tqdm(batches(rows, batch_size), desc="collate packed in batch"):
        in_batch(batch)
    row_batch = max(1, round(batch_size * len(packed_rows) / len(rows)))
    for batch in tqdm(batches(packed_rows, row_batch), desc="collate packed rows"):
        dataset_packed(batch)
    return {
        "pad_fraction_padded": padded.pad_fraction,
        "pad_fraction_packed_in_batch": in_batch.pad_fraction,
        "pad_fraction_packed": dataset_packed.pad_fraction,
        "packed_rows_per_batch": row_batch,
        "collate_padded_s": collate_s,
    }


def step_fraction(model_name: str, tokenizer, trees: list, max_length: int, rows_per_batch: int, steps: int) -> dict:
    """Collation time of one packed batch (cold from trees, and warm) over one LoRA optimiser step of `model_name`
    (SmolLM2-135M by default) on it."""
    collator = SelfAskCollator(tokenizer, max_length=max_length, packing=True)
    # enough trees for `rows_per_batch` full rows, taken in order
    chosen, tokens = [], 0
    encoder = EpisodeEncoder(tokenizer, max_length=max_length)
    for tree in trees:
        chosen.append(tree)
        tokens += sum(len(e) for e in encoder.encode_tree(tree))
        if tokens >= rows_per_batch * max_length * 0.97:
            break
    features = [tree.to_dict() for tree in chosen]
    start = time.perf_counter()
    batch = collator(features)  # cold: unroll + tokenise + pack + pad
    cold_s = time.perf_counter() - start
    warm = []
    for _ in range(5):
        start = time.perf_counter()
        collator(features)
        warm.append(time.perf_counter() - start)

    model, _ = load_backbone(model_name, task="causal_lm")
    model.config.use_cache = False  # packed rows need it: see peftprompt.recursive.collator
    model = attach(model, "lora", task="causal_lm")
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    step_seconds = []
    for _ in tqdm(range(steps + 1), desc="LoRA steps"):
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        step_seconds.append(time.perf_counter() - start)
    step_s = statistics.median(step_seconds[1:])
    return {
        "model": model_name,
        "step_batch_shape": list(batch["input_ids"].shape),
        "step_batch_trees": len(chosen),
        "collate_cold_s": cold_s,
        "collate_warm_s": statistics.median(warm),
        "lora_step_s": step_s,
        "lora_step_s_all": step_seconds,
        "collation_fraction_of_step": cold_s / step_s,
        "collation_fraction_of_step_warm": statistics.median(warm) / step_s,
    }


def write_results(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}.json").write_text(json.dumps(result, indent=2) + "\n")
    c, r = result["counts"], result
    lines = [
        "# Recursive collator on the ProbTree trees (SmolLM2 tokenizer)",
        "",
        f"{c['trees']:,} trees from {', '.join(SOURCES)} -> {c['episodes']:,} recursive self-ask episodes "
        f"({c['episodes_kept']:,} kept, {c['tokens']:,} tokens of which {c['trained_tokens']:,} trained; "
        f"dropped: {c['episodes_dropped'] or 'none'}); max_length {r['max_length']}, batch {r['batch_size']} episodes.",
        "",
        "| measure | value | target |",
        "|---|---:|---:|",
        f"| episodes/s (convert + unroll + tokenise + collate) | {r['episodes_per_s']:,.0f} | |",
        f"| tokens/s (same path) | {r['tokens_per_s']:,.0f} | |",
        f"| pad fraction, padded per batch | {r['pad_fraction_padded']:.3f} | |",
        f"| pad fraction, packed within each batch | {r['pad_fraction_packed_in_batch']:.3f} | |",
        f"| pad fraction, packed over the data set (rows of exactly max_length) | {r['pad_fraction_packed']:.3f} | < 0.05 |",
        f"| collation (cold, from trees) / LoRA step | {r['collation_fraction_of_step']:.4f} | < 0.02 |",
        f"| collation (warm, cached) / LoRA step | {r['collation_fraction_of_step_warm']:.5f} | |",
        "",
        "Stage seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in r["timings"].items()) + ". "
        f"LoRA step ({r['model']}, r 8, batch {r['step_batch_shape']}): {r['lora_step_s']:.1f} s, median of "
        f"{len(r['lora_step_s_all']) - 1} after one warm-up; collating that batch: {r['collate_cold_s'] * 1000:.0f} ms "
        f"cold, {r['collate_warm_s'] * 1000:.1f} ms warm.",
        "",
        f"Machine: {r['environment']['machine']['cpu_model']} ({r['environment']['machine']['cpu_count']} CPUs), "
        f"{r['environment']['threads']} torch threads, commit {r['environment']['git_commit']}. Command: "
        f"`{r['environment']['command']}`.",
    ]
    (out / f"{NAME}.md").write_text("\n".join(lines) + "\n")

    figure = Figure(figsize=(6, 3.2))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    labels = ["padded\nper batch", "packed\nin batch", "packed over\nthe data set"]
    values = [r["pad_fraction_padded"], r["pad_fraction_packed_in_batch"], r["pad_fraction_packed"]]
    bars = ax.bar(labels, [100 * v for v in values], color=["#bbbbbb", "#88aadd", "#3366aa"])
    ax.bar_label(bars, fmt="%.1f%%")
    ax.axhline(5, color="red", linestyle="--", linewidth=1, label="target for packing: 5%")
    ax.set_ylabel("pad tokens (% of positions)")
    ax.set_title(f"Self-ask episodes, SmolLM2 tokenizer, rows of {r['max_length']}")
    ax.legend()
    figure.tight_layout()
    figure.savefig(out / f"{NAME}.png", dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16, help="episodes per padded batch")
    parser.add_argument("--steps", type=int, default=3, help="timed LoRA steps (after one warm-up)")
    parser.add_argument("--limit", type=int, default=None, help="trees per source")
    parser.add_argument("--quick", action="store_true", help="200 trees per source and 1 timed step")
    parser.add_argument("--model", default="smollm2-135m",
                        help="the causal LM whose tokenizer and LoRA step are measured (default SmolLM2-135M)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if args.quick:
        args.limit, args.steps = args.limit or 200, 1
    torch.manual_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone(args.model))

    start = time.perf_counter()
    path = data_path(tokenizer, args.max_length, args.limit)
    pads = pad_fractions(tokenizer, path["rows"], path["packed_rows"], args.batch_size, args.max_length)
    path_s = sum(path["timings"].values()) + pads["collate_padded_s"]
    counts = path["counts"]
    result = {
        "benchmark": NAME,
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "sources": list(SOURCES),
        "episodes_per_s": counts["episodes_kept"] / path_s,
        "tokens_per_s": counts["tokens"] / path_s,
        **{k: v for k, v in pads.items() if k != "collate_padded_s"},
        "timings": {**path["timings"], "collate_padded_s": pads["collate_padded_s"]},
        "counts": counts,
    }
    result.update(step_fraction(args.model, tokenizer, path["trees"], args.max_length, pads["packed_rows_per_batch"],
                                args.steps))
    result["wall_s"] = time.perf_counter() - start
    result["environment"] = environment_record()
    write_results(result, args.out)
    print((args.out / f"{NAME}.md").read_text())


if __name__ == "__main__":
    main()
