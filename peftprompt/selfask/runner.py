"""The recursive self-ask runner, the protocol half: a causal LM writes follow-up questions, an answerer answers
them, and the model writes the final answer, in exactly the text format of the training episodes
(`peftprompt.recursive.unroll`). The other half, what generates the text, is a `GenerationBackend`
(`peftprompt.selfask.backend`): the runner writes the prompts, says where each continuation stops (a `StopRule`)
and reads the continuations; `model.generate` by default (`peftprompt.selfask.transformers_backend`).

```
Question: {question}                              written by the runner (after an optional few-shot prefix)
Are follow up questions needed here: Yes.         generated
Follow up: {follow-up}                            generated; generation stops after
Intermediate answer:                              this marker
 {answer}                                         written by the runner: the answerer's answer
So the final answer is: {answer}                  generated; stops at the end of the line or at EOS
```

Generation is greedy and batched over the questions in flight (`batch_size`) and stops at the intermediate answer
marker, at the end of the final answer's line (newline or EOS), at a line starting another ``Question:`` (a few-shot
model running on to a next example), or at `max_new_tokens` (`SelfAskRunner.step_stop`). Each question hands its
backend's cache of one step (`Continuation.cache`: with a model, its KV cache) to its next, and says which few-shot
prefix its prompt starts with (`GenerationRequest.prefix`), so a step can feed only the tokens its prompt gained.

Recursion. The question is layer 0, its follow-ups layer 1, theirs layer 2, ... Each layer's follow-ups go to that
layer's answerer (`answerers.py`; ``answerer`` may be one for every layer or a list, one per layer, the last
repeating): a tool, a `RetrieverAnswerer`, or the model (`ModelAnswerer`, the default), which self-asks the
follow-up as a new question one layer deeper. When a tool or retriever cannot answer (``answer_source="none"``:
below the retriever's threshold, the tool returned nothing) and `recurse` is on, the model self-asks that follow-up
instead. At `max_depth` the model answers directly (``... here: No.`` then the final answer), so ``max_depth=0``
answers the question itself directly and ``max_depth=1`` lets the model answer unanswered follow-ups directly. Each
follow-up of the trace records its layer (``meta["depth"]``), who answered it (``meta["answerer"]``, and
``meta["unanswered_by"]`` when the model stepped in) and what that answerer reported (`Answer.meta`, e.g. the
retrieved passages of a `peftprompt.selfask.open_book.RetrievalAnswerer`).

Operators. A follow-up in an operator's template (``Which is later: A (March 8, 1975) or B (14 January 1987)?``)
is computed by an `OperatorAnswerer` in its layer's answerers. As in training, where the operator step is the last
of its tree and the final answer repeats it, that step ends the question (`operator_ends`): the runner writes
``So the final answer is:`` with the operator's answer itself, so a 135M model cannot cut or swap the name it
would have copied.

Malformed output, and what the runner does (each case is recorded in `SelfAskResult.issues`):

- ``"empty follow-up"``: the marker with no question before it;
  ``"follow-up repeats the question"``: the follow-up equals the question (lower-cased, punctuation and spaces
  normalised); ``"repeated follow-up"``: it equals an earlier follow-up;
  ``"too many follow-ups"``: a follow-up after `max_follow_ups` of them;
  ``"empty final answer"``: ``So the final answer is:`` with nothing after it on its line;
  ``"no follow-up or final answer"``: a continuation (stopped by EOS or `max_new_tokens`) with neither;
  ``"started another question"``: a continuation that, before any follow-up or final answer, starts a line
  ``Question:``;
  ``"text outside the template"``: anything but the decision line (first step) or nothing (after an
  intermediate answer) before the follow-up or the final answer;
  ``"token budget exhausted"``: the question's generated tokens reached `max_total_tokens` minus the tokens kept
  for the final answer (`final_answer_tokens`), before a step or cutting a step short.
  In every case the offending continuation is dropped and the final answer is **forced**: the runner appends
  ``So the final answer is:`` (after ``... here: No.`` if no follow-up was accepted, so the transcript stays in
  the template) and generates the answer only, once.
- ``"no final answer"``: the forced answer is empty too: the answer is ``""``.

One correction comes first (`retry_repeats`, on by default): when a follow-up repeats the question, the runner
asks for that follow-up again, once per step, with the decision line and ``Follow up:`` written for the model and
the repeated follow-up's first word banned as its first token (``Who was the President ... when X was born?``
becomes ``When was X born?``). It is recorded in `SelfAskResult.corrections`, not as an issue; a repeat in the
retried step is the issue above.
- ``"transcript does not follow the template"``: the final transcript does not parse back with
  `peftprompt.recursive.unroll.parse_episode` (e.g. garbage before the final answer).

`well_formed` is true when the model reached a non-empty final answer on its own, with no issue. Every question
ends: each step either accepts a follow-up (at most `max_follow_ups`), ends the question, or starts the single
forced answer, and no question generates more than `max_total_tokens` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

from tqdm.auto import tqdm

from ..recursive.tree import Node, question_key
from ..recursive.unroll import SELF_ASK, Template, Unroller, clean_text, parse_episode
from .answerers import UNKNOWN, Answer, Answerer, as_answerer
from .backend import CallableBackend, Continuation, GenerateFn, GenerationBackend, GenerationRequest
from .stopping import END_OF_LINE, StopRule
from .transformers_backend import TransformersBackend


def format_episode(
    question: str, follow_ups: Sequence[tuple[str, str]], answer: str, template: Template = SELF_ASK
) -> str:
    """One self-ask example in `template`'s exact format: the unroller's episode of a one-level tree (without EOS)."""
    children = [Node(question=q, answer=a, id=str(k)) for k, (q, a) in enumerate(follow_ups, start=1)]
    (episode,) = Unroller(mode="flat", template=template)(Node(question=question, answer=answer, children=children))
    return episode.text


# The 4-shot self-ask prompt of Press et al. (2022), "Measuring and Narrowing the Compositionality Gap".
_PRESS_EXAMPLES = [
    ("Who lived longer, Muhammad Ali or Alan Turing?",
     [("How old was Muhammad Ali when he died?", "Muhammad Ali was 74 years old when he died."),
      ("How old was Alan Turing when he died?", "Alan Turing was 41 years old when he died.")],
     "Muhammad Ali"),
    ("When was the founder of craigslist born?",
     [("Who was the founder of craigslist?", "Craigslist was founded by Craig Newmark."),
      ("When was Craig Newmark born?", "Craig Newmark was born on December 6, 1952.")],
     "December 6, 1952"),
    ("Who was the maternal grandfather of George Washington?",
     [("Who was the mother of George Washington?", "The mother of George Washington was Mary Ball Washington."),
      ("Who was the father of Mary Ball Washington?", "The father of Mary Ball Washington was Joseph Ball.")],
     "Joseph Ball"),
    ("Are both the directors of Jaws and Casino Royale from the same country?",
     [("Who is the director of Jaws?", "The director of Jaws is Steven Spielberg."),
      ("Where is Steven Spielberg from?", "The United States."),
      ("Who is the director of Casino Royale?", "The director of Casino Royale is Martin Campbell."),
      ("Where is Martin Campbell from?", "New Zealand.")],
     "No"),
]

FEW_SHOT_SELF_ASK = "".join(format_episode(q, f, a) + "\n\n" for q, f, a in _PRESS_EXAMPLES)
"""The 4-shot self-ask prompt of Press et al. (2022) in `SELF_ASK`'s format, examples separated by a blank line."""

FEW_SHOT_DIRECT = "".join(format_episode(q, [], a) + "\n\n" for q, _, a in _PRESS_EXAMPLES)
"""The same 4 questions answered directly, in the format the runner's direct prompt uses (the ``No.`` branch of
`SELF_ASK`, as a fine-tuned model saw leaves in training)."""

normalise_question = question_key
"""Lower-cased words only: how follow-ups are compared for repeats (`peftprompt.recursive.tree.question_key`)."""


@dataclass
class SelfAskResult:
    """The outcome of self-asking one question.

    Attributes:
        question, answer (`str`): The question and the final answer (``""`` when none could be had).
        well_formed (`bool`): The model reached a non-empty final answer on its own, with no issue.
        follow_ups (`int`): Follow-ups accepted (and answered).
        generated_tokens (`int`): Tokens generated for this question, deeper model runs included.
        issues (`list[str]`): Malformed output met (see the module docstring), in order.
        text (`str`): The transcript, from the question line to the final answer (no few-shot prefix).
        trace (`Node`): A ``decomp-tree/v1`` tree: the question with its final answer (``answer_source="model"``),
            its follow-ups as children ``"1"``, ``"2"``, ... with their answers and sources; a follow-up the model
            self-asked has that run's follow-ups as its own children.
        forced (`bool`): The final answer was forced.
        corrections (`list[str]`): Follow-ups the runner asked for again (see the module docstring).
    """

    question: str
    answer: str
    well_formed: bool
    follow_ups: int
    generated_tokens: int
    issues: list[str]
    text: str
    trace: Node
    forced: bool = False
    corrections: list[str] = field(default_factory=list)


@dataclass
class _State:
    question: str
    text: str
    tokens: int = 0  # generated at this level
    deeper_tokens: int = 0
    follow_ups: list[tuple[str, Answer, dict]] = field(default_factory=list)
    issues: list[str] = field(default_factory=list)
    forcing: bool = False
    forced: bool = False
    done: bool = False
    answer: str = ""
    corrections: list[str] = field(default_factory=list)
    prefill: str = ""  # written for the model before its next step (a retried follow-up)
    banned: Optional[str] = None  # a word its next step may not start with
    retried_at: int = -1  # the step (follow-ups accepted so far) last asked again
    cache: Any = None  # the backend's cache of the last step's prompt and continuation (`Continuation.cache`)
    depth: int = 0  # its layer: 0 for a question, 1 for a follow-up the model self-asks, ...
    direct: bool = False  # answered directly (at max_depth): no follow-ups, the few-shot direct prefix
    parent: Optional["_State"] = None  # the question whose follow-up this one is
    waiting_on: Optional[tuple[str, dict]] = None  # the follow-up its deeper question answers, and its meta
    derived: bool = False  # its final answer is an operator's (`operator_ends`)


AnswererLike = Union[Answerer, Callable[[str], Any], None]


class ModelAnswerer(Answerer):
    """Answers a follow-up by self-asking it with `runner` one layer deeper (``depth``); at ``runner.max_depth`` the
    runner answers directly. Its answers have ``answer_source="model"`` and carry the deeper run's trace."""

    name = "model"

    def __init__(self, runner: "SelfAskRunner"):
        self.runner = runner

    def answer_batch(self, questions: list[str], depth: int) -> list[Answer]:
        results = self.runner.run_batch(questions, depth=depth)
        return [Answer(r.answer, "model", trace=r.trace, generated_tokens=r.generated_tokens) for r in results]


class SelfAskRunner:
    """Self-ask a causal LM, recursively.

    Args:
        model, tokenizer: A `transformers` causal LM and its tokenizer, generating through a `TransformersBackend`
            (`None` with `generate_fn` or `backend`; with `generate_fn`, the tokenizer counts its tokens).
        answerer (`Answerer`, callable or a list of them, *optional*): Answers follow-ups; `None` (the default) is
            the model itself (`ModelAnswerer`). A callable ``(question) -> str`` is used as a tool. A list gives one
            answerer per layer (the question's follow-ups are layer 1), the last one answering every deeper layer.
        recurse (`bool`, defaults to `True`): When a tool or retriever cannot answer a follow-up, the model
            self-asks it one layer deeper (directly at `max_depth`); without it the follow-up's answer is
            ``"unknown"``.
        template (`Template`, defaults to `SELF_ASK`): The wording; must be the one the model was trained with.
        max_follow_ups (`int`, defaults to 5): Follow-ups accepted per question (the most a training episode asks:
            a flat bridge comparison's four leaves and its operator step).
        max_depth (`int`, defaults to 2): The layer at which the model answers directly instead of self-asking
            (0: the question itself is answered directly).
        max_new_tokens (`int`, defaults to 64): Tokens per generation step.
        max_total_tokens (`int`, defaults to 384): Tokens generated per question at most, over all its steps.
        batch_size (`int`, defaults to 64): Questions in flight, and prompts per `model.generate` call.
        few_shot (`str`, defaults to ``""``): Prefix of every self-ask prompt (e.g. `FEW_SHOT_SELF_ASK`).
        few_shot_direct (`str`, defaults to ``""``): Prefix of every direct prompt (e.g. `FEW_SHOT_DIRECT`).
        final_answer_tokens (`int`, defaults to 16): Tokens of `max_total_tokens` kept for a forced final answer.
        generate_fn (callable, *optional*): ``(prompts, max_new_tokens) -> continuations`` replacing
            `model.generate` (a scripted model in tests; `CallableBackend`); a `str` continuation counts its
            whitespace words as tokens (its tokenizer's tokens with a tokenizer), and is cut at its stop. When a
            retried follow-up bans a first word, it is called with a third argument: per prompt, that word or `None`.
        backend (`GenerationBackend`, *optional*): What generates, instead of a model or `generate_fn` (e.g. a
            `peftprompt.selfask.llama_cpp_backend.LlamaCppBackend`: llama.cpp on a GGUF model).
        retry_repeats (`bool`, defaults to `True`): Ask once more for a follow-up that repeats the question (see
            the module docstring).
        operator_ends (`bool`, defaults to `True`): A follow-up an operator computed (`OperatorAnswerer`: the
            comparison of two values found before it) ends the question, its answer the final answer (the root's
            ``answer_source`` is then ``"derived"``), as every operator step ends its training tree; off, the model
            writes the final answer after it (and may cut or change the name).
        progress (`str`, *optional*): Show a tqdm bar with this description over the questions of each top-level
            `run_batch` and each `answer_directly` (questions finished).
        reuse_kv_cache (`bool`, defaults to `True`): With a model: keep each question's KV cache from one step to
            the next and share the few-shot prefixes' (`peftprompt.selfask.kv_cache`), so each step feeds only its
            new tokens; off (or for a model that cannot, e.g. under prefix tuning), every step encodes its whole
            prompt again.

    Attributes:
        backend (`GenerationBackend`): What generates: the `TransformersBackend` of `model`, the `CallableBackend`
            of `generate_fn`, or `backend`.
        step_stop (`StopRule`): Where a step's continuation ends: after the intermediate answer marker, at the end of
            the final answer's line, or after the ``\\nQuestion:`` of a line starting another question, whichever
            comes first (a forced answer ends at the end of its line: `END_OF_LINE`).

    Scheduling: `run_batch` keeps at most `batch_size` questions in flight and steps them together (one backend
    call a step); a finished question makes room for the next one, so the progress bar moves as questions finish. A
    follow-up the model self-asks joins the same steps, at any depth, while the question that asked it waits (and
    leaves it its place), so recursion never runs a small batch of its own.
    """

    def __init__(
        self,
        model=None,
        tokenizer=None,
        answerer: Union[AnswererLike, Sequence[AnswererLike]] = None,
        recurse: bool = True,
        template: Template = SELF_ASK,
        max_follow_ups: int = 5,
        max_depth: int = 2,
        max_new_tokens: int = 64,
        max_total_tokens: int = 384,
        batch_size: int = 64,
        few_shot: str = "",
        few_shot_direct: str = "",
        final_answer_tokens: int = 16,
        generate_fn: Optional[GenerateFn] = None,
        progress: Optional[str] = None,
        retry_repeats: bool = True,
        reuse_kv_cache: bool = True,
        operator_ends: bool = True,
        backend: Optional[GenerationBackend] = None,
    ):
        if backend is not None and (model is not None or generate_fn is not None):
            raise ValueError("SelfAskRunner: give a backend, or a model or a generate_fn, not both")
        if model is None and generate_fn is None and backend is None:
            raise ValueError("SelfAskRunner needs a model (and tokenizer), a generate_fn or a backend")
        if model is not None and tokenizer is None and generate_fn is None:
            raise ValueError("SelfAskRunner needs the model's tokenizer")
        for name, value in (("max_new_tokens", max_new_tokens), ("max_total_tokens", max_total_tokens),
                            ("batch_size", batch_size), ("final_answer_tokens", final_answer_tokens)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if max_follow_ups < 0 or max_depth < 0:
            raise ValueError("max_follow_ups and max_depth must be >= 0")
        if final_answer_tokens >= max_total_tokens:
            raise ValueError(
                f"final_answer_tokens ({final_answer_tokens}) must be < max_total_tokens ({max_total_tokens})"
            )
        if backend is None:
            backend = (CallableBackend(generate_fn, tokenizer) if generate_fn is not None else
                       TransformersBackend(model, tokenizer, batch_size=batch_size, reuse_kv_cache=reuse_kv_cache))
        self.backend = backend
        self.template = template
        self.model_answerer = ModelAnswerer(self)
        layers = list(answerer) if isinstance(answerer, (list, tuple)) else [answerer]
        if not layers:
            raise ValueError("SelfAskRunner: answerer is an empty list (give one answerer per layer, or None)")
        self.answerers = [self.model_answerer if a is None else as_answerer(a) for a in layers]
        self.recurse = recurse
        self.max_follow_ups, self.max_depth = max_follow_ups, max_depth
        self.max_new_tokens, self.max_total_tokens = max_new_tokens, max_total_tokens
        self.batch_size, self.final_answer_tokens = batch_size, final_answer_tokens
        self.few_shot, self.few_shot_direct = few_shot, few_shot_direct
        self.retry_repeats = retry_repeats
        self.operator_ends = operator_ends
        self.progress = progress
        head, tail = template.follow_up.split("{question}")
        self.follow_up_prefix = head.strip()  # "Follow up:"
        self.marker = tail  # "\nIntermediate answer:"
        self.next_question = "\n" + template.question.split("{question}")[0].strip()  # "\nQuestion:"
        self.final_prefix = template.final_answer.split("{answer}")[0].rstrip()  # "So the final answer is:"
        self.step_stop = StopRule(after=(self.marker, self.next_question), line_after=(self.final_prefix,))

    # ------------------------------------------------------------------ public API
    def run(self, question: str, depth: int = 0) -> SelfAskResult:
        """Self-ask one question."""
        return self.run_batch([question], depth=depth)[0]

    def run_batch(self, questions: Sequence[str], depth: int = 0) -> list[SelfAskResult]:
        """Self-ask several questions, generating for all of those still running, and the deeper questions they
        wait on, at once."""
        questions = [clean_text(q) for q in questions]
        if any(not q for q in questions):
            raise ValueError("SelfAskRunner: empty question")
        if depth >= self.max_depth:
            return self.answer_directly(questions, depth=depth)
        states = [self._state(q, depth) for q in questions]
        waiting = list(reversed(states))
        stepping: list[_State] = []
        with tqdm(total=len(states), desc=self.progress, unit="question",
                  disable=self.progress is None or depth > 0) as bar:
            while waiting or stepping:
                while waiting and len(stepping) < self.batch_size:
                    stepping.append(waiting.pop())
                asking = [s for s in stepping if s.parent is None]
                stepping = self._run_step(stepping)
                for s in asking:
                    if s.done:
                        bar.update(1)
        return [self._result(s) for s in states]

    def _state(self, question: str, depth: int, parent: Optional[_State] = None) -> _State:
        """A question to self-ask at layer `depth`; at `max_depth`, to answer directly (as `answer_directly`)."""
        if depth < self.max_depth:
            return _State(question, self.template.question.format(question=question), depth=depth, parent=parent)
        t = self.template
        return _State(question, t.question.format(question=question) + t.no_follow_ups + self.final_prefix,
                      forcing=True, depth=depth, direct=True, parent=parent)

    def _run_step(self, stepping: list[_State]) -> list[_State]:
        """One generation step for `stepping` (one `generate` call), then their follow-ups answered; returns the
        questions of the next step: those still running, the deeper questions just asked (their askers wait) and
        the askers whose deeper question has finished."""
        limits = []
        for s in stepping:
            limit = self._limit(s)
            if limit <= 0 and not s.forcing:
                s.issues.append("token budget exhausted")
                self._begin_force(s)
                limit = self._limit(s)
            limits.append(limit)
        going = [(s, n) for s, n in zip(stepping, limits) if n > 0]
        for s, n in zip(stepping, limits):
            if n <= 0:
                self._finish(s, "")
        asked: list[tuple[_State, str]] = []
        if going:
            prompts = [(self.few_shot_direct if s.direct else self.few_shot) + s.text + s.prefill for s, _ in going]
            outputs = self._step(prompts, [n for _, n in going], [s.banned for s, _ in going],
                                 [s.cache for s, _ in going])
            for (s, n), out in zip(going, outputs):
                s.tokens += out.tokens
                s.cache = out.cache
                if s.prefill:
                    out = Continuation(s.prefill + out.text, out.tokens, out.eos)
                    s.prefill, s.banned = "", None
                follow_up = self._advance(s, out, budget_cut=n < self.max_new_tokens and out.tokens >= n)
                if follow_up is not None:
                    asked.append((s, follow_up))
        deeper = self._answer_follow_ups(asked)
        following: list[_State] = []
        for s in stepping + deeper:
            if not s.done:
                if s.waiting_on is None:
                    following.append(s)
                continue
            s.cache = None
            if s.parent is not None:  # a deeper question: its answer goes to the question that asked it
                following.append(self._deliver(s))
        return following

    def _answer_follow_ups(self, asked: list[tuple[_State, str]]) -> list[_State]:
        """Answer this step's follow-ups with their layer's answerer (one batch a layer); those the model answers
        (its layer's answerer, or with `recurse` the ones the answerer could not) become deeper questions."""
        deeper = []
        for layer in sorted({s.depth + 1 for s, _ in asked}):
            group = [(s, q) for s, q in asked if s.depth + 1 == layer]
            answerer = self.layer_answerer(layer)
            if answerer is self.model_answerer:
                deeper += [self._ask_deeper(s, q, {"depth": layer, "answerer": answerer.name}) for s, q in group]
                continue
            for (s, q), answer in zip(group, answerer.answer_batch([q for _, q in group], layer)):
                if self.recurse and answer.source == "none":
                    deeper.append(self._ask_deeper(s, q, {**answer.meta, "depth": layer, "answerer": "model",
                                                          "unanswered_by": answerer.name}))
                else:
                    self._add_answer(s, q, answer, {"depth": layer, "answerer": answerer.name, **answer.meta})
        return deeper

    def _ask_deeper(self, s: _State, follow_up: str, meta: dict) -> _State:
        child = self._state(follow_up, s.depth + 1, parent=s)
        s.waiting_on = (follow_up, meta)
        return child

    def _deliver(self, child: _State) -> _State:
        """Hand a finished deeper question's answer (and trace) to the question waiting on it; returns that one."""
        s = child.parent
        follow_up, meta = s.waiting_on
        result = self._result(child)
        self._add_answer(s, follow_up, Answer(result.answer, "model", trace=result.trace,
                                              generated_tokens=result.generated_tokens), meta)
        s.waiting_on = None
        return s

    def _add_answer(self, s: _State, follow_up: str, answer: Answer, meta: dict) -> None:
        text = clean_text(answer.text) or UNKNOWN
        s.follow_ups.append((follow_up, Answer(text, answer.source, answer.trace), meta))
        s.deeper_tokens += answer.generated_tokens
        s.text += self.template.intermediate_answer.format(answer=text)
        if self.operator_ends and "operator_answer" in meta:  # the computed comparison is the answer
            s.derived = True
            self._finish(s, text)

    def layer_answerer(self, depth: int) -> Answerer:
        """Who answers the follow-ups of layer `depth` (1: the question's follow-ups)."""
        return self.answerers[min(depth, len(self.answerers)) - 1]

    def answer_directly(self, questions: Sequence[str], depth: int = 0) -> list[SelfAskResult]:
        """Answer without follow-ups: ``Question: ...`` + ``... here: No.`` + ``So the final answer is:``."""
        states = [self._state(clean_text(q), self.max_depth) for q in questions]
        limit = min(self.max_new_tokens, self.max_total_tokens)
        outputs: list[Continuation] = []
        with tqdm(total=len(states), desc=f"{self.progress}: direct answers", unit="question",
                  disable=self.progress is None or depth > 0) as bar:
            for start in range(0, len(states), self.batch_size):
                chunk = states[start : start + self.batch_size]
                outputs += self._step([self.few_shot_direct + s.text for s in chunk], [limit] * len(chunk))
                bar.update(len(chunk))
        for s, out in zip(states, outputs):
            s.tokens += out.tokens
            self._finish(s, clean_text(out.text.split("\n")[0]))  # a direct state is forcing its answer
        return [self._result(s) for s in states]

    def complete(self, prompts: Sequence[str], max_new_tokens: Optional[int] = None) -> list[Continuation]:
        """Greedy answers to `prompts` that end with the final-answer prefix (``So the final answer is:``): each
        continuation stops at the end of its line, at EOS or after `max_new_tokens` (default: the runner's),
        batched by `batch_size`. The readers of `peftprompt.selfask.open_book` generate through it."""
        prompts = list(prompts)
        if any(not p.endswith(self.final_prefix) for p in prompts):
            raise ValueError(f"complete: every prompt must end with {self.final_prefix!r}")
        outputs = self._step(prompts, [max_new_tokens or self.max_new_tokens] * len(prompts)) if prompts else []
        return [Continuation(clean_text(out.text.split("\n")[0]), out.tokens, out.eos) for out in outputs]

    # ------------------------------------------------------------------ one question's steps
    def _limit(self, s: _State) -> int:
        if s.forcing:
            return min(self.max_new_tokens, self.max_total_tokens - s.tokens)
        return min(self.max_new_tokens, self.max_total_tokens - self.final_answer_tokens - s.tokens)

    def _in_template(self, s: _State, before: str, final: bool) -> bool:
        """Whether the text generated before a follow-up or the final answer is what the template puts there:
        nothing after an intermediate answer, else the decision line (``Yes.`` before a follow-up, ``No.`` before
        a final answer without follow-ups)."""
        if s.follow_ups:
            return not before.strip()
        decision = self.template.no_follow_ups if final else self.template.follow_ups_needed
        return before.strip() == decision.strip()

    def _begin_force(self, s: _State) -> None:
        if not s.follow_ups:
            s.text = self.template.question.format(question=s.question) + self.template.no_follow_ups
        s.text += self.final_prefix
        s.forcing = s.forced = True

    def _finish(self, s: _State, answer: str) -> None:
        if s.forcing:
            s.text = s.text[: -len(self.final_prefix)]
            if not answer:
                s.issues.append("no final answer")
        if answer:
            s.text += self.template.final_answer.format(answer=answer)
        s.answer, s.done, s.forcing = answer, True, False

    def _advance(self, s: _State, out: Continuation, budget_cut: bool = False) -> Optional[str]:
        """Apply one continuation to `s`; return the follow-up to answer, if any."""
        text = out.text
        if s.forcing:
            self._finish(s, clean_text(text.split("\n")[0]))
            return None
        i_marker, i_final = text.find(self.marker), text.find(self.final_prefix)
        if i_final >= 0 and (i_marker < 0 or i_final < i_marker):
            answer = clean_text(text[i_final + len(self.final_prefix):].split("\n")[0])
            issue = None if self._in_template(s, text[:i_final], final=True) else "text outside the template"
            if issue or not answer:
                s.issues.append(issue or "empty final answer")
                self._begin_force(s)
                return None
            s.text += text[:i_final]
            self._finish(s, answer)
            return None
        if i_marker < 0:
            s.issues.append("started another question" if text.endswith(self.next_question)
                            else "token budget exhausted" if budget_cut else "no follow-up or final answer")
            self._begin_force(s)
            return None
        head = text[:i_marker]
        j = head.rfind(self.follow_up_prefix)
        follow_up = clean_text(head[j + len(self.follow_up_prefix):]) if j >= 0 else ""
        key = normalise_question(follow_up)
        if j < 0 or not self._in_template(s, head[:j], final=False):
            issue = "text outside the template"
        elif not key:
            issue = "empty follow-up"
        elif key == normalise_question(s.question):
            if self.retry_repeats and s.retried_at != len(s.follow_ups):
                s.retried_at = len(s.follow_ups)
                s.corrections.append("follow-up repeats the question")
                s.prefill, s.banned = head[:j] + self.follow_up_prefix, follow_up.split()[0]
                return None
            issue = "follow-up repeats the question"
        elif any(key == normalise_question(q) for q, _, _ in s.follow_ups):
            issue = "repeated follow-up"
        elif len(s.follow_ups) >= self.max_follow_ups:
            issue = "too many follow-ups"
        else:
            s.text += head[:j] + self.template.follow_up.format(question=follow_up)
            return follow_up
        s.issues.append(issue)
        self._begin_force(s)
        return None

    def _result(self, s: _State) -> SelfAskResult:
        children = []
        for k, (q, answer, meta) in enumerate(s.follow_ups, start=1):
            grandchildren = list(answer.trace.children) if answer.trace is not None else []
            children.append(Node(question=q, answer=answer.text, answer_source=answer.source, id=str(k),
                                 children=grandchildren, meta=dict(meta)))
        source = ("derived" if s.derived else "model") if s.answer else "none"
        trace = Node(question=s.question, answer=s.answer or None, answer_source=source, children=children)
        if s.answer:
            try:
                parse_episode(s.text, self.template)
            except ValueError:
                s.issues.append("transcript does not follow the template")
        return SelfAskResult(
            question=s.question, answer=s.answer, well_formed=bool(s.answer) and not s.issues,
            follow_ups=len(s.follow_ups), generated_tokens=s.tokens + s.deeper_tokens, issues=list(s.issues),
            text=s.text, trace=trace, forced=s.forced, corrections=list(s.corrections),
        )

    # ------------------------------------------------------------------ generation
    def _prefix_of(self, prompt: str) -> str:
        """The few-shot prefix `prompt` starts with (`few_shot`, else `few_shot_direct`), or ``""``."""
        return next((p for p in (self.few_shot, self.few_shot_direct) if p and prompt.startswith(p)), "")

    def _step(self, prompts: list[str], limits: list[int], banned: Optional[list[Optional[str]]] = None,
              caches: Optional[list[Any]] = None) -> list[Continuation]:
        """One `GenerationRequest` per prompt to the backend: a prompt ending with the final-answer prefix stops at
        the end of its line (`END_OF_LINE`), any other at `step_stop`; per prompt, the word `banned` as its first and
        the `cache` of its previous step (kept for the next step when `caches` is given). Each continuation's tokens
        are capped at its limit."""
        requests = [GenerationRequest(prompt, limit, END_OF_LINE if prompt.endswith(self.final_prefix) else
                                      self.step_stop, prefix=self._prefix_of(prompt),
                                      banned_first_word=banned[i] if banned else None,
                                      cache=caches[i] if caches else None, keep_cache=caches is not None)
                    for i, (prompt, limit) in enumerate(zip(prompts, limits))]
        return [Continuation(out.text, min(out.tokens, limit), out.eos, out.cache)
                for out, limit in zip(self.backend.generate(requests), limits)]
