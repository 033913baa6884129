"""Self-ask that keeps learning from its own verified traces, round after round.

1. Round 0: ``--pool-size`` questions of ``--pool-source`` (a training source; default 2WikiMultiHopQA's 498 training
   questions) are held back as the unlabelled pool; the self-ask LoRA trains (``recipes/selfask_sft.py`` under
   ``accelerate launch``, ``--config`` and the ``key=value`` overrides) on the config's sources without them.
2. Every round is scored: exact match on ``--n-eval`` held-out questions (the ProbTree 2WikiMultiHopQA dev trees,
   never trained on; follow-ups answered by the MiniLM retriever over their leaf facts only) and on ``--n-eval``
   Compositional Celebrities questions (follow-ups answered from their gold sub-answers, as ``make demo`` does).
3. Round r >= 1: the adapter of round r - 1 self-asks the next ``--questions-per-round`` pool questions (follow-ups
   answered by the retriever over those questions' leaf facts only); runs that pass the verifier (a well-formed run
   whose final answer is an exact match of the gold answer; `peftprompt.selfask.continual`) become trees, and the
   adapter goes on training (``init_adapter``) for ``--round-epochs`` epochs at ``--round-lr`` on every verified tree
   so far plus ``--replay`` times as many original training trees.

Compositional Celebrities and Bamboogle are never trained on (`check_trainable` refuses them in every round). Each
round lives in ``--output_dir/round-<r>/`` (``train_trees.jsonl``, the training run with its ``adapter/``,
``verified.jsonl``, ``eval.json``); a round whose files are there is not repeated, so an interrupted run continues.
``--output_dir/selfask_continual.json`` has every round's scores and the trees kept.

    .venv/bin/python recipes/selfask_continual.py [--rounds 3] [--questions-per-round 100] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from transformers.utils import logging as transformers_logging

from peftprompt import load_adapter, load_backbone, merged_for_inference
from peftprompt.atomic import write_file_atomically
from peftprompt.recursive import Node, check_trainable, convert, load_trees, read_trees, write_trees
from peftprompt.recursive.sources import drop_overlap
from peftprompt.selfask import RetrieverAnswerer, SelfAskRunner
from peftprompt.selfask.continual import VERIFIER, replay_sample, split_pool, verified_trees
from peftprompt.selfask.evaluate import evaluate_selfask, knowledge_base, sample_trees
from peftprompt.training import load_config
from peftprompt.training.data_config import SelfAskData
from peftprompt.training.recipe import launch_command

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "recipes/configs/smollm2/selfask_lora.yaml"
HELD_OUT = "probtree_2wiki"
CELEBRITIES = "compositional_celebrities"
KNOWLEDGE = {
    "pool": "leaf facts of the pool question's own gold tree (retriever)",
    "held_out": "leaf facts only (retriever)",
    CELEBRITIES: "gold sub-answers (retriever)",
}


def train_round(round_dir: Path, config: Path, overrides: list[str], processes: int) -> None:
    """Train (or finish training) one round into `round_dir` with ``selfask_sft.py`` on `processes` CPU processes
    (`launch_command`); skipped when done."""
    if (round_dir / "results.json").is_file():
        return
    command, env = launch_command(REPO / "recipes/selfask_sft.py", config,
                                  [*overrides, f"output_dir={round_dir}", "resume_from=latest"], processes=processes)
    print("$", " ".join(command), file=sys.stderr, flush=True)
    if subprocess.run(command, cwd=REPO, env=env).returncode != 0:
        raise SystemExit(f"selfask_continual: training {round_dir.name} failed; its output is above")


def score(runner: SelfAskRunner, trees: list[Node]) -> dict:
    result = evaluate_selfask(trees, runner, "self_ask", sub_question_check=False)
    return {key: result[key] for key in ("n", "em", "f1", "well_formed", "mean_follow_ups")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=CONFIG, help="the self-ask training config of every round")
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/selfask_continual"))
    parser.add_argument("--rounds", type=int, default=3, help="rounds of learning from verified traces after round 0")
    parser.add_argument("--pool-source", default="2wikimultihopqa", help="training source the pool is drawn from")
    parser.add_argument("--pool-size", type=int, default=300)
    parser.add_argument("--questions-per-round", type=int, default=100)
    parser.add_argument("--replay", type=float, default=1.0, help="original trees replayed per verified tree")
    parser.add_argument("--round-epochs", type=float, default=2.0)
    parser.add_argument("--round-lr", type=float, default=5e-4)
    parser.add_argument("--n-eval", type=int, default=100, help="held-out and Compositional Celebrities questions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--processes", type=int, choices=(1, 2), default=2,
                        help="training processes per round on a CPU (2: accelerate launch, as make demo; 1: one plain "
                             "process)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="training config overrides (every round)")
    args = parser.parse_args(argv)
    if args.rounds * args.questions_per_round > args.pool_size:
        parser.error(f"--rounds x --questions-per-round ({args.rounds * args.questions_per_round}) exceeds "
                     f"--pool-size ({args.pool_size})")
    out = args.output_dir.resolve()
    started = time.perf_counter()
    config = load_config(args.config, args.overrides)
    if not isinstance(config.data, SelfAskData) or not config.data.sources:
        parser.error(f"{args.config} names no data.sources to train round 0 on (a self-ask config, task causal_lm)")
    sources = [s for s in config.data.sources if s != args.pool_source]
    original = [tree for source in sources for tree in load_trees(source)]
    pool_training, pool = split_pool(convert(args.pool_source), args.pool_size, seed=args.seed)
    original, overlapping = drop_overlap(original + pool_training, pool)  # a pool question is never a gold tree
    check_trainable(original)
    held_out, as_training = drop_overlap(sample_trees(convert(HELD_OUT), args.n_eval, seed=args.seed), original)
    celebrities = sample_trees(convert(CELEBRITIES), args.n_eval, seed=args.seed)

    transformers_logging.set_verbosity_error()
    retriever = RetrieverAnswerer(knowledge_base(celebrities))
    answerers = {
        "held_out": RetrieverAnswerer(knowledge_base(held_out, leaves_only=True), model=retriever.model,
                                      tokenizer=retriever.tokenizer),
        CELEBRITIES: retriever,
    }
    rounds, verified = [], []
    adapter = None  # the adapter of the latest round that trained
    for r in range(args.rounds + 1):
        round_dir = out / f"round-{r}"
        train_file = round_dir / "train_trees.jsonl"
        round_started = time.perf_counter()
        record = {"round": r}
        if r == 0:
            trees = original
            overrides = args.overrides
        else:
            asked = pool[(r - 1) * args.questions_per_round: r * args.questions_per_round]
            kept_file = round_dir / "verified.jsonl"
            if not kept_file.is_file():
                model, tokenizer = load_backbone(config.model, task="causal_lm")
                model = merged_for_inference(load_adapter(model, adapter))
                facts = RetrieverAnswerer(knowledge_base(asked, leaves_only=True), model=retriever.model,
                                          tokenizer=retriever.tokenizer)
                runner = SelfAskRunner(model, tokenizer, answerer=facts, progress=f"round {r}: pool questions")
                new = verified_trees(asked, runner.run_batch([tree.question for tree in asked]), round_index=r)
                round_dir.mkdir(parents=True, exist_ok=True)
                write_trees(kept_file, new)
            new = read_trees(kept_file)
            verified += new
            trees = verified + replay_sample(original, round(args.replay * len(verified)), seed=args.seed + r)
            record.update(asked=len(asked), verified=len(new), verified_share=len(new) / len(asked),
                          trained_verified=len(verified))
            overrides = [*args.overrides, f"init_adapter={adapter}", "max_steps=null",
                         f"num_epochs={args.round_epochs}", f"learning_rate={args.round_lr}", "data.generate_eval=0"]
        check_trainable(trees)
        record["trained_trees"] = len(trees)
        if trees:  # nothing verified yet: the round keeps the adapter it has
            if not train_file.is_file():
                write_trees(train_file, trees)
            train_round(round_dir, args.config, [*overrides, f"data.sources=[{train_file}]"], args.processes)
            adapter = round_dir / "adapter"
        record["adapter"] = str(adapter)
        evaluation = round_dir / "eval.json"
        if not evaluation.is_file():
            model, tokenizer = load_backbone(config.model, task="causal_lm")
            model = merged_for_inference(load_adapter(model, adapter))
            scores = {name: score(SelfAskRunner(model, tokenizer, answerer=answerer, progress=f"round {r}: {name}"),
                                  held_out if name == "held_out" else celebrities)
                      for name, answerer in answerers.items()}
            write_file_atomically(evaluation, lambda f: json.dump(scores, f, indent=2))
        record.update(json.loads(evaluation.read_text()), seconds_this_run=time.perf_counter() - round_started)
        rounds.append(record)
        print(f"round {r}: held-out EM {record['held_out']['em']:.3f}, Compositional Celebrities EM "
              f"{record[CELEBRITIES]['em']:.3f}" + (f"; {record['verified']} of {record['asked']} pool runs verified"
                                                    if r else ""), file=sys.stderr, flush=True)
    summary = {
        "config": str(args.config), "overrides": args.overrides, "pool_source": args.pool_source,
        "pool_size": args.pool_size, "questions_per_round": args.questions_per_round, "replay": args.replay,
        "round_epochs": args.round_epochs, "round_lr": args.round_lr, "verifier": VERIFIER, "knowledge": KNOWLEDGE,
        "original_trees": len(original), "original_dropped_as_pool": len(overlapping),
        "held_out": {"source": HELD_OUT, "n": len(held_out), "dropped_as_training": len(as_training)},
        "rounds": rounds, "wall_seconds": time.perf_counter() - started,
    }
    write_file_atomically(out / "selfask_continual.json", lambda f: json.dump(summary, f, indent=2))
    print(f"summary: {out / 'selfask_continual.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
