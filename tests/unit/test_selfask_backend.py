"""The seam between the self-ask protocol and what generates: a backend of one's own plugs in and gives the protocol's
transcripts; plain functions are a backend; the backends never import the protocol."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import peftprompt.selfask
from peftprompt.selfask import (
    END_OF_LINE,
    CallableBackend,
    Continuation,
    GenerationBackend,
    GenerationRequest,
    SelfAskRunner,
)

from conftest import FACTS, FINAL, PIECES, QUESTION, TWO_STEPS, Scripted, check_trace, tool


class Streaming(GenerationBackend):
    """A backend of one's own that streams, as `LlamaCppBackend` does, with a scripted model behind it: each prompt's
    text streams in word by word (a piece a token) until the request's `StopWatch` says stop, or the text or the
    token budget ends."""

    def __init__(self, script: Scripted):
        self.script, self.requests = script, []

    def generate(self, requests):
        self.requests.append(list(requests))
        texts = self.script([r.prompt for r in requests], [10_000] * len(requests))
        continuations = []
        for request, full in zip(requests, texts):
            text, tokens, watch = "", 0, request.stop.watch()
            for piece in PIECES.findall(full)[: request.max_new_tokens]:
                text, tokens = text + piece, tokens + 1
                if watch.feed(piece):
                    break
            end = request.stop.index(text)
            continuations.append(Continuation(text if end is None else text[:end], tokens))
        return continuations


def test_a_backend_of_ones_own_gives_the_protocols_transcripts():
    scripts = {QUESTION: TWO_STEPS,
               "Q?": ["Are follow up questions needed here: No.\nSo the final answer is: A\nQuestion: more"]}
    backend = Streaming(Scripted(scripts, forced={"Q b?": " B\nmore"}))
    runner = SelfAskRunner(backend=backend, answerer=tool(FACTS), batch_size=2)
    results = runner.run_batch([QUESTION, "Q?"]) + runner.answer_directly(["Q b?"])
    expected = SelfAskRunner(generate_fn=Scripted(scripts, forced={"Q b?": " B\nmore"}), answerer=tool(FACTS),
                             batch_size=2)
    want = expected.run_batch([QUESTION, "Q?"]) + expected.answer_directly(["Q b?"])
    assert [(r.text, r.answer, r.issues, r.trace.to_dict()) for r in results] == [
        (r.text, r.answer, r.issues, r.trace.to_dict()) for r in want]
    assert results[0].well_formed and results[2].answer == "B"
    check_trace(results[0])
    first = backend.requests[0][0]
    assert (first.prompt, first.stop, first.prefix, first.keep_cache) == (
        f"Question: {QUESTION}\n", runner.step_stop, "", True)
    assert backend.requests[-1][0].stop == END_OF_LINE  # the direct answer: one line


def test_a_runner_takes_one_generator():
    with pytest.raises(ValueError, match="not both"):
        SelfAskRunner(generate_fn=Scripted({}), backend=CallableBackend(Scripted({})))
    with pytest.raises(ValueError, match="a generate_fn or a backend"):
        SelfAskRunner()
    with pytest.raises(ValueError, match="does not start with its prefix"):
        GenerationRequest("Question: Q?\n", 4, END_OF_LINE, prefix="Few-shot\n")


def test_a_function_is_a_backend_whose_text_is_cut_at_its_stop():
    def generate(prompts, limits):
        return [" Paris\nQuestion: more", Continuation("Follow up: Q?\nIntermediate answer: x", 9, True, "cache")]

    first, second = CallableBackend(generate).generate([
        GenerationRequest(f"Question: Q?\n{FINAL}", 5, END_OF_LINE),
        GenerationRequest("Question: Q?\n", 5, SelfAskRunner(generate_fn=generate).step_stop)])
    assert first == Continuation(" Paris", 1)  # its whitespace words
    assert second == Continuation("Follow up: Q?\nIntermediate answer:", 9, True, "cache")  # its own count
    with pytest.raises(RuntimeError, match="returned 2 continuations for 1 prompts"):
        CallableBackend(generate).generate([GenerationRequest("Q", 5, END_OF_LINE)])


def test_the_backends_do_not_import_the_protocol():
    """Imports run one way: the runner imports the seam and the backends, never the other way round."""
    package = Path(peftprompt.selfask.__file__).parent
    for module in ("backend", "stopping", "transformers_backend", "llama_cpp_backend", "kv_cache", "shared_prefix"):
        tree = ast.parse((package / f"{module}.py").read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & {"runner", "peftprompt.selfask.runner", "answerers", "open_book"}, module
