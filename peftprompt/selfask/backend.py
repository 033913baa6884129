"""The seam between the self-ask protocol and whatever generates its text.

`SelfAskRunner` (`peftprompt.selfask.runner`: the template, parsing, stop rules, recursion, answerers) asks a
`GenerationBackend` for greedy continuations of a batch of prompts, one `GenerationRequest` each, and reads back one
`Continuation` each. The backend knows nothing of self-ask: it continues text, stops where each request's
`StopRule` says (`peftprompt.selfask.stopping`), at EOS or after ``max_new_tokens`` tokens, and may keep state
between a prompt's steps (a KV cache) in `Continuation.cache`, which the runner hands back with that prompt's next
request. Three backends come with the package:

- `peftprompt.selfask.transformers_backend.TransformersBackend`: `model.generate` of a transformers causal LM, with
  KV caches kept across steps, a few-shot prefix's cache shared by a batch, and finished rows leaving the batch
  (what ``SelfAskRunner(model, tokenizer)`` builds);
- `peftprompt.selfask.llama_cpp_backend.LlamaCppBackend`: llama.cpp on a GGUF model, with a GGUF LoRA adapter beside
  it or merged in (``SelfAskRunner(backend=LlamaCppBackend.from_files("base.gguf", lora="adapter.gguf"))``; the
  optional extra ``llama``);
- `CallableBackend`: a plain function ``(prompts, max_new_tokens[, banned_first_words]) -> continuations`` (what
  ``SelfAskRunner(generate_fn=...)`` builds; the tests' scripted models).

Another backend plugs in by subclassing `GenerationBackend` (its `generate`), without touching the protocol; it
checks each request's `StopRule` as its text streams in with `StopRule.watch`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

from .stopping import StopRule


@dataclass
class Continuation:
    """What one generation step wrote: its `text` (up to its stop), how many `tokens` it took, whether it ended with
    EOS, and the backend's `cache` of the prompt and these tokens (its KV cache; only when the request asked to
    keep it), handed back with the prompt's next request."""

    text: str
    tokens: int
    eos: bool = False
    cache: Optional[Any] = None


@dataclass
class GenerationRequest:
    """One prompt to continue greedily.

    Attributes:
        prompt (`str`): The text to continue.
        max_new_tokens (`int`): Tokens to generate at most.
        stop (`StopRule`): Where the continuation ends (besides EOS and `max_new_tokens`).
        prefix (`str`, defaults to ``""``): The start of `prompt` that many prompts share (a few-shot prefix): a
            backend may encode it once.
        banned_first_word (`str`, *optional*): A word the continuation may not start with (its first token, with and
            without a leading space).
        cache (*optional*): The `Continuation.cache` of this prompt's previous step (its prompt is a prefix of
            `prompt`), or `None`.
        keep_cache (`bool`, defaults to `False`): Return the cache of `prompt` and the continuation in
            `Continuation.cache`.
    """

    prompt: str
    max_new_tokens: int
    stop: StopRule
    prefix: str = ""
    banned_first_word: Optional[str] = None
    cache: Optional[Any] = None
    keep_cache: bool = False

    def __post_init__(self) -> None:
        if not self.prompt.startswith(self.prefix):
            raise ValueError(f"GenerationRequest: the prompt does not start with its prefix {self.prefix[:40]!r}...")


class GenerationBackend(ABC):
    """Greedy continuations of prompts, for `SelfAskRunner` (see the module docstring)."""

    @abstractmethod
    def generate(self, requests: Sequence[GenerationRequest]) -> list[Continuation]:
        """One `Continuation` per request, in order: the greedy continuation of ``request.prompt``, which ends at
        EOS, after ``request.max_new_tokens`` tokens, or where ``request.stop`` says: its text is cut at
        ``request.stop.index(text)``, and `Continuation.tokens` counts the tokens generated up to the stop (the one
        that completed it included). Requests may be batched in any way; each continuation must be what its prompt
        alone gives."""


GenerateFn = Callable[..., list[Union[str, Continuation]]]
"""``(prompts, max_new_tokens) -> continuations`` (`str` or `Continuation`, one per prompt); called with a third
argument, per prompt a word its continuation may not start with or `None`, when a request bans one."""


class CallableBackend(GenerationBackend):
    """A plain function as a backend (a scripted model in tests; see `GenerateFn`). Its continuations may run past
    their stop: they are cut here. A `str` continuation counts its tokenizer's tokens (its whitespace words without
    a tokenizer); a `Continuation` keeps its own count, EOS flag and cache.

    Args:
        generate_fn (`GenerateFn`): The function.
        tokenizer (*optional*): Counts the tokens of `str` continuations.
    """

    def __init__(self, generate_fn: GenerateFn, tokenizer=None):
        self.generate_fn, self.tokenizer = generate_fn, tokenizer

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Continuation]:
        prompts, limits = [r.prompt for r in requests], [r.max_new_tokens for r in requests]
        banned = [r.banned_first_word for r in requests]
        outputs = self.generate_fn(prompts, limits, banned) if any(banned) else self.generate_fn(prompts, limits)
        if len(outputs) != len(requests):
            raise RuntimeError(f"generation returned {len(outputs)} continuations for {len(requests)} prompts")
        results = []
        for request, out in zip(requests, outputs):
            raw = out if isinstance(out, str) else out.text
            end = request.stop.index(raw)
            text = raw if end is None else raw[:end]
            if isinstance(out, str):
                results.append(Continuation(text, self.count_tokens(text)))
            else:
                results.append(Continuation(text, out.tokens, out.eos, out.cache))
        return results

    def count_tokens(self, text: str) -> int:
        if self.tokenizer is not None:
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return len(text.split())
