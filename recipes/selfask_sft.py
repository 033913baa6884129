"""Self-ask supervised fine-tuning of SmolLM2-135M on decomposition trees, with the recursive collator.

    accelerate launch recipes/selfask_sft.py --config recipes/configs/smollm2/selfask_lora.yaml [key=value ...]

Every ``data.<key>`` below is a field of the typed section `peftprompt.training.data_config.SelfAskData` (its
defaults, its checks: a bad value is refused when the config is loaded, with its file and line).
Training trees come from ``data.sources`` (default: MuSiQue's gold decompositions, the ProbTree trees of HotpotQA and
MuSiQue and the 2WikiMultiHopQA training questions; a name of `peftprompt.recursive.SOURCES` or a ``.jsonl`` file of
trees); evaluation-only sets (Compositional Celebrities, Bamboogle) are refused.
Comparison trees end with their operator step (`peftprompt.recursive.operator_steps`), whose answer is computed and
masked; ``data.operator_steps=false`` takes those steps out, so the model learns to compare in words, and
``data.mirror_comparisons=true`` adds every date comparison asked the other way round ("born first" -> "born later",
the other answer), so ``earlier`` and ``later`` steps are as frequent (`training_trees`). The ProbTree
2WikiMultiHopQA trees (``data.eval_sources``) are held out and scored by loss, and with ``data.generate_eval=N``
also by generation: the first N held-out questions are answered by recursive self-ask and scored by exact match,
token F1 and well-formed rate. Their follow-ups go to ``data.eval_answerers`` (one name per layer, the last
repeating: ``retriever``, ``model``, ``operators+retriever`` or a tool ``module:function``; default
``[operators+retriever]``), the retriever holding the trees' own sub-answers (``data.eval_knowledge``: ``leaves``,
the default, or ``all`` nodes); what it cannot answer the model self-asks, down to ``data.eval_max_depth``
(default 2).
Reader episodes (``data.reader_sources``: open-book sources such as ``2wikimultihopqa_context``, ``musique_context``
and ``hotpotqa_distractor``, train split only; default none) teach answering one follow-up from retrieved paragraphs:
one per gold hop (or question, for HotpotQA) with ``data.reader_passages`` paragraphs (default 3: its gold ones and
distractors from the same question), each cut to ``data.reader_max_words`` words (default 120), and with
``data.reader_unanswerable`` (a share, default 0) as many more without their gold paragraphs, answered ``unknown``; see
`peftprompt.retrieval.reader`. They are shuffled in with the tree episodes; ``data.sources: []`` with reader sources
trains a reader-only adapter. ``max_train_samples`` caps the trees and the reader examples each. Evaluation stays on
the held-out trees.
Episodes are unrolled (``data.mode``: flat, recursive or mix, see `peftprompt.recursive.unroll`), tokenised once and
packed over the data set into rows of ``max_length`` (``data.packing``: auto, true or false). Prompt tuning, P-tuning
and prefix tuning train on padded episodes instead, one per row (``data.packing: true`` with them is refused): PEFT
drops the ``position_ids`` of the first two and prefix tuning's ``past_key_values`` turn off transformers'
block-diagonal mask, so packed episodes would attend to each other.
"""

from __future__ import annotations

import random
import sys
from collections import Counter
from typing import Optional, Sequence

from peftprompt.errors import InputError
from peftprompt.methods import PROMPT_LEARNING_METHODS
from peftprompt.recursive import (
    EpisodeEncoder,
    SelfAskCollator,
    Unroller,
    check_trainable,
    convert,
    pack_rows,
    training_trees,
)
from peftprompt.recursive.operator_steps import without_operator_steps
from peftprompt.recursive.unroll import Episode
from peftprompt.retrieval.passages import read_questions
from peftprompt.retrieval.reader import reader_examples
from peftprompt.selfask import SelfAskRunner, answerers_from_names
from peftprompt.selfask.evaluate import evaluate_selfask, knowledge_base
from peftprompt.training import build_model, distributed_state, train
from peftprompt.training.data_config import SelfAskData
from peftprompt.training.recipe import parse_recipe_args, run_recipe, ship


def reader_training_episodes(config) -> list[Episode]:
    """Reader episodes of the train split of ``data.reader_sources`` (``data.reader_passages`` paragraphs each, cut
    to ``data.reader_max_words`` words, and ``data.reader_unanswerable`` more without their gold paragraphs), at
    most ``config.max_train_samples`` (a seeded sample)."""
    data = config.data
    try:
        questions = [q for source in data.reader_sources for q in read_questions(source, "train")]
    except InputError as err:
        raise SystemExit(f"selfask_sft: data.reader_sources: {err}") from None
    examples = reader_examples(questions, passages_per_example=data.reader_passages, seed=config.seed,
                               unanswerable=data.reader_unanswerable)
    random.Random(config.seed).shuffle(examples)
    return [example.episode(max_words=data.reader_max_words) for example in examples[: config.max_train_samples]]


def unroller_for(config) -> Unroller:
    """The `Unroller` of ``data.mode`` (flat, recursive or mix) and ``data.leaf_episodes`` (recursive and mix: also
    a ``No.`` episode per leaf)."""
    return Unroller(mode=config.data.mode, leaf_episodes=config.data.leaf_episodes)


def is_prompt_learning(method: str) -> bool:
    """Whether `method` is one of PEFT's prompt-learning methods (prompt tuning, P-tuning, prefix tuning), whose
    virtual tokens would let packed episodes attend to each other."""
    return method in PROMPT_LEARNING_METHODS


def uses_packing(config) -> bool:
    """``data.packing``: true, false, or auto (packed unless the method is prompt learning, with which true is
    refused when the config is loaded)."""
    packing = config.data.packing
    return not is_prompt_learning(config.method) if packing == "auto" else packing


def episode_rows(trees, tokenizer, config, unroller: Unroller, packing: bool, episodes: Sequence[Episode] = (),
                 dropped: Optional[Counter] = None) -> list[dict]:
    """Episodes of `trees` and the ready-made `episodes` (reader episodes), tokenised and shuffled together, then
    packed by `pack_rows` into rows of ``config.max_length`` or, without `packing`, one episode a row.

    Episodes over ``config.max_length`` tokens are dropped; `dropped`, if given, counts them under ``"trees"`` and
    ``"episodes"``."""
    encoder = EpisodeEncoder(tokenizer, max_length=config.max_length, unroller=unroller)
    rows = [e.as_features() for e in encoder.encode_all(trees)]
    from_trees = encoder.dropped.total()
    rows += [e.as_features() for e in map(encoder.encode, episodes) if e is not None]
    if dropped is not None:
        dropped.update(trees=from_trees, episodes=encoder.dropped.total() - from_trees)
    random.Random(config.seed).shuffle(rows)
    return pack_rows(rows, config.max_length) if packing else rows


def generation_eval(trees, tokenizer, answerers: list[str], leaves_only: bool, max_depth: int):
    """An `evaluate_fn` for `train`: self-ask on `trees` (main process), follow-ups answered per layer by
    `answerers` with a retriever over the trees' own sub-answers (only the leaves' with `leaves_only`)."""
    layers = None

    def evaluate_fn(model, accelerator) -> dict:
        nonlocal layers
        if not accelerator.is_main_process:
            return {}
        if layers is None:
            layers = answerers_from_names(answerers, knowledge_base(trees, leaves_only=leaves_only))
        runner = SelfAskRunner(model, tokenizer, answerer=layers, max_depth=max_depth)
        scores = evaluate_selfask(trees, runner, "self_ask", sub_question_check=False)
        return {"selfask_em": scores["em"], "selfask_f1": scores["f1"], "selfask_well_formed": scores["well_formed"]}

    return evaluate_fn


def main(argv=None) -> None:
    config = parse_recipe_args(__doc__, argv, data=SelfAskData)
    data = config.data
    if config.metrics is not None:
        raise SystemExit("selfask_sft: field 'metrics' is not used by this recipe (it reports the eval loss, and "
                         "self-ask EM / F1 with data.generate_eval=N): remove it")
    packing = uses_packing(config)
    unroller = unroller_for(config)
    train_trees = training_trees(data.sources, data.mirror_comparisons)
    if not data.operator_steps:
        train_trees = [without_operator_steps(tree) for tree in train_trees]
    check_trainable(train_trees, allow_evaluation_only=data.allow_evaluation_only)
    random.Random(config.seed).shuffle(train_trees)
    train_trees = train_trees[: config.max_train_samples]
    eval_trees = [tree for source in data.eval_sources for tree in convert(source)][: config.max_eval_samples]
    readers = reader_training_episodes(config)

    model, tokenizer = build_model(config)
    dropped: Counter = Counter()
    train_rows = episode_rows(train_trees, tokenizer, config, unroller, packing, readers, dropped)
    if distributed_state().is_main_process:
        print(f"selfask_sft: {len(train_trees)} training trees ({dropped['trees']} of their episodes over "
              f"max_length={config.max_length} dropped); {len(readers)} reader episodes "
              f"({dropped['episodes']} over max_length dropped)", file=sys.stderr)
    eval_rows = episode_rows(eval_trees, tokenizer, config, unroller, packing)
    collator = SelfAskCollator(tokenizer, max_length=config.max_length)
    evaluate_fn = None
    if data.generate_eval:
        evaluate_fn = generation_eval(eval_trees[: data.generate_eval], tokenizer, data.eval_answerers,
                                      leaves_only=data.eval_knowledge == "leaves", max_depth=data.eval_max_depth)
    result = train(config, model, tokenizer, train_rows, collator, eval_rows, evaluate_fn=evaluate_fn)
    metrics = {"eval_loss": result.metrics["loss"], "eval_perplexity": result.metrics.get("perplexity")}
    metrics.update({k: v for k, v in result.metrics.items() if k.startswith("selfask_")})
    ship(result, metrics, data.sources + data.reader_sources)


if __name__ == "__main__":
    run_recipe(main)
