"""Our training path against the usual ones, side by side on the same self-ask episodes with SmolLM2-135M + LoRA.

- **baseline**: `transformers.Trainer` + `peft.get_peft_model(LoraConfig(...))` + the episodes of each batch padded
  to the longest (`SelfAskCollator(packing=False)`, the same loss masks) + the model's own loss (full-vocabulary
  logits at every position);
- **trl**: TRL's `SFTTrainer` with ``padding_free=True`` (no packing across batches, ``max_length=None``: the episodes
  already fit): TRL's collator flattens each batch's episodes into one row with ``position_ids`` restarting per
  episode and no attention mask, the loss is completion-only over exactly our trained tokens (the episodes go in
  pre-tokenised as ``input_ids`` + ``completion_mask``, `trl_features`; TRL's prepared labels are checked equal to
  ours), the LoRA through ``peft_config``, the LM head through TRL's fused chunked kernel (which on the CPU scores
  every position). Attention stays the model's default, **sdpa**: transformers (``masking_utils``,
  ``find_packed_sequence_indices``) turns restarting ``position_ids`` without an attention mask into a block-diagonal
  causal mask for sdpa as for eager, on the CPU too, as long as no KV cache is passed (``use_cache=False``, as TRL's
  forward sets; with a cache the detection is off and attention crosses the episodes). `padding_free_check` proves
  it before training through TRL's own forward (fp32, packed vs each episode alone) and stops the run if not;
- **ours**: `peftprompt.training.train` + the same LoRA through `attach` + the same episodes per step packed into
  balanced rows of at most ``--max-length`` (`SelfAskCollator(packing=True)`) + logits only at the trained positions
  + under mixed precision the frozen backbone kept in the compute dtype (``frozen_dtype``) + fused AdamW + no
  adapter-input casts under autocast.

All three see ``--batch-size`` episodes per optimiser step for ``--steps`` steps (same LoRA, learning rate, cosine
schedule without warm-up, seed and mixed precision, no gradient accumulation or checkpointing, one process each so
peak RSS is theirs alone; the episodes are tokenised once by this process). The batches are the same: both Trainers
and ours draw them from the same episode list through Accelerate's seedable sampler seeded with ``SEED`` (the
Trainers' ``data_seed`` falls back to it), and the trained tokens counted per batch (`CountingCollator`) must be
equal on every path, else the run exits with an error after writing its results. Then ours again with the backbone
in fp32, 8-bit and 4-bit (bitsandbytes), gradient checkpointing on, for ``--quant-steps`` steps: peak RSS, weight
bytes and loss. Writes ``speed.{json,md,png}`` to ``--out``:

    .venv/bin/python benchmarks/speed.py [--steps 50] [--batch-size 8] [--quant-steps 10] [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _env import environment_record, provenance_line

NAME = "speed"
ENCODER = "speed_encoder"  # the encoder comparison, whose ratios this page repeats
SOURCES = ("musique", "probtree_hotpotqa", "probtree_musique")
# PEFT's LoraConfig default dropout (0.0), written out: both paths get exactly this adapter.
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
LEARNING_RATE = 1e-3
SEED = 0
WARMUP_STEPS = 2  # left out of the per-step timing
PEERS = ("baseline", "trl")  # the usual paths ours is compared with, on the same steps
RUNS = ("baseline", "trl", "ours", "ours_fp32", "ours_8bit", "ours_4bit")  # each in a process of its own


class CountingCollator:
    """Wraps a collator and counts, per batch, the trained tokens (labels set) and the episodes' tokens (padding
    left out, the same count on both paths), plus the positions the model computes (padding included)."""

    def __init__(self, collator) -> None:
        self.collator, self.trained, self.tokens, self.positions = collator, [], [], []

    def __call__(self, features):
        batch = self.collator(features)
        labels = batch["labels"]
        self.trained.append(int((labels[:, 1:] != -100).sum()))
        self.tokens.append(sum(len(f["input_ids"]) for f in features))
        self.positions.append(labels.numel())
        return batch


def episodes(model: str, count: int, max_length: int) -> list[dict]:
    """`count` flat self-ask episodes of the training sources (shuffled with the seed), tokenised with masks by
    `model`'s tokenizer. Made once by the parent process, so parsing the datasets is in no worker's peak RSS."""
    from transformers import AutoTokenizer

    from peftprompt.backbones import resolve_backbone
    from peftprompt.recursive import EpisodeEncoder, Unroller, convert

    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone(model))
    trees = [tree for source in SOURCES for tree in convert(source)]
    random.Random(SEED).shuffle(trees)
    encoder = EpisodeEncoder(tokenizer, max_length=max_length, unroller=Unroller(mode="flat"))
    out = [e.as_features() for e in encoder.encode_all(trees[: count * 2])][:count]
    if len(out) < count:
        raise ValueError(f"only {len(out)} episodes for {count} requested")
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def recording_callback(step_ends: list, losses: list):
    """A `TrainerCallback` appending each optimiser step's end time and each logged training loss (both Trainers)."""
    from transformers import TrainerCallback

    class Record(TrainerCallback):
        def on_step_end(self, *_, **__):
            step_ends.append(time.perf_counter())

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    return Record()


def run_baseline(args, mixed_precision: str) -> dict:
    """`transformers.Trainer` + `peft.get_peft_model`, batches padded to the longest episode, full logits."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from peftprompt.backbones import resolve_backbone
    from peftprompt.recursive import SelfAskCollator

    path = resolve_backbone(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = json.loads(Path(args.episodes).read_text())[: args.steps * args.batch_size]
    model = AutoModelForCausalLM.from_pretrained(path)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
    collator = CountingCollator(SelfAskCollator(tokenizer, max_length=args.max_length, packing=False))
    step_ends, losses = [], []
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = TrainingArguments(**peer_arguments(args, output_dir, mixed_precision),
                                          remove_unused_columns=False)
        trainer = Trainer(model=model, args=training_args, train_dataset=data, data_collator=collator,
                          callbacks=[recording_callback(step_ends, losses)])
        started = time.perf_counter()
        trainer.train()
    return {"step_ends": [t - started for t in step_ends], "losses": losses, "trained_tokens": collator.trained,
            "tokens": collator.tokens, "positions": collator.positions, "peak_rss_mb": peak_rss_mb()}


def peer_arguments(args, output_dir: str, mixed_precision: str) -> dict:
    """The `TrainingArguments` both peers (Trainer and TRL's `SFTTrainer`) share: steps, batch, rate, schedule,
    seed, precision; no saving, logging or progress bar."""
    return dict(output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                learning_rate=LEARNING_RATE, lr_scheduler_type="cosine", warmup_steps=0, logging_steps=1,
                save_strategy="no", report_to=[], use_cpu=args.cpu, seed=SEED, bf16=mixed_precision == "bf16",
                fp16=mixed_precision == "fp16", dataloader_num_workers=0, disable_tqdm=True)


def trl_features(features: list[dict]) -> list[dict]:
    """Our episodes in TRL's pre-tokenised form: ``input_ids`` + ``completion_mask`` (1 where our label is set), for
    ``completion_only_loss=True``; TRL then labels a token with its id where the mask is 1 and -100 elsewhere, which
    is our labels exactly (checked here: a trained label is its own input id, and with a loss weight of 1, since TRL's
    loss is unweighted)."""
    out = []
    for f in features:
        weights = f.get("loss_weights") or [1.0] * len(f["labels"])
        for token, label, weight in zip(f["input_ids"], f["labels"], weights, strict=True):
            if label != -100 and (label != token or weight != 1.0):
                raise ValueError("an episode's trained label is not its input id or has a loss weight other than 1: "
                                 "TRL's completion mask cannot express it")
        out.append({"input_ids": f["input_ids"], "completion_mask": [int(label != -100) for label in f["labels"]]})
    return out


def padding_free_check(trainer, count: int = 3, tolerance: float = 1e-3) -> dict:
    """Before training, through TRL's own forward (the PEFT model with TRL's fused LM head, fp32, no autocast): the
    first `count` training sequences flattened padding-free into one row by TRL's collator score the same per-token
    log-probabilities as each sequence alone, i.e. no attention crosses a sequence boundary. Raises if not."""
    import torch

    features = [trainer.train_dataset[i] for i in range(count)]
    model = trainer.model
    device = next(model.parameters()).device

    def log_probs(batch):
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with torch.no_grad():
            out = model(**batch, use_cache=False, fused_lm_head=True)
        return out.log_probs[out.label_mask].double()

    packed = log_probs(trainer.data_collator(features))
    alone = torch.cat([log_probs(trainer.data_collator([f])) for f in features])
    check = {"sequences": count, "trained_tokens": int(alone.numel()),
             "attn_implementation": model.config._attn_implementation,
             "max_abs_diff_token_log_prob": float((packed - alone).abs().max()),
             "abs_diff_mean_loss": float(abs(packed.mean() - alone.mean()))}
    if packed.shape != alone.shape or check["max_abs_diff_token_log_prob"] > tolerance:
        raise RuntimeError(f"padding-free rows do not score like the sequences alone: {check}")
    return check


def run_trl(args, mixed_precision: str) -> dict:
    """TRL's `SFTTrainer` with ``padding_free=True``: each batch's episodes flattened into one row (``position_ids``
    restarting per episode, no attention mask, no padding), completion-only loss over our trained tokens, the LoRA
    through ``peft_config``, TRL's fused chunked LM head."""
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from peftprompt.backbones import resolve_backbone

    path = resolve_backbone(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    episodes_used = json.loads(Path(args.episodes).read_text())[: args.steps * args.batch_size]
    data = Dataset.from_list(trl_features(episodes_used))
    model = AutoModelForCausalLM.from_pretrained(path)  # as the baseline: float32 weights, default (sdpa) attention
    model.config.use_cache = False
    step_ends, losses = [], []
    with tempfile.TemporaryDirectory() as output_dir:
        config = SFTConfig(
            **peer_arguments(args, output_dir, mixed_precision),
            gradient_checkpointing=False,  # TRL's default is True; the other paths train without it
            padding_free=True, packing=False, completion_only_loss=True, shuffle_dataset=False,
            max_length=None,  # padding-free without packing refuses a max_length; the episodes fit --max-length
        )
        trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                             peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA),
                             callbacks=[recording_callback(step_ends, losses)])
        # TRL built the labels from the completion mask: they must be ours, row for row (same order: the Trainer's
        # seeded sampler then draws the same batches as the other paths, checked per step by the token counts)
        if trainer.train_dataset["labels"] != [f["labels"] for f in episodes_used]:
            raise RuntimeError("TRL's prepared labels differ from the episodes' labels")
        check = padding_free_check(trainer)
        # padding-free refuses a custom collator at construction: count through a wrapper set afterwards
        collator = trainer.data_collator = CountingCollator(trainer.data_collator)
        started = time.perf_counter()
        trainer.train()
    return {"step_ends": [t - started for t in step_ends], "losses": losses, "trained_tokens": collator.trained,
            "tokens": collator.tokens, "positions": collator.positions, "peak_rss_mb": peak_rss_mb(),
            "padding_free_check": check, "trl_version": trl.__version__}


def run_ours(args, mixed_precision: str, quantisation: str = "none", steps: int | None = None,
             gradient_checkpointing: bool = False) -> dict:
    """`peftprompt.training.train`: packed batches, logits at trained positions only, and under mixed precision the
    frozen backbone kept in the compute dtype (``frozen_dtype``; the LoRA weights stay float32)."""
    from peftprompt.recursive import SelfAskCollator
    from peftprompt.training import TrainConfig, build_model, train

    steps = steps or args.steps
    with tempfile.TemporaryDirectory() as output_dir:
        config = TrainConfig(
            model=args.model, task="causal_lm", method="lora", method_args=LORA, max_length=args.max_length,
            load_in_8bit=quantisation == "8bit", load_in_4bit=quantisation == "4bit",
            gradient_checkpointing=gradient_checkpointing,
            learning_rate=LEARNING_RATE, lr_scheduler="cosine", warmup_ratio=0.0,
            per_device_train_batch_size=args.batch_size, max_steps=steps, mixed_precision=mixed_precision,
            seed=SEED, log_every=1, output_dir=output_dir,
            frozen_dtype={"bf16": "bfloat16", "fp16": "float16"}.get(mixed_precision, "float32"),
        )
        model, tokenizer = build_model(config)
        weight_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        data = json.loads(Path(args.episodes).read_text())[: steps * args.batch_size]
        collator = CountingCollator(SelfAskCollator(tokenizer, max_length=args.max_length, packing=True))
        result = train(config, model, tokenizer, data, collator)
        logged = [json.loads(line) for line in result.log_file.read_text().splitlines()]
    train_records = [r for r in logged if r["type"] == "train"]
    return {"step_ends": [r["elapsed_s"] for r in train_records], "losses": [r["loss"] for r in train_records],
            "trained_tokens": collator.trained, "tokens": collator.tokens, "positions": collator.positions,
            "peak_rss_mb": peak_rss_mb(), "frozen_dtype": config.frozen_dtype, "weight_bytes": weight_bytes}


def summarise(run: dict) -> dict:
    """s/step (median over the steps after the warm-up), trained and all tokens/s over those steps, the loss."""
    ends = run["step_ends"]
    durations = [b - a for a, b in zip(ends, ends[1:])][WARMUP_STEPS - 1:]
    timed = sum(durations)
    timed_steps = range(WARMUP_STEPS, len(ends))
    return {
        "steps": len(ends),
        "seconds_per_step": statistics.median(durations) if durations else None,
        "trained_tokens_per_s": sum(run["trained_tokens"][i] for i in timed_steps) / timed if timed else None,
        "tokens_per_s": sum(run["tokens"][i] for i in timed_steps) / timed if timed else None,
        "positions_per_step": statistics.mean(run["positions"]),  # computed positions, padding included
        "tokens_per_step": statistics.mean(run["tokens"]),
        "trained_tokens_per_step": run["trained_tokens"],  # one count per batch, compared across the paths
        "frozen_dtype": run.get("frozen_dtype", "float32"),
        "weight_bytes": run.get("weight_bytes"),  # parameters + buffers of the model trained (ours only)
        "peak_rss_mb": run["peak_rss_mb"],
        "first_loss": run["losses"][0],
        "last_loss": statistics.mean(run["losses"][-5:]),
        "losses": run["losses"],
        **{key: run[key] for key in ("padding_free_check", "trl_version") if key in run},
    }


def worker(args) -> None:
    """One measurement in this process (`--worker NAME`); its result goes to `--worker-out` as JSON."""
    from transformers.utils import logging as transformers_logging

    from peftprompt.training.config import resolve_mixed_precision

    transformers_logging.set_verbosity_error()
    mixed_precision = resolve_mixed_precision(args.mixed_precision)[0]
    if args.worker == "baseline":
        run = run_baseline(args, mixed_precision)
    elif args.worker == "trl":
        run = run_trl(args, mixed_precision)
    else:
        quantisation = {"ours": "none", "ours_8bit": "8bit", "ours_4bit": "4bit", "ours_fp32": "none"}[args.worker]
        precision = "no" if args.worker in ("ours_8bit", "ours_4bit", "ours_fp32") else mixed_precision
        steps = args.steps if args.worker == "ours" else args.quant_steps
        # the backbones compared for memory all train as QLoRA does (PEFT's prepare_model_for_kbit_training default):
        # with gradient checkpointing, so the stored activations do not hide what the weights take
        run = run_ours(args, precision, quantisation, steps, gradient_checkpointing=args.worker != "ours")
    run["mixed_precision"] = mixed_precision if args.worker in ("baseline", "trl", "ours") else "no"
    Path(args.worker_out).write_text(json.dumps(run))


def measure(args, name: str) -> dict:
    """Run `name` in a fresh process and return its summary."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        command = [sys.executable, __file__, "--worker", name, "--worker-out", str(out), "--model", args.model,
                   "--episodes", args.episodes,
                   "--steps", str(args.steps), "--quant-steps", str(args.quant_steps), "--batch-size",
                   str(args.batch_size), "--max-length", str(args.max_length), "--mixed-precision",
                   args.mixed_precision]
        started = time.perf_counter()
        subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                 "TOKENIZERS_PARALLELISM": "false"})
        run = json.loads(out.read_text())
    return {**summarise(run), "mixed_precision": run["mixed_precision"],
            "wall_seconds": time.perf_counter() - started}


def moving_average(values: list[float], window: int = 10) -> list[float]:
    return [statistics.mean(values[max(0, i - window + 1): i + 1]) for i in range(len(values))]


def loss_curve_diff(a: dict, b: dict) -> float:
    """Largest gap between two runs' 10-step moving averages of the training loss."""
    return max(abs(x - y) for x, y in zip(moving_average(a["losses"]), moving_average(b["losses"])))


def encoder_lines(out: Path) -> list[str]:
    """The encoder comparison (``speed_encoder.json`` in `out`, measured by ``speed_encoder.py`` on its own
    machine and run) as a section of this page; nothing when it is missing."""
    path = out / f"{ENCODER}.json"
    if not path.is_file():
        return []
    encoder = json.loads(path.read_text())
    return ["", f"## Encoders: MiniLM on SST-2 against Trainer + PEFT (`{ENCODER}.py`; details in `{ENCODER}.md`)", "",
            f"{encoder['steps']} steps x batch {encoder['batch_size']}, fp32, {encoder['threads']} threads; ours / "
            f"Trainer + get_peft_model in examples per second, the median of {encoder['repeats']} paired runs "
            f"(min - max; target >= {encoder['target']:.1f}x):", "",
            *[f"- {key}: **{r['median']:.2f}x** ({r['min']:.2f} - {r['max']:.2f})"
              for key, r in encoder["ratios"].items()],
            "", provenance_line(encoder["environment"])]


def write_results(result: dict, out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}.json").write_text(json.dumps(result, indent=2) + "\n")
    runs = result["runs"]
    check = runs["trl"]["padding_free_check"]
    equal = result["trained_tokens_per_step_equal"]
    lines = [
        "# Training speed and memory: peftprompt vs Trainer + PEFT and TRL SFTTrainer padding-free "
        f"({result['model']} + LoRA, self-ask episodes)",
        "",
        f"{result['steps']} optimiser steps x {result['batch_size']} flat self-ask episodes (MuSiQue + ProbTree "
        f"HotpotQA/MuSiQue, rows of at most {result['max_length']} tokens), LoRA r 16 on every projection, lr "
        f"{LEARNING_RATE:g} cosine, no warm-up, dropout 0, seed {SEED}, one process each, no gradient accumulation or "
        f"checkpointing, mixed precision {runs['ours']['mixed_precision']}; the same episodes in the same batches on "
        "every path (trained tokens per step equal to ours: "
        + ", ".join(f"{name} {'yes' if equal[name] else 'NO'}" for name in PEERS) + ").",
        "",
        "- The Trainer baseline pads each batch to its longest episode and computes full-vocabulary logits at every "
        "position (the model's own loss).",
        f"- TRL {runs['trl']['trl_version']} `SFTTrainer` with `padding_free=True` flattens each batch's episodes "
        "into one row (`position_ids` restarting per episode, no attention mask, no padding), trains completion-only "
        "on our trained tokens (`input_ids` + `completion_mask`) and scores the LM head with its fused chunked kernel "
        "(on the CPU as torch ops at every position; with Triton on a GPU only at the trained ones). Attention: "
        f"{check['attn_implementation']}, for which transformers builds a block-diagonal causal mask from the "
        f"restarting `position_ids`; checked before training on {check['sequences']} episodes in fp32 through TRL's "
        "own forward: packed vs each alone, per-token log-probabilities differ by "
        f"{check['max_abs_diff_token_log_prob']:.1e} at most, the mean loss by {check['abs_diff_mean_loss']:.1e}.",
        "- Ours packs each batch's episodes into balanced rows, computes logits only at trained positions, keeps the "
        f"frozen backbone in {runs['ours']['frozen_dtype']} (LoRA weights float32), uses fused AdamW and skips PEFT's "
        "adapter-input casts under autocast.",
        "",
        f"Timing: median s/step and tokens/s over the steps after the first {WARMUP_STEPS}; all tokens = the "
        "episodes' tokens (padding left out, the same count on every path); positions = what the model computes, "
        "padding included.",
        "",
        "| path | s/step | trained tokens/s | all tokens/s | positions/step | peak RSS (MB) | loss, first step | "
        "loss, last 5 steps |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    labels = {"baseline": "baseline: Trainer + get_peft_model, padded, full logits",
              "trl": "TRL SFTTrainer, padding-free, completion-only, fused LM head",
              "ours": "ours: train(), packed, logits at trained positions, bf16 frozen backbone",
              "ours_fp32": "ours, fp32 backbone", "ours_8bit": "ours, 8-bit backbone",
              "ours_4bit": "ours, 4-bit backbone"}
    for name in (*PEERS, "ours"):
        r = runs[name]
        lines.append(f"| {labels[name]} | {r['seconds_per_step']:.2f} | {r['trained_tokens_per_s']:.0f} | "
                     f"{r['tokens_per_s']:.0f} | {r['positions_per_step']:.0f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['first_loss']:.3f} | "
                     f"{r['last_loss']:.3f} |")
    lines += ["", "Speed-up of ours in trained tokens/s:", "",
              f"- over TRL SFTTrainer padding-free: **{result['speedup_trained_tokens_per_s_vs_trl']:.2f}x** (target "
              f">= 1.3x); loss curves (10-step moving averages) differ by "
              f"{result['loss_curve_max_abs_diff_vs_trl']:.3f} at most;",
              f"- over Trainer + get_peft_model: **{result['speedup_trained_tokens_per_s']:.2f}x** (target >= 1.5x); "
              f"loss curves differ by {result['loss_curve_max_abs_diff']:.3f} at most.",
              "", f"Quantised backbones ({result['quant_steps']} steps each, fp32 compute, gradient checkpointing as "
              "in QLoRA, the same episodes):", "",
              "| backbone | s/step | model weights (MB) | peak RSS (MB) | loss, last 5 steps |",
              "|---|---:|---:|---:|---:|"]
    for name in ("ours_fp32", "ours_8bit", "ours_4bit"):
        r = runs[name]
        lines.append(f"| {labels[name]} | {r['seconds_per_step']:.2f} | {r['weight_bytes'] / 2**20:.0f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['last_loss']:.3f} |")
    env = result["environment"]
    lines += ["", f"4-bit / fp32 peak RSS: **{result['rss_ratio_4bit_vs_fp32']:.2f}** (target <= 0.6); model weights "
              f"alone: {result['weight_bytes_ratio_4bit_vs_fp32']:.2f}.", "",
              provenance_line(env), *encoder_lines(out)]
    (out / f"{NAME}.md").write_text("\n".join(lines) + "\n")

    figure = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    for name, style in zip((*PEERS, "ours"), ("-", "--", ":")):  # the curves nearly coincide: tell them apart
        left.plot(range(1, len(runs[name]["losses"]) + 1), moving_average(runs[name]["losses"]), style,
                  label=labels[name])
    left.set_xlabel("optimiser step")
    left.set_ylabel("training loss (10-step moving average)")
    left.legend(fontsize=7)
    right.bar(range(len(RUNS)), [runs[n]["peak_rss_mb"] for n in RUNS])
    right.set_xticks(range(len(RUNS)), ["baseline", "TRL", "ours", "ours fp32", "8-bit", "4-bit"], fontsize=8)
    right.set_ylabel("peak RSS (MB)")
    figure.suptitle(f"{result['model']} + LoRA, trained tokens/s of ours: "
                    f"{result['speedup_trained_tokens_per_s_vs_trl']:.2f}x TRL padding-free, "
                    f"{result['speedup_trained_tokens_per_s']:.2f}x Trainer")
    figure.savefig(out / f"{NAME}.png", dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8, help="episodes per optimiser step")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--quant-steps", type=int, default=10, help="steps of the fp32 / 8-bit / 4-bit runs")
    parser.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16", "fp16"])
    parser.add_argument("--quick", action="store_true", help="10 steps, 4 quantised steps")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--render", action="store_true",
                        help=f"measure nothing: rewrite {NAME}.md / .png from {NAME}.json (and {ENCODER}.json) in --out")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--episodes", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.render:
        write_results(json.loads((args.out / f"{NAME}.json").read_text()), args.out)
        return
    args.cpu = not __import__("torch").cuda.is_available()
    if args.worker:
        worker(args)
        return
    if args.quick:
        args.steps, args.quant_steps = min(args.steps, 10), min(args.quant_steps, 4)
    if min(args.steps, args.quant_steps) <= WARMUP_STEPS:
        parser.error(f"--steps and --quant-steps must be > {WARMUP_STEPS} (the warm-up left out of the timing)")
    from tqdm import tqdm

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        args.episodes = str(Path(tmp) / "episodes.json")
        count = max(args.steps, args.quant_steps) * args.batch_size
        Path(args.episodes).write_text(json.dumps(episodes(args.model, count, args.max_length)))
        for name in tqdm(RUNS, desc="speed runs", unit="run"):
            runs[name] = measure(args, name)
    base, trl_run, ours = runs["baseline"], runs["trl"], runs["ours"]
    # the same episodes in the same batches: every path trains the same number of tokens at every step
    mismatched = [name for name in PEERS if runs[name]["trained_tokens_per_step"] != ours["trained_tokens_per_step"]]
    result = {
        "benchmark": NAME, "model": args.model, "steps": args.steps, "batch_size": args.batch_size,
        "max_length": args.max_length, "quant_steps": args.quant_steps, "lora": LORA, "runs": runs,
        "trained_tokens_per_step_equal": {name: name not in mismatched for name in PEERS},
        "speedup_trained_tokens_per_s": ours["trained_tokens_per_s"] / base["trained_tokens_per_s"],
        "speedup_seconds_per_step": base["seconds_per_step"] / ours["seconds_per_step"],
        "loss_curve_max_abs_diff": loss_curve_diff(base, ours),
        "speedup_trained_tokens_per_s_vs_trl": ours["trained_tokens_per_s"] / trl_run["trained_tokens_per_s"],
        "speedup_seconds_per_step_vs_trl": trl_run["seconds_per_step"] / ours["seconds_per_step"],
        "loss_curve_max_abs_diff_vs_trl": loss_curve_diff(trl_run, ours),
        "rss_ratio_4bit_vs_fp32": runs["ours_4bit"]["peak_rss_mb"] / runs["ours_fp32"]["peak_rss_mb"],
        "rss_ratio_8bit_vs_fp32": runs["ours_8bit"]["peak_rss_mb"] / runs["ours_fp32"]["peak_rss_mb"],
        "weight_bytes_ratio_4bit_vs_fp32": runs["ours_4bit"]["weight_bytes"] / runs["ours_fp32"]["weight_bytes"],
        "environment": environment_record(),
    }
    write_results(result, args.out)
    print((args.out / f"{NAME}.md").read_text())
    if mismatched:
        sys.exit(f"trained tokens per step differ from ours for {mismatched}: the paths did not train the same tokens")


if __name__ == "__main__":
    main()
