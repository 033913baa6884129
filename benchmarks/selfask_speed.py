"""Self-ask inference speed: questions per second of `evaluate_selfask` (what ``peftprompt eval selfask`` runs per
approach) before and after the runner kept KV caches across steps and 64 questions in flight and the adapter was
merged, with every answer compared, transcript by transcript, against the runner before.

Settings, each in its own process (``--quick``: one process per code; torch's default threads, greedy decoding):

- **before**: the runner at ``--baseline-ref`` (a `git worktree` of that commit on ``PYTHONPATH``): every step
  encodes each whole prompt again, all questions stepped together in `generate` calls of 8;
- **no reuse, 64 in flight**: this commit with ``reuse_kv_cache=False`` (what scheduling alone buys);
- **reuse, 8 in flight** and **reuse, 64 in flight**: each question's KV cache kept from one step to the next and
  the few-shot prefix encoded once (`peftprompt.selfask.kv_cache`), the adapter unmerged;
- **reuse, 64 in flight, merged** (what ``peftprompt eval selfask`` does): as above, the LoRA folded into the
  weights first (`peftprompt.merged_for_inference`). The base model has no adapter: its row repeats the one above.

Approaches: zero-shot self-ask with the fine-tuned adapter (``--adapter``, ``--n`` questions) and the base model's
4-shot self-ask (``--n-few-shot`` questions; its prompts start with a 400-token prefix), on Compositional
Celebrities drawn at random (seed 0); follow-ups answered by the MiniLM retriever over the questions' own gold
sub-answers. Seconds cover `evaluate_selfask` only (models loaded before). Writes ``selfask_speed.{json,md,png}``:

    .venv/bin/python benchmarks/selfask_speed.py [--adapter outputs/demo_selfask/adapter] [--n 100]
        [--n-few-shot 50] [--baseline-ref f295b32] [--model smollm2-135m] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _env import environment_record, provenance_line

NAME = "selfask_speed"
REPO = Path(__file__).resolve().parents[1]
SEED = 0
BASELINE_REF = "f295b32"  # the last commit before KV-cache reuse
SETTINGS = {  # name: (label, runner arguments; None: the runner at --baseline-ref with its defaults)
    "before": ("before (re-encode every step, generate calls of 8)", None),
    "no_reuse_64": ("no reuse, 64 in flight", {"reuse_kv_cache": False, "batch_size": 64}),
    "reuse_8": ("reuse, 8 in flight", {"reuse_kv_cache": True, "batch_size": 8}),
    "reuse_64": ("reuse, 64 in flight", {"reuse_kv_cache": True, "batch_size": 64}),
    "reuse_64_merged": ("reuse, 64 in flight, adapter merged (default)", {"reuse_kv_cache": True, "batch_size": 64}),
}
MERGED = ("reuse_64_merged",)  # settings that fold the adapter into the weights
DEFAULT = "reuse_64_merged"
APPROACHES = {"fine_tuned_self_ask": "fine-tuned, zero-shot", "few_shot_self_ask": "base model, 4-shot"}


def worker(args: argparse.Namespace) -> None:
    """Answer the questions of each job in ``--jobs`` (a setting and an approach) in turn, and write each one's
    seconds, scores and transcripts to its result file."""
    from transformers.utils import logging as transformers_logging

    import peftprompt
    from peftprompt.recursive import convert

    transformers_logging.set_verbosity_error()
    code = Path(peftprompt.__file__).resolve().parents[1]
    if code != Path(args.code).resolve():
        raise SystemExit(f"selfask_speed: imported peftprompt from {code}, expected {args.code}")
    source = convert("compositional_celebrities")
    for job in json.loads(args.jobs):
        Path(job["result"]).write_text(json.dumps(answer(job["setting"], job["approach"], source, args)))


def answer(setting: str, approach: str, source: list, args: argparse.Namespace) -> dict:
    """One setting, one approach: the seconds, scores and transcripts of `evaluate_selfask`."""
    from peftprompt import load_adapter, load_backbone
    from peftprompt.selfask import FEW_SHOT_SELF_ASK, RetrieverAnswerer, SelfAskRunner
    from peftprompt.selfask.evaluate import evaluate_selfask, knowledge_base, sample_trees

    fine_tuned = approach == "fine_tuned_self_ask"
    trees = sample_trees(source, args.n if fine_tuned else args.n_few_shot, seed=SEED)
    retriever = RetrieverAnswerer(knowledge_base(trees))
    model, tokenizer = load_backbone(args.model, task="causal_lm")
    if fine_tuned:
        model = load_adapter(model, args.adapter)
        if setting in MERGED:
            from peftprompt import merged_for_inference  # not in the code measured as before

            model = merged_for_inference(model)
    runner = SelfAskRunner(model.eval(), tokenizer, answerer=retriever, **(SETTINGS[setting][1] or {}),
                           **({} if fine_tuned else {"few_shot": FEW_SHOT_SELF_ASK}))
    started = time.perf_counter()
    scores = evaluate_selfask(trees, runner, "self_ask", sub_question_check=False, return_records=True)
    seconds = time.perf_counter() - started
    records = scores.pop("records")
    return {
        "seconds": seconds, "n": len(trees), "questions_per_second": len(trees) / seconds,
        "model_class": type(model).__name__,  # PeftModel...: the adapter unmerged
        "em": scores["em"], "well_formed": scores["well_formed"],
        "mean_generated_tokens": scores["mean_generated_tokens"],
        "texts": [r["text"] for r in records], "questions": [r["question"] for r in records],
    }


def run_jobs(jobs: list[tuple[str, str]], code: Path, args: argparse.Namespace, out: Path) -> list[dict]:
    """`worker` for the (setting, approach) `jobs` in one fresh process with `code` first on ``PYTHONPATH``."""
    files = [str(out / f"{setting}_{approach}.json") for setting, approach in jobs]
    listed = [{"setting": setting, "approach": approach, "result": file} for (setting, approach), file in zip(jobs, files)]
    env = {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("PEFTPROMPT_DATA", str(REPO.parent / "shared" / "data"))
    subprocess.run([sys.executable, __file__, "--worker", "--code", str(code), "--model", args.model,
                    "--adapter", str(args.adapter.resolve()), "--n", str(args.n), "--n-few-shot", str(args.n_few_shot),
                    "--jobs", json.dumps(listed)], check=True, env=env, cwd=REPO)
    return [json.loads(Path(file).read_text()) for file in files]


def first_difference(a: str, b: str) -> str:
    """The line where two transcripts part, as ``line k: before | after``."""
    for k, (x, y) in enumerate(zip(a.split("\n"), b.split("\n")), start=1):
        if x != y:
            return f"line {k}: {x!r} | {y!r}"
    return "one transcript is longer"


def compare(before: dict, after: dict) -> dict:
    """How many transcripts are identical, and where the others part."""
    pairs = list(zip(before["questions"], before["texts"], after["texts"]))
    differing = [{"question": q, "where": first_difference(a, b)} for q, a, b in pairs if a != b]
    return {"identical": len(pairs) - len(differing), "of": len(pairs), "differing": differing}


def write_results(result: dict, out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Self-ask inference speed on {result['model']}: questions per second, before and after KV-cache "
             "reuse and merging the adapter", "",
             f"Compositional Celebrities questions drawn at random (seed {SEED}); follow-ups answered by the MiniLM "
             "retriever over the questions' gold sub-answers; greedy decoding; seconds of `evaluate_selfask` (what "
             "`peftprompt eval selfask` runs per approach), models already loaded; each setting in its own process. "
             f"Before: the runner at commit {result['baseline_ref']}. Identical: transcripts equal to before's, "
             "character for character.", "",
             "| approach | setting | questions | seconds | questions/s | speed-up | EM | well-formed | identical |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for approach, label in APPROACHES.items():
        runs = result["runs"][approach]
        for setting, (name, _) in SETTINGS.items():
            r = runs[setting]
            same = r.get("vs_before", {"identical": r["n"], "of": r["n"]})
            lines.append(f"| {label} | {name} | {r['n']} | {r['seconds']:.1f} | {r['questions_per_second']:.2f} | "
                         f"{r['speedup']:.2f}x | {r['em']:.3f} | {r['well_formed']:.3f} | "
                         f"{same['identical']}/{same['of']} |")
    target = result["target"]
    lines += ["", f"Fine-tuned self-ask, default settings: **{target['speedup']:.2f}x** the questions per second of "
              f"before (target >= 2x), {target['identical']}/{target['of']} transcripts identical."]
    differing = [(approach, setting, d) for approach in APPROACHES for setting in SETTINGS
                 for d in result["runs"][approach][setting].get("vs_before", {}).get("differing", [])]
    if differing:
        lines += ["", "Transcripts that differ from before (where they part):", ""]
        lines += [f"- {APPROACHES[a]}, {SETTINGS[s][0]}: {d['question']} — {d['where']}" for a, s, d in differing]
    lines += ["", provenance_line(result["environment"])]
    (out / f"{NAME}.md").write_text("\n".join(lines) + "\n")

    figure = Figure(figsize=(8, 3.8), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    width = 0.8 / len(SETTINGS)
    for i, (setting, (name, _)) in enumerate(SETTINGS.items()):
        values = [result["runs"][a][setting]["questions_per_second"] for a in APPROACHES]
        bars = ax.bar([x + (i - (len(SETTINGS) - 1) / 2) * width for x in range(len(APPROACHES))], values, width,
                      label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(len(APPROACHES)), list(APPROACHES.values()))
    ax.set_ylabel("questions per second")
    ax.set_title(f"self-ask on {result['model']}, Compositional Celebrities "
                 f"({result['environment']['machine']['cpu_model']})", fontsize=9)
    ax.legend(fontsize=8)
    figure.savefig(out / f"{NAME}.png", dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", type=Path, default=Path("outputs/demo_selfask/adapter"),
                        help="the fine-tuned self-ask adapter (default: the one `make demo` trains)")
    parser.add_argument("--model", default="smollm2-135m", help="the base causal LM of the adapter")
    parser.add_argument("--n", type=int, default=100, help="questions for the fine-tuned adapter (default 100)")
    parser.add_argument("--n-few-shot", type=int, default=50, help="questions for the base model (default 50)")
    parser.add_argument("--baseline-ref", default=BASELINE_REF, help="the commit measured as before")
    parser.add_argument("--quick", action="store_true", help="8 questions each, one process per code")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--code", help=argparse.SUPPRESS)
    parser.add_argument("--jobs", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if not (args.adapter / "adapter_config.json").is_file():
        parser.error(f"no adapter at {args.adapter}: train one first (`make demo`)")
    if args.quick:
        args.n = args.n_few_shot = 8
    started = time.perf_counter()
    result: dict = {"benchmark": NAME, "model": args.model, "seed": SEED, "adapter": str(args.adapter),
                    "baseline_ref": args.baseline_ref, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        before_code = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(before_code), args.baseline_ref], cwd=REPO,
                       check=True, capture_output=True)
        try:
            # Full runs: each setting and approach in its own process, so none is timed with another's memory
            # around; --quick: one process per code (before, this commit), as the timings are not the point there.
            jobs = [(setting, approach) for approach in APPROACHES for setting in SETTINGS]
            groups = ([[job for job in jobs if (job[0] == "before") == before] for before in (True, False)]
                      if args.quick else [[job] for job in jobs])
            for group in groups:
                print(", ".join(f"{APPROACHES[a]}: {SETTINGS[s][0]}" for s, a in group), flush=True)
                code = before_code if SETTINGS[group[0][0]][1] is None else REPO
                for (setting, approach), run in zip(group, run_jobs(group, code, args, Path(tmp))):
                    result["runs"].setdefault(approach, {})[setting] = run
                    print(f"  {SETTINGS[setting][0]}: {run['seconds']:.1f} s, {run['questions_per_second']:.2f} "
                          f"questions/s, EM {run['em']:.3f}", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before_code)], cwd=REPO, check=False)
    for approach in APPROACHES:
        runs = result["runs"][approach]
        for setting, r in runs.items():
            r["speedup"] = r["questions_per_second"] / runs["before"]["questions_per_second"]
            if setting != "before":
                r["vs_before"] = compare(runs["before"], r)
        for r in runs.values():  # the transcripts are compared; keep the JSON readable
            del r["texts"], r["questions"]
    default = result["runs"]["fine_tuned_self_ask"][DEFAULT]
    result["target"] = {"speedup": default["speedup"], "identical": default["vs_before"]["identical"],
                        "of": default["vs_before"]["of"],
                        "met": default["speedup"] >= 2 and default["vs_before"]["identical"] == default["n"]}
    result["wall_seconds"] = time.perf_counter() - started
    result["environment"] = environment_record()
    write_results(result, args.out)
    print((args.out / f"{NAME}.md").read_text())


if __name__ == "__main__":
    main()
