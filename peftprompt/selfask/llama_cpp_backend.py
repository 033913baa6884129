"""llama.cpp (``llama-cpp-python``'s `Llama`) as a `GenerationBackend` (`peftprompt.selfask.backend`): self-ask on a
GGUF model, with a GGUF LoRA adapter beside it or merged in (`peftprompt.gguf_export`).

```py
>>> from peftprompt.selfask import RetrieverAnswerer, SelfAskRunner
>>> from peftprompt.selfask.llama_cpp_backend import LlamaCppBackend
>>> backend = LlamaCppBackend.from_files("smollm2.f16.gguf", lora="adapter.gguf", n_threads=2)
>>> runner = SelfAskRunner(backend=backend, answerer=RetrieverAnswerer(facts))
```

Decoding is greedy and done here, not by llama.cpp's sampler: after each token the model's next-token logits
(llama.cpp computes them for the last position only) go to an argmax, the first maximum winning as in
``torch.argmax``, with no temperature, top-k or repeat penalty. A request's banned first word
(`GenerationRequest.banned_first_word`) masks the first token of that word, with and without a leading space, at
the first position only. Each token's text is streamed into the request's `StopWatch`, so a continuation stops on
the token that completes its `StopRule`, at EOS or after ``max_new_tokens`` tokens, and counts its tokens up to that
one, EOS included, as `TransformersBackend` does.

The text matches transformers' tokenizer: prompts are tokenized by llama.cpp with the special tokens in the text
parsed and BOS added only where the GGUF says so (``tokenizer.ggml.add_bos_token``; SmolLM2's tokenizer adds none),
and a token's text is its bytes (UTF-8, decoded as they stream in), control tokens (BOS, EOS, ``<|im_start|>``...:
those transformers' ``skip_special_tokens`` drops) writing nothing.

KV cache reuse (``reuse_kv_cache``): llama.cpp holds one sequence's keys and values. A prompt continues from the
tokens the cache already holds (the previous request's prompt and continuation), from its own previous step's cache
(`GenerationRequest.cache`: with ``keep_cache``, a copy of the sequence's state taken after each continuation) or
from its few-shot prefix's (`GenerationRequest.prefix`, evaluated once), whichever shares the most leading tokens with
it, and evaluates the rest. llama-cpp-python's own `LlamaRAMCache` is not used: its saved states copy the logits of
every cached position (49,152 floats a token for SmolLM2). A reused cache gives the same continuations as a fresh
evaluation up to floating-point rounding (llama.cpp's matrix products may sum in another order for another number
of tokens): the tests compare transcripts both ways.

A GGUF file is checked before llama.cpp opens it (`peftprompt.gguf_file.read_gguf_header`): a file that is not a
GGUF, is cut short, or is a LoRA adapter where a model is expected (or the reverse) is refused with an `InputError`
naming it, and so is a file llama.cpp still refuses to load.

On a CPU with Intel AMX, llama.cpp's extra CPU buffer types (the AMX and repacked weight layouts) are off by default
(`load_llama`): with them, llama.cpp 0.3.36 crashes with a segmentation fault in its AMX matrix product on
SmolLM2's shipped Q4_1 GGUF and on Q8_0 exports (ggml-org/llama.cpp#20824). Elsewhere llama.cpp's default stands.
"""

from __future__ import annotations

import codecs
import ctypes
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Self, Sequence, Union

import numpy as np

from ..errors import InputError
from ..gguf_file import GGUFHeader, read_gguf_header
from .backend import Continuation, GenerationBackend, GenerationRequest

LLAMA_EXTRA = "pip install peftprompt[llama]"
SEQUENCE = 0  # the one llama.cpp sequence generation runs in


def import_llama_cpp():
    """The ``llama_cpp`` module, or an `ImportError` that says how to install it."""
    try:
        import llama_cpp
    except ImportError as err:
        raise ImportError(f"the llama.cpp backend needs llama-cpp-python, an optional extra: `{LLAMA_EXTRA}` (pip "
                          "builds llama.cpp from source: a C++ compiler and cmake, about 7 minutes on 2 cores)"
                          ) from err
    return llama_cpp


def cpu_has_amx() -> bool:
    """Whether this CPU has Intel AMX (``amx_tile`` among the flags of ``/proc/cpuinfo``; `False` where that file
    is absent)."""
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


@contextmanager
def _model_params(llama_cpp, **fields: Any) -> Iterator[None]:
    """While open, `llama_cpp.Llama` builds its model parameters (``llama_model_params``) with `fields` set: the one
    way to reach the fields `Llama` takes no argument for. It swaps the low-level module's
    ``llama_model_default_params``, which `Llama.__init__` calls, and puts it back on leaving; a field this build of
    llama.cpp lacks is refused."""
    low = llama_cpp.llama_cpp
    default = low.llama_model_default_params
    known = {name for name, _ in default()._fields_}
    if unknown := sorted(set(fields) - known):
        raise TypeError(f"this llama.cpp ({llama_cpp.__version__}) has no model parameter {', '.join(unknown)}")

    def with_fields():
        params = default()
        for name, value in fields.items():
            setattr(params, name, value)
        return params

    low.llama_model_default_params = with_fields
    try:
        yield
    finally:
        low.llama_model_default_params = default


def load_llama(model: Union[str, Path], lora: Union[str, Path, None] = None, *, extra_buffers: Optional[bool] = None,
               **llama_kwargs: Any):
    """`llama_cpp.Llama` on the GGUF `model` (with the GGUF LoRA adapter `lora`), choosing llama.cpp's extra CPU
    buffer types.

    Args:
        model: A GGUF model file.
        lora: A GGUF LoRA adapter of that model.
        extra_buffers (`bool`, *optional*): Whether llama.cpp may keep weights in its extra CPU buffer types (AMX
            and repacked layouts; llama.cpp's ``use_extra_bufts``). Default: not on a CPU with AMX (`cpu_has_amx`),
            where its AMX matrix product crashes (see the module docstring); llama.cpp's default elsewhere.
        llama_kwargs: More arguments of `llama_cpp.Llama`.
    """
    llama_cpp = import_llama_cpp()
    extra_buffers = not cpu_has_amx() if extra_buffers is None else extra_buffers
    with _model_params(llama_cpp, use_extra_bufts=extra_buffers):
        return llama_cpp.Llama(model_path=str(model), lora_path=None if lora is None else str(lora), **llama_kwargs)


def check_gguf_files(model: Union[str, Path], lora: Union[str, Path, None] = None) -> GGUFHeader:
    """The header of the GGUF model file `model`, after refusing, with an `InputError` naming the file, a `model` that
    is no GGUF model or a `lora` that is no GGUF LoRA adapter of the same architecture (not a GGUF, cut short, or
    the wrong kind: `read_gguf_header`)."""
    header = read_gguf_header(model)
    arch = header.value("general.architecture")
    if header.value("general.type") == "adapter":
        raise InputError("is a GGUF adapter, not a model: pass it as the LoRA (lora=) beside its base model",
                         file=model)
    if arch is None:
        raise InputError("is a GGUF file without general.architecture: not a model llama.cpp can load", file=model)
    if lora is None:
        return header
    adapter = read_gguf_header(lora)
    if adapter.value("general.type") != "adapter" or adapter.value("adapter.type") != "lora":
        raise InputError("is not a GGUF LoRA adapter (general.type 'adapter', adapter.type 'lora'): "
                         "`peftprompt export --adapter A --gguf F` writes one", file=lora)
    if adapter.value("general.architecture") != arch:
        raise InputError(f"is a LoRA adapter for {adapter.value('general.architecture')!r}, and the model {model} is "
                         f"{arch!r}", file=lora)
    weights = {t.name: t.shape for t in header.tensors}
    pairs = {t.name: t.shape for t in adapter.tensors}
    for name, shape in pairs.items():
        if not name.endswith(".lora_a"):
            continue
        weight, b = name.removesuffix(".lora_a"), pairs.get(name.removesuffix("_a") + "_b")
        fits = (weight in weights and b is not None and shape[0] == weights[weight][0]
                and b[1] == weights[weight][1] and shape[1] == b[0])
        if not fits:  # llama.cpp reports this, yet goes on with the adapter
            raise InputError(f"tensor {name!r} does not fit the model {model} ({weight}: "
                             f"{list(weights.get(weight, ['missing']))}): a LoRA of another base model?", file=lora)
    return header


@dataclass
class KVState:
    """A copy of llama.cpp's cache of one sequence (`data`, from ``llama_state_seq_get_data``) and the `tokens` it
    holds: a `Continuation.cache` of this backend."""

    tokens: np.ndarray
    data: Any  # a ctypes byte array


class LlamaCppBackend(GenerationBackend):
    """Greedy continuations from a llama.cpp model (see the module docstring).

    Args:
        llm (`llama_cpp.Llama`): The loaded model (with its LoRA adapter, if any), e.g. from `from_files`.
        reuse_kv_cache (`bool`, defaults to `True`): Continue each prompt from the cache that holds the most of its
            leading tokens (the last request's, its previous step's, its few-shot prefix's); off, every prompt is
            evaluated from its first token.
    """

    def __init__(self, llm, reuse_kv_cache: bool = True):
        self.llm, self.reuse_kv_cache = llm, reuse_kv_cache
        self._llama_cpp = import_llama_cpp()
        self.eos = llm.token_eos()
        self.n_vocab, self.n_ctx = llm.n_vocab(), llm.n_ctx()
        self._vocab = self._llama_cpp.llama_model_get_vocab(llm.model)
        self._pieces: dict[int, bytes] = {}
        self._prefix_states: dict[str, KVState] = {}

    @classmethod
    def from_files(cls, model: Union[str, Path], lora: Union[str, Path, None] = None, *, n_ctx: int = 4096,
                   n_threads: Optional[int] = None, reuse_kv_cache: bool = True, extra_buffers: Optional[bool] = None,
                   **llama_kwargs) -> "LlamaCppBackend":
        """Load the GGUF `model` (with the GGUF LoRA adapter `lora`) in llama.cpp, after checking both files.

        Args:
            model: A GGUF model file (`peftprompt export --gguf` of a base or merged model, or a shipped one).
            lora: A GGUF LoRA adapter of that model (`peftprompt export --adapter A --gguf F`).
            n_ctx (`int`, defaults to 4096): The context in tokens (at most the model's): a prompt and its new
                tokens must fit.
            n_threads (`int`, *optional*): CPU threads (default: every core).
            reuse_kv_cache (`bool`, defaults to `True`): See the class.
            extra_buffers (`bool`, *optional*): Whether llama.cpp may use its extra CPU buffer types (`load_llama`;
                default: not on a CPU with AMX).
            llama_kwargs: More arguments of `llama_cpp.Llama` (e.g. ``type_k``, ``type_v``: the cache's type).

        Raises:
            InputError: a file is not what it should be, or llama.cpp cannot load it (naming the file).
            ImportError: llama-cpp-python is not installed (``pip install peftprompt[llama]``).
        """
        header = check_gguf_files(model, lora)
        threads = n_threads or os.cpu_count() or 1
        trained = header.value(f"{header.value('general.architecture')}.context_length")
        n_ctx = min(n_ctx, trained) if trained else n_ctx
        try:
            llm = load_llama(model, lora, extra_buffers=extra_buffers, n_ctx=n_ctx, n_threads=threads,
                             n_threads_batch=threads, verbose=False, **llama_kwargs)
        except (ValueError, RuntimeError) as err:
            failed = lora if lora is not None and "LoRA" in str(err) else model
            raise InputError(f"llama.cpp could not load it ({err})", file=failed) from err
        return cls(llm, reuse_kv_cache=reuse_kv_cache)

    def close(self) -> None:
        """Free the model (also done when the backend is garbage-collected)."""
        self.llm.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ text
    def encode(self, text: str) -> list[int]:
        """`text`'s tokens as the prompt of a request: special tokens parsed, BOS where the GGUF adds it."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)

    def piece(self, token: int) -> bytes:
        """The bytes `token` writes (none for a control token: BOS, EOS, ``<|im_start|>``...). Read with
        ``llama_token_to_piece`` itself: llama-cpp-python's `detokenize` loses pieces longer than 32 bytes."""
        if token not in self._pieces:
            buffer = ctypes.create_string_buffer(64)
            n = self._llama_cpp.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, False)
            if n < 0:  # the piece needs -n bytes
                buffer = ctypes.create_string_buffer(-n)
                n = self._llama_cpp.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, False)
            self._pieces[token] = buffer.raw[:n]
        return self._pieces[token]

    def first_tokens(self, word: str) -> list[int]:
        """The first token of `word` with and without a leading space (what a banned first word masks)."""
        return sorted({self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)[0]
                       for text in (" " + word, word)})

    # ------------------------------------------------------------------ generation
    def generate(self, requests: Sequence[GenerationRequest]) -> list[Continuation]:
        """One greedy `Continuation` per request, in order (see `GenerationBackend.generate`)."""
        return [self._continue(request) for request in requests]

    def logits(self, prompt: str) -> np.ndarray:
        """The next-token logits after `prompt`, evaluated from its first token (a copy, ``[n_vocab]``)."""
        self.llm.n_tokens = 0
        self.llm.eval(self.encode(prompt))
        return self._last_logits().copy()

    def _continue(self, request: GenerationRequest) -> Continuation:
        tokens = self.encode(request.prompt)
        if len(tokens) + request.max_new_tokens > self.n_ctx:
            raise ValueError(f"a prompt of {len(tokens)} tokens and {request.max_new_tokens} new tokens exceed "
                             f"llama.cpp's context of {self.n_ctx}: load the model with a larger n_ctx")
        self._feed(tokens, request)
        banned = self.first_tokens(request.banned_first_word) if request.banned_first_word else []
        watch, decoder = request.stop.watch(), codecs.getincrementaldecoder("utf-8")(errors="replace")
        generated: list[int] = []
        pieces: list[str] = []
        while True:
            logits = self._last_logits()
            if banned and not generated:
                logits = logits.copy()
                logits[banned] = -np.inf
            token = int(np.argmax(logits))
            generated.append(token)
            pieces.append(decoder.decode(self.piece(token)))
            if len(generated) >= request.max_new_tokens or token == self.eos or watch.feed(pieces[-1]):
                break
            self.llm.eval([token])
        text = "".join(pieces) + decoder.decode(b"", final=True)
        end = request.stop.index(text)
        cache = self._save() if request.keep_cache and self.reuse_kv_cache else None
        return Continuation(text if end is None else text[:end], len(generated), generated[-1] == self.eos, cache)

    def _last_logits(self) -> np.ndarray:
        """A view of the logits llama.cpp computed for the last position evaluated."""
        pointer = self._llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))

    def _feed(self, tokens: list[int], request: GenerationRequest) -> None:
        """Bring llama.cpp's cache to `tokens` and evaluate the last of them (at least): from the cache holding the
        most of their leading tokens (the live one, the request's or its prefix's) with `reuse_kv_cache`, else from
        the first."""
        llm, n, restore = self.llm, 0, None
        if self.reuse_kv_cache:
            prefix = self._prefix_state(request.prefix)  # first: evaluating a new prefix replaces the live cache
            n = shared_prefix(llm.input_ids[: llm.n_tokens], tokens)
            for state in (request.cache, prefix):
                if isinstance(state, KVState) and (m := shared_prefix(state.tokens, tokens)) > n:
                    n, restore = m, state
        if restore is not None:
            self._restore(restore)
        llm.n_tokens = min(n, len(tokens) - 1)  # `eval` drops the cache from here on
        llm.eval(tokens[llm.n_tokens :])

    def _prefix_state(self, prefix: str) -> Optional[KVState]:
        """The cache of the few-shot `prefix` alone (evaluated once), or `None` for no prefix."""
        if not prefix:
            return None
        if prefix not in self._prefix_states:
            self.llm.n_tokens = 0
            self.llm.eval(self.encode(prefix))
            self._prefix_states[prefix] = self._save()
        return self._prefix_states[prefix]

    def _save(self) -> KVState:
        llama_cpp, ctx = self._llama_cpp, self.llm.ctx
        size = llama_cpp.llama_state_seq_get_size(ctx, SEQUENCE)
        data = (ctypes.c_uint8 * size)()
        if llama_cpp.llama_state_seq_get_data(ctx, data, size, SEQUENCE) != size:
            raise RuntimeError("llama.cpp could not copy its KV cache")
        return KVState(self.llm.input_ids[: self.llm.n_tokens].copy(), data)

    def _restore(self, state: KVState) -> None:
        llama_cpp, llm = self._llama_cpp, self.llm
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(llm.ctx), SEQUENCE, -1, -1)
        if llama_cpp.llama_state_seq_set_data(llm.ctx, state.data, len(state.data), SEQUENCE) == 0:
            raise RuntimeError("llama.cpp could not restore a KV cache")
        llm.input_ids[: len(state.tokens)] = state.tokens
        llm.n_tokens = len(state.tokens)


def shared_prefix(held: Sequence[int], tokens: Sequence[int]) -> int:
    """How many leading tokens `held` and `tokens` share."""
    n = min(len(held), len(tokens))
    differ = np.flatnonzero(np.asarray(held[:n]) != np.asarray(tokens[:n]))
    return int(differ[0]) if differ.size else n


__all__ = ["KVState", "LlamaCppBackend", "check_gguf_files", "cpu_has_amx", "import_llama_cpp", "load_llama",
           "shared_prefix"]
