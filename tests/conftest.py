"""Shared fixtures and helpers: tiny random models built from configs, and the real MiniLM where a real backbone matters.

The tests come in two tiers, by folder:

- ``tests/unit``: no subprocesses and no real backbone weights (tiny random models, tokenizers, data, pure logic);
  ``make test-fast`` runs it. A unit test that starts a process or loads MiniLM / SmolLM2 weights fails, saying so.
- ``tests/integration``: recipes under ``accelerate launch``, CLI and benchmark scripts, real backbones.

Helpers that several test modules use live here (``from conftest import ...``), never in another test module.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import io
import json
import math
import os
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from types import ModuleType
from typing import Callable, Mapping, Sequence
from unittest import mock

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForTokenClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)
from transformers.utils import logging as transformers_logging

import peftprompt
from peftprompt import load_backbone
from peftprompt.backbones import SMOLLM2_CACHE_NAME, cache_dir, minilm_path, smollm2_path
from peftprompt.recursive import SelfAskCollator, Unroller, validate
from peftprompt.recursive.tree import ANSWER_SOURCES, Node
from peftprompt.retrieval.embed import SentenceEncoder
from peftprompt.retrieval.index import PassageIndex
from peftprompt.retrieval.passages import Passage
from peftprompt.selfask import RetrieverAnswerer, ToolAnswerer
from peftprompt.tasks import TRAINABLE_TASKS
from peftprompt.training import TrainConfig, train
from peftprompt.training.recipe import run_recipe

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)
transformers_logging.set_verbosity_error()

REPO = Path(__file__).resolve().parents[1]  # the repository root
TASKS = TRAINABLE_TASKS  # the method matrix: every task the engine trains
NUM_LABELS = {"seq_cls": 2, "token_cls": 5}
TINY_VOCAB = 128


def script_module(path: Path) -> ModuleType:
    """A script (``recipes/*.py``, ``benchmarks/*.py``) imported as a module, once per process, with its folder on
    ``sys.path`` while it imports (the benchmarks import their ``_*.py`` helpers by name)."""
    name = path.stem
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    sys.modules[name] = module
    return module


def run_like_a_process(main: Callable[[], object], env: Mapping[str, str], cwd: Path, output: tuple | None) -> int:
    """Call `main()` as a process would run a script, and return the exit code the process would end with: with
    `env` added to the environment, from `cwd`, its stdout and stderr going to `output` (two streams; `None`: this
    process's), a `SystemExit` message printed on stderr, and the state a process would leave behind (torch's
    threads, Accelerate's singletons) put back."""
    threads = torch.get_num_threads()  # some scripts set their own (--threads); the other tests use one
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.dict(os.environ, env))
        stack.enter_context(contextlib.chdir(cwd))
        if output is not None:
            stack.enter_context(contextlib.redirect_stdout(output[0]))
            stack.enter_context(contextlib.redirect_stderr(output[1]))
        try:
            main()
        except SystemExit as exited:  # argparse's errors, `sys.exit(message)`, `run_recipe`'s one-line errors
            if isinstance(exited.code, str):
                print(exited.code, file=sys.stderr)
            return 0 if exited.code is None else exited.code if isinstance(exited.code, int) else 1
        finally:
            torch.set_num_threads(threads)
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
    return 0


def call_main(
    main: Callable[[list[str]], object], args: Sequence[str], exit_code: int = 0
) -> subprocess.CompletedProcess:
    """A script's ``main(args)`` run in this process as its command line runs it (`run_like_a_process`): from the
    repository root, offline, its output captured, and its exit code checked against `exit_code` (2: an argument
    error, reported by `argparse` on stderr). A fresh process would first spend more seconds importing torch,
    transformers and PEFT than most of these runs take; the processes a script starts itself still start (unless
    `scripts_in_process` is in use)."""
    output = io.StringIO(), io.StringIO()
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    code = run_like_a_process(functools.partial(main, list(args)), env, REPO, output)
    done = subprocess.CompletedProcess(list(args), code, output[0].getvalue(), output[1].getvalue())
    assert done.returncode == exit_code, done.stderr[-3000:]
    return done


@pytest.fixture
def scripts_in_process(monkeypatch):
    """The processes a benchmark starts of our own scripts, ``python recipes/<recipe>.py ...`` (a training run on one
    plain process: what `launch_command` gives for one CPU process) and ``python benchmarks/<script>.py --worker
    ...``, run in this process instead (`run_like_a_process`): the script's `main` (a recipe's through `run_recipe`,
    as its ``__main__`` runs it), its output going where the process's would, its exit code returned as the
    process's. A fresh process would spend longer importing torch, transformers and PEFT than these runs take on
    tiny models. Runs under ``accelerate launch``, runs of other code (another ``PYTHONPATH``), and a run on another
    thread while one is in progress (runs side by side) still start their own processes; a run started by a run here
    runs here too."""
    real_run = subprocess.run
    busy = threading.RLock()
    plain_kwargs = {"cwd", "env", "stdout", "stderr", "check", "capture_output", "text"}

    def run(command, *args, **kwargs):
        argv = [str(part) for part in command] if isinstance(command, (list, tuple)) else []
        script = Path(argv[1]) if len(argv) > 1 and argv[0] == sys.executable else None
        env = kwargs.get("env") or {}
        stdout = kwargs.get("stdout")
        captured = kwargs.get("capture_output") or stdout is subprocess.PIPE
        ours = (script is not None and script.parent in (REPO / "recipes", REPO / "benchmarks")
                and env.get("PYTHONPATH", str(REPO)) == str(REPO) and not args and set(kwargs) <= plain_kwargs
                and (captured or (kwargs.get("stderr") is stdout and stdout is not subprocess.DEVNULL)))
        if not ours or not busy.acquire(blocking=False):
            return real_run(command, *args, **kwargs)
        try:
            main = functools.partial(script_module(script).main, argv[2:])
            if script.parent.name == "recipes":
                main = functools.partial(run_recipe, main)
            output = (io.StringIO(), io.StringIO()) if captured else None if stdout is None else (stdout, stdout)
            code = run_like_a_process(main, env, Path(kwargs.get("cwd") or REPO), output)
        finally:
            busy.release()
        if kwargs.get("check") and code:
            raise subprocess.CalledProcessError(code, command)
        if captured:
            return subprocess.CompletedProcess(command, code, output[0].getvalue(), output[1].getvalue())
        return subprocess.CompletedProcess(command, code)

    monkeypatch.setattr(subprocess, "run", run)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama with a 128-token vocabulary, randomly initialised with `seed`."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def tiny_bert_token_cls(num_labels: int, seed: int = 0) -> BertForTokenClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        num_labels=num_labels,
    )
    return BertForTokenClassification(config).eval()


@functools.cache
def _loaded_minilm(task: str, seed: int) -> tuple[PreTrainedModel, torch.Tensor]:
    """MiniLM with a `task` head seeded by `seed`, loaded once per test process, and the RNG state after loading."""
    torch.manual_seed(seed)
    model, _ = load_backbone("minilm", task=task, num_labels=NUM_LABELS[task])
    return model.eval(), torch.get_rng_state()


def base_model(task: str, seed: int = 0):
    """The backbone of the method matrix: real MiniLM for the classification tasks, a tiny Llama for causal LM.

    MiniLM is read from disk once per test process (a session cache); each call gets a copy, and the random state
    it leaves is the one a fresh load leaves, so a test draws the same numbers as if it had loaded the model itself.
    """
    if task == "causal_lm":
        return tiny_llama(seed)
    model, rng_state = _loaded_minilm(task, seed)
    torch.set_rng_state(rng_state)
    return copy.deepcopy(model)


def make_batch(task: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A deterministic batch of 2 sequences of 12 tokens (the second padded by 3), with labels for `task`."""
    generator = torch.Generator().manual_seed(seed)
    vocab = TINY_VOCAB if task == "causal_lm" else 1000
    input_ids = torch.randint(5, vocab, (2, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -3:] = 0
    if task == "seq_cls":
        labels = torch.tensor([0, 1])
    elif task == "token_cls":
        labels = torch.randint(0, NUM_LABELS[task], (2, 12), generator=generator).masked_fill(attention_mask == 0, -100)
    else:
        labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.fixture(scope="session")
def tiny_smollm(tmp_path_factory):
    """A saved 2-layer Llama with SmolLM2's vocabulary and tokenizer, randomly initialised (for generation and recipes)."""
    from transformers import AutoTokenizer

    from peftprompt.backbones import smollm2_path

    path = tmp_path_factory.mktemp("tiny_smollm")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """A saved 2-layer BERT encoder (no head: each recipe adds its own) with MiniLM's vocabulary and tokenizer.
    Hidden size 64: bitsandbytes' 4-bit layers on the CPU need input sizes that are multiples of their block (64)."""
    from transformers import AutoTokenizer, BertModel

    from peftprompt.backbones import minilm_path

    path = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    config = BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    BertModel(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(path)
    return path


UNIT_TIER = Path(__file__).parent / "unit"
_running_unit_test: list[str] = []  # the node id of the unit-tier test being set up, run or torn down


def _refuse_in_unit_tier(what: str) -> None:
    if _running_unit_test:
        pytest.fail(f"{_running_unit_test[0]} {what}: the unit tier runs no subprocess and loads no real backbone; "
                    f"move this test to tests/integration", pytrace=False)


def _guard_popen():
    original = subprocess.Popen.__init__

    def guarded(self, args, *rest, **kwargs):
        _refuse_in_unit_tier(f"starts a process ({str(args)[:80]})")
        original(self, args, *rest, **kwargs)

    subprocess.Popen.__init__ = guarded


def _guard_real_backbones():
    original = PreTrainedModel.from_pretrained.__func__
    real = {str(minilm_path()), str(cache_dir() / SMOLLM2_CACHE_NAME)}

    def guarded(cls, path, *args, **kwargs):
        if str(path) in real or str(path) in {"minilm", "smollm2-135m"}:
            _refuse_in_unit_tier(f"loads the real backbone {path}")
        return original(cls, path, *args, **kwargs)

    PreTrainedModel.from_pretrained = classmethod(guarded)


_guard_popen()
_guard_real_backbones()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Mark the unit-tier test in progress, so the guards above can refuse a process or a real backbone."""
    in_unit_tier = UNIT_TIER in Path(item.path).parents
    if in_unit_tier:
        _running_unit_test.append(item.nodeid)
    try:
        yield
    finally:
        if in_unit_tier:
            _running_unit_test.clear()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Leave no Accelerate singleton state (e.g. bf16 picked by `auto`, or by TRL's SFTConfig) to later tests."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def minilm_seq_cls():
    return base_model("seq_cls")


def pytest_report_header(config):
    return f"peftprompt {peftprompt.__version__}, torch {torch.__version__}, threads {torch.get_num_threads()}"


# --- Self-ask: a scripted model and its questions ----------------------------------------------------------------------

FINAL = "So the final answer is:"

PIECES = re.compile(r"\S+\s*|\s+")


class Scripted:
    """A fake model: the continuation of a prompt is chosen by its last question and how many intermediate answers
    follow it (`scripts[question][step]`, the last entry repeating); prompts ending with ``So the final answer is:``
    get `forced.get(question, default_forced)`. Continuations are cut to `max_new_tokens` whitespace words."""

    def __init__(self, scripts, forced=None, default_forced=" forced\n"):
        self.scripts, self.forced, self.default_forced = scripts, forced or {}, default_forced
        self.calls: list[list[str]] = []

    def __call__(self, prompts, max_new_tokens):
        self.calls.append(list(prompts))
        outs = []
        for prompt, limit in zip(prompts, max_new_tokens):
            episode = prompt.rsplit("Question: ", 1)[1]
            question = episode.split("\n", 1)[0]
            if prompt.endswith(FINAL):
                out = self.forced.get(question, self.default_forced)
            else:
                script = self.scripts[question]
                step = episode.count("Intermediate answer:")
                out = script[min(step, len(script) - 1)]
                out = out(step) if callable(out) else out
            pieces = PIECES.findall(out)
            kept, words = [], 0
            for piece in pieces:
                words += bool(piece.strip())
                if words > limit:
                    break
                kept.append(piece)
            outs.append("".join(kept))
        return outs


def tool(facts):
    return ToolAnswerer(lambda q: facts.get(q, "unknown"))


def check_trace(result):
    """The trace validates as decomp-tree/v1 and unrolls back into the transcript."""
    tree = Node.from_dict(result.trace.to_dict())
    validate(tree)
    episodes = Unroller()(tree)
    assert episodes[0].text == result.text
    return episodes


QUESTION = "Who is the father-in-law of Queen Hyojeong?"

TWO_STEPS = [
    "Are follow up questions needed here: Yes.\nFollow up: Who is Queen Hyojeong married to?\nIntermediate answer:"
    " this is never read",
    "Follow up: Who is the father of King Heonjong of Joseon?\nIntermediate answer: ignored",
    "So the final answer is: Crown Prince Hyomyeong\n\nQuestion: next example",
]


@pytest.fixture(scope="module")
def retriever():
    facts = [("Who is Queen Hyojeong married to?", "King Heonjong of Joseon"),
             ("When was Craig Newmark born?", "December 6, 1952"),
             ("What is the capital of France?", "Paris")]
    return RetrieverAnswerer(facts, threshold=0.8)


# --- Passage indexes with a stub encoder -------------------------------------------------------------------------------

class StubEncoder(SentenceEncoder):
    """Fixed unit vectors in 2-D: every query is ``(1, 0)``, a passage whose text is in `cosines` has that cosine
    with it (passages are embedded as ``"{title}: {text}"``, queries here have no ``": "``)."""

    def __init__(self, cosines: dict[str, float], fingerprint: float = 0.5):
        self.name, self.cosines = "stub", cosines
        self.encoder_id = {"name": "stub", "name_or_path": "stub", "hidden_size": 2, "vocab_size": 1,
                           "fingerprint": [fingerprint]}

    def encode(self, texts, batch_size=32, max_length=128, progress=False, bf16=False):
        cosines = [self.cosines[text.partition(": ")[2]] if ": " in text else 1.0 for text in texts]
        return torch.tensor([[c, math.sqrt(1 - c**2)] for c in cosines], dtype=torch.float32).reshape(len(texts), 2)


# BM25 ranks A (all three query words) above B (one); C and D share no word with the query.
# The stub's cosines rank C > B > D > A: the two lists disagree, and B, second in both, wins the fusion.
CORPUS = [Passage.make("Alpha", "apollo moon landing"), Passage.make("Beta", "apollo programme"),
          Passage.make("Gamma", "lunar module"), Passage.make("Delta", "space race")]

COSINES = {"apollo moon landing": 0.1, "apollo programme": 0.8, "lunar module": 0.9, "space race": 0.7}


@pytest.fixture
def stub_index() -> PassageIndex:
    return PassageIndex.build(CORPUS, StubEncoder(COSINES), progress=False)


@pytest.fixture
def saved(stub_index, tmp_path) -> Path:
    return stub_index.save(tmp_path / "idx")


# --- Training runs on tiny models --------------------------------------------------------------------------------------

def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


class IdTokenizer:
    """Just what SelfAskCollator needs to batch rows that are already token ids."""

    pad_token_id, eos_token_id, is_fast = 0, 1, True


def token_rows(n: int = 16, seed: int = 0) -> list[dict]:
    """Rows of 8-12 random tokens whose first 3 are context (no loss), so rows hold different numbers of items."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(5, TINY_VOCAB, (8 + i % 5,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (3 + i % 3) + ids[3 + i % 3 :]})
    return rows


def llama_lora(dropout: float = 0.0, seed: int = 0):
    return peftprompt.attach(tiny_llama(seed), "lora", task="causal_lm", lora_dropout=dropout)


def llm_config(tmp_path: Path, name: str = "run", **overrides) -> TrainConfig:
    values = dict(
        model="tiny-llama", task="causal_lm", learning_rate=1e-2, per_device_train_batch_size=4, max_steps=6,
        log_every=1, mixed_precision="no", output_dir=str(tmp_path / name),
    )
    return TrainConfig(**{**values, **overrides})


def records(result_or_dir, kind: str | None = None) -> list[dict]:
    path = result_or_dir.log_file if hasattr(result_or_dir, "log_file") else Path(result_or_dir) / "metrics.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in lines if kind is None or r["type"] == kind]


# --- Decomposition trees -----------------------------------------------------------------------------------------------

def golden_tree() -> Node:
    """A hand-written 3-level tree: the root's first follow-up decomposes again."""
    return Node(
        id="jpi",
        dataset="golden",
        question="Who was the first president of the association which published JPI?",
        answer="G. Stanley Hall",
        children=[
            Node(
                id="1",
                question="What association published JPI?",
                answer="American Psychological Association",
                answer_source="derived",
                children=[
                    Node(id="1", question="What is JPI?", answer="Journal of Personality and Individual Differences", answer_source="tool"),
                    Node(
                        id="2",
                        question_template="Which association publishes #1?",
                        question="Which association publishes Journal of Personality and Individual Differences?",
                        answer="American Psychological Association",
                        answer_source="model",
                    ),
                ],
            ),
            Node(
                id="2",
                question_template="Who was the first president of #1?",
                question="Who was the first president of American Psychological Association?",
                answer="G. Stanley Hall",
            ),
        ],
    )


def trees(max_depth: int):
    leaf = st.builds(lambda q, a, s: Node(question=q, answer=a, answer_source=s), TEXT, TEXT, st.sampled_from(ANSWER_SOURCES[:4]))
    if max_depth == 1:
        return leaf
    inner = st.builds(
        lambda q, a, children: Node(
            question=q, answer=a, children=[_with_id(c, i) for i, c in enumerate(children, start=1)]
        ),
        TEXT,
        TEXT,
        st.lists(trees(max_depth - 1), min_size=1, max_size=3),
    )
    return st.one_of(leaf, inner)


# --- Training runs on tiny models: SmolLM2 tokens ----------------------------------------------------------------------

def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return AutoTokenizer.from_pretrained(smollm2_path())


def small_trees() -> list[dict]:
    """The golden 3-level tree and two hand-made ones."""
    capital = {
        "id": "cap", "dataset": "hand", "question": "What is the capital of the country where the Eiffel Tower is?",
        "answer": "Paris",
        "children": [
            {"id": "1", "question": "Where is the Eiffel Tower?", "answer": "France", "answer_source": "gold"},
            {"id": "2", "question_template": "What is the capital of #1?", "answer": "Paris", "answer_source": "gold"},
        ],
    }
    leaf = {"id": "leaf", "dataset": "hand", "question": "Who wrote Hamlet?", "answer": "William Shakespeare"}
    return [golden_tree().to_dict(), capital, leaf]


class CompactIds:
    """Wrap a collator to renumber SmolLM2 token ids into a small vocabulary (the tokens of the given trees), so
    a tiny Llama can learn them in a few steps on the CPU."""

    def __init__(self, collator: SelfAskCollator, trees: list[dict]) -> None:
        encoder = collator.encoder
        ids = {i for tree in trees for episode in encoder.encode_tree(tree) for i in episode.input_ids}
        self.ids = {t: i for i, t in enumerate(sorted(ids | {collator.pad_token_id}))}
        self.collator = collator

    def __call__(self, features):
        batch = self.collator(features)
        batch["input_ids"] = batch["input_ids"].apply_(self.ids.__getitem__)
        batch["labels"] = batch["labels"].apply_(lambda t: t if t == -100 else self.ids[t])
        return batch


# --- Self-ask: facts ---------------------------------------------------------------------------------------------------

FACTS = {
    "Who is Queen Hyojeong married to?": "King Heonjong of Joseon",
    "Who is the father of King Heonjong of Joseon?": "Crown Prince Hyomyeong",
}


# --- Decomposition trees: random ones ----------------------------------------------------------------------------------

# Property-based: random valid trees (depth <= 5) unroll and parse back into the same tree.
WORD = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'-,.?", min_size=1, max_size=8)

TEXT = st.lists(WORD, min_size=1, max_size=6).map(" ".join)


def _with_id(node: Node, k: int) -> Node:
    node.id = str(k)
    return node


# --- Fault injection: runs of the tiny Llama in this process -----------------------------------------------------------

def tiny_run_config(out: Path, **overrides) -> TrainConfig:
    values = dict(model="tiny-llama", task="causal_lm", learning_rate=1e-2, per_device_train_batch_size=4,
                  max_steps=6, save_every=2, log_every=1, mixed_precision="no", output_dir=str(out))
    return TrainConfig(**{**values, **overrides})


def run_here(out: Path, hook=None, **overrides):
    """Train the tiny Llama LoRA in this process (dropout on), `hook` a forward pre-hook; returns the result."""
    model = peftprompt.attach(tiny_llama(), "lora", task="causal_lm", lora_dropout=0.1)
    if hook is not None:
        model.register_forward_pre_hook(hook)
    return train(tiny_run_config(out, **overrides), model, None, token_rows(32), SelfAskCollator(IdTokenizer(), max_length=64))


def same_adapters(a: Path, b: Path) -> bool:
    first, second = (load_file(path / "adapter" / "adapter_model.safetensors") for path in (a, b))
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


# --- Open-book: a small collection of passages ----------------------------------------------------------------------

FILM_PASSAGES = [  # six passages about two films, their directors and a city
    Passage.make("Jaws (film)", "Jaws is a 1975 American thriller film directed by Steven Spielberg."),
    Passage.make("Steven Spielberg", "Steven Spielberg is an American filmmaker. He was born in Cincinnati, Ohio."),
    Passage.make("Casino Royale (2006 film)", "Casino Royale is a 2006 spy film directed by Martin Campbell."),
    Passage.make("Martin Campbell", "Martin Campbell is a New Zealand film director, born in Hastings."),
    Passage.make("Cincinnati", "Cincinnati is a city in the U.S. state of Ohio on the Ohio River."),
    Passage.make("The Terminal", "The Terminal is a 2004 comedy-drama film starring Tom Hanks."),
]
