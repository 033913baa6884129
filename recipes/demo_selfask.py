"""The main job (`make demo`): fine-tune SmolLM2-135M for recursive self-ask, then watch it decompose questions.

1. Train the self-ask LoRA with ``accelerate launch`` from the shipped configs: ``recipes/selfask_sft.py --config
   recipes/configs/smollm2/selfask_lora.yaml`` on 2 CPU processes (``recipes/accelerate/cpu_2proc.yaml``; one
   GPU process with ``single_gpu.yaml`` where CUDA is available), on the demo's shorter schedule (`DEMO_SCHEDULE`:
   100 steps at twice the learning rate instead of 200, no LoRA dropout, whose random masks were a quarter of a
   CPU step; no self-ask evaluation inside training, since steps 2-4 do it; the held-out loss on 40 trees, not
   120). Training trees: MuSiQue, the ProbTree trees of HotpotQA and MuSiQue and 2WikiMultiHopQA training
   questions, never Compositional Celebrities or Bamboogle.
2. Print the adapter's size, then answer three Compositional Celebrities questions with it, showing each trace;
   follow-ups are answered by the MiniLM retriever over the questions' own gold sub-answers (``Q1/A1``,
   ``Q2/A2``), so the score measures the decomposition.
3. Answer one held-out deep question (a 2WikiMultiHopQA bridge comparison, never trained on) with a retriever that
   knows only the leaf facts: a follow-up that is itself compositional finds nothing there, and the model self-asks
   it one layer deeper (``max_depth`` 2); its last follow-up compares the two dates found in an operator's template,
   and the operator computes it (`peftprompt.operators`). The trace shows every layer and who answered it.
4. Print exact match before (the base model, few-shot self-ask: the 4-shot prompt of Press et al.) and after
   fine-tuning (zero-shot self-ask with the adapter) on ``--n`` Compositional Celebrities questions drawn at random
   (seed 0).

Each step prints the minutes it took; ``--output_dir``/demo_summary.json records them with the scores
(`benchmarks/demo_time.py` turns it into ``benchmarks/results/demo_time.{json,md}``).

    .venv/bin/python recipes/demo_selfask.py [--output_dir outputs/demo_selfask] [--n 100] [key=value ...]

``key=value`` arguments go to the training config after `DEMO_SCHEDULE` (e.g. ``max_steps=20`` for a quick look;
``max_steps=200 method_args.lora_dropout=0.1`` trains the shipped schedule). Training resumes from
the newest checkpoint in ``--output_dir``: an interrupted demo continues, a finished one goes straight to the
questions; delete the directory to train from scratch.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import time
from pathlib import Path

from rich.console import Console
from transformers.utils import logging as transformers_logging

from peftprompt import load_adapter, load_backbone, merged_for_inference
from peftprompt.adapters import directory_bytes
from peftprompt.atomic import write_file_atomically
from peftprompt.recursive import Node, convert
from peftprompt.recursive.sources import deep_eval_trees
from peftprompt.report import format_bytes
from peftprompt.selfask import FEW_SHOT_SELF_ASK, AnswererChain, OperatorAnswerer, RetrieverAnswerer, SelfAskRunner
from peftprompt.selfask.evaluate import evaluate_selfask, knowledge_base, sample_trees
from peftprompt.selfask.show import print_run
from peftprompt.training.recipe import launch_command
from peftprompt.metrics import exact_match

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "recipes/configs/smollm2/selfask_lora.yaml"
SOURCE = "compositional_celebrities"
SHOWN = 3
DEEP_QUESTION = "Which film has the director who died later, The More The Merrier or Sleep, My Love?"
DEMO_SCHEDULE = ["max_steps=100", "learning_rate=2e-3", "method_args.lora_dropout=0.0", "data.generate_eval=0",
                 "max_eval_samples=40"]
"""The demo's overrides of the shipped config, aimed at ten minutes on 2 CPU cores with exact match >= 0.78
(minutes by CPU: `benchmarks/results/demo_time*`)."""


def train_command(output_dir: Path, overrides: list[str]) -> tuple[list[str], dict]:
    """The ``accelerate launch`` command line of the self-ask recipe (2 CPU processes, or one GPU), resuming from
    the newest checkpoint in `output_dir`, and its environment."""
    return launch_command(REPO / "recipes/selfask_sft.py", CONFIG,
                          [f"output_dir={output_dir}", "resume_from=latest", *DEMO_SCHEDULE, *overrides],
                          processes=2)


def deep_question() -> Node:
    """`DEEP_QUESTION`'s tree from the held-out deep questions (the first bridge comparison if it is missing)."""
    trees, _ = deep_eval_trees()
    return next((t for t in trees if t.question == DEEP_QUESTION),
                next(t for t in trees if t.meta.get("type") == "bridge_comparison"))


def score(runner: SelfAskRunner, trees: list[Node]) -> dict:
    return evaluate_selfask(trees, runner, "self_ask", sub_question_check=False, return_records=True)


class Clock:
    """Minutes since the job started, and per section, printed as the demo goes."""

    def __init__(self, console: Console):
        self.console, self.started = console, time.perf_counter()
        self.section = self.started
        self.minutes: dict[str, float] = {}

    def lap(self, what: str) -> None:
        now = time.perf_counter()
        self.console.print(f"({what}: {(now - self.section) / 60:.1f} min; {(now - self.started) / 60:.1f} min in all)",
                           style="dim", markup=False)
        self.minutes[what] = (now - self.section) / 60
        self.section = now


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/demo_selfask"))
    parser.add_argument("--n", type=int, default=100, help="questions scored before and after (default 100)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="training config overrides")
    args = parser.parse_args(argv)
    if args.n < SHOWN:
        parser.error(f"--n must be >= {SHOWN}, got {args.n}")
    console = Console(soft_wrap=True, highlight=False)
    clock = Clock(console)

    console.rule("1. Fine-tune SmolLM2-135M-Instruct for self-ask (LoRA, accelerate launch)")
    command, env = train_command(args.output_dir.resolve(), args.overrides)
    console.print(f"$ {shlex.join(command)}", style="bold")
    if subprocess.run(command, cwd=REPO, env=env).returncode != 0:
        raise SystemExit("demo: training failed; its output is above (the adapter of an earlier run, if any, is "
                         f"untouched in {args.output_dir / 'adapter'})")
    clock.lap("training")
    adapter_dir = args.output_dir / "adapter"
    trained = json.loads((args.output_dir / "results.json").read_text())
    console.print(f"adapter {adapter_dir}: "
                  f"{format_bytes(directory_bytes(adapter_dir))} ({trained['trainable_params']:,} trainable "
                  f"parameters, {trained['trainable_pct']:.2f} % of the model)")

    transformers_logging.set_verbosity_error()
    trees = sample_trees(convert(SOURCE), args.n, seed=0)
    retriever = RetrieverAnswerer(knowledge_base(trees))
    answerer = AnswererChain([OperatorAnswerer(), retriever])  # as the shipped config's operators+retriever
    base, tokenizer = load_backbone("smollm2-135m", task="causal_lm")
    tuned = merged_for_inference(load_adapter(load_backbone("smollm2-135m", task="causal_lm")[0], adapter_dir))

    console.rule(f"2. Fine-tuned self-ask on {SHOWN} Compositional Celebrities questions (follow-ups: retriever)")
    after = score(SelfAskRunner(tuned, tokenizer, answerer=answerer, progress="fine-tuned self-ask"), trees)
    for record in after["records"][:SHOWN]:
        verdict = "correct" if record["correct"] else f"wrong; gold: {' | '.join(record['gold'])}"
        print_run(console, Node.from_dict(record["trace"]), record["answer"], record["text"], verdict)
        console.print()
    clock.lap(f"loading the models and fine-tuned self-ask on {len(trees)} questions")

    console.rule("3. A held-out deep question; the retriever knows only the leaf facts, operators compare (max_depth 2)")
    deep = deep_question()
    leaves = RetrieverAnswerer(knowledge_base([deep], leaves_only=True), model=retriever.model,
                               tokenizer=retriever.tokenizer)
    deep_run = SelfAskRunner(tuned, tokenizer, answerer=AnswererChain([OperatorAnswerer(), leaves]),
                             max_depth=2).run(deep.question)
    correct = "correct" if exact_match(deep_run.answer, [deep.answer, *deep.aliases]) else f"wrong; gold: {deep.answer}"
    print_run(console, deep_run.trace, deep_run.answer, deep_run.text,
              f"{correct}; {deep_run.generated_tokens} tokens generated; leaf facts: "
              + "; ".join(f"{q} -> {a}" for q, a in leaves.facts))
    clock.lap("the deep question")

    console.rule(f"4. Exact match on {len(trees)} Compositional Celebrities questions (random sample, seed 0)")
    before = score(SelfAskRunner(base.eval(), tokenizer, answerer=answerer, few_shot=FEW_SHOT_SELF_ASK,
                                 progress="few-shot self-ask (base model)"), trees)
    for name, result in (("before: base model, few-shot self-ask", before),
                         ("after:  LoRA adapter, zero-shot self-ask", after)):
        console.print(f"{name}  EM {result['em']:.3f}  F1 {result['f1']:.3f}  "
                      f"well-formed {result['well_formed']:.3f}  follow-ups/question {result['mean_follow_ups']:.2f}")
    clock.lap("the base model's few-shot self-ask")
    summary = {"minutes": clock.minutes, "total_minutes": sum(clock.minutes.values()), "n": len(trees),
               "schedule": DEMO_SCHEDULE + args.overrides, "deep_question_correct": bool(correct == "correct"),
               "deep_question_operator": next((c.meta["operator"] for c in deep_run.trace.children
                                               if "operator_answer" in c.meta), None),
               **{f"{key}_{metric}": result[metric] for key, result in (("before", before), ("after", after))
                  for metric in ("em", "f1", "well_formed")}}
    write_file_atomically(args.output_dir / "demo_summary.json", lambda f: json.dump(summary, f, indent=2))


if __name__ == "__main__":
    main()
