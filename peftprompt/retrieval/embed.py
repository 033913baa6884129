"""Sentence embeddings from an encoder backbone (all-MiniLM-L6-v2 by default): mean pooling over the attention mask,
L2-normalised, so that the dot product of two embeddings is their cosine similarity.

```py
>>> encoder = SentenceEncoder("minilm")
>>> vectors = encoder.encode(["Who directed Jaws?", "Jaws is a 1975 film by Steven Spielberg."])
>>> float(vectors[0] @ vectors[1])      # cosine similarity
```
"""

from __future__ import annotations

import contextlib
import copy
from functools import cached_property
from typing import Any, Iterator, Optional, Sequence

import torch
from tqdm.auto import tqdm

PROBE_SENTENCE = "The quick brown fox jumps over the lazy dog."
"""The sentence whose embedding fingerprints an encoder (`SentenceEncoder.encoder_id`)."""

FINGERPRINT_SIZE = 8
FINGERPRINT_DECIMALS = 4
FINGERPRINT_TOLERANCE = 2e-3
"""Fingerprints computed on other hardware or thread counts differ in the last digits: values this close match."""


class SentenceEncoder:
    """Mean-pooled, L2-normalised sentence embeddings (float32) from an encoder backbone.

    Args:
        backbone (`str`, defaults to ``"minilm"``): Loaded by `peftprompt.backbones.load_backbone` (task ``feature``).
        model, tokenizer: An already loaded encoder and its tokenizer (skips loading `backbone`).

    Attributes:
        name (`str`): `backbone`, as given.
        model, tokenizer: The encoder (in eval mode) and its tokenizer.
    """

    def __init__(self, backbone: str = "minilm", model=None, tokenizer=None):
        if model is None or tokenizer is None:
            from ..backbones import load_backbone

            model, tokenizer = load_backbone(backbone, task="feature")
        self.name = backbone
        self.model, self.tokenizer = model.eval(), tokenizer

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @cached_property
    def encoder_id(self) -> dict[str, Any]:
        """What identifies the model: ``name`` (as given), ``name_or_path`` (``config._name_or_path``),
        ``hidden_size``, ``vocab_size`` and ``fingerprint`` (the first values of the float32 embedding of
        `PROBE_SENTENCE`, rounded). Compare two with `same_encoder`."""
        probe = self.encode([PROBE_SENTENCE])
        return {
            "name": self.name,
            "name_or_path": str(getattr(self.model.config, "_name_or_path", "")),
            "hidden_size": self.hidden_size,
            "vocab_size": self.model.config.vocab_size,
            "fingerprint": [round(v, FINGERPRINT_DECIMALS) for v in probe[0, :FINGERPRINT_SIZE].tolist()],
        }

    def encode(
        self,
        texts: Sequence[str],
        batch_size: int = 32,
        max_length: int = 128,
        progress: bool = False,
        bf16: bool = False,
        layers: Optional[Sequence[int]] = None,
    ) -> torch.Tensor:
        """Embeddings of `texts`, shape ``(len(texts), hidden_size)``, float32, each of norm 1 (with `layers`:
        ``(len(texts), hidden_size * len(layers))``).

        Args:
            texts (`Sequence[str]`): The sentences or passages.
            batch_size (`int`, defaults to 32): Texts per forward pass (batched by token length, longest first).
            max_length (`int`, defaults to 128): Tokens kept of each text (the rest is cut).
            progress (`bool`, defaults to `False`): Show a progress bar.
            bf16 (`bool`, defaults to `False`): Run a bfloat16 copy of the encoder: several times faster where the
                CPU has native bfloat16 (`native_bf16`), slower elsewhere; the result is float32 either way.
            layers (`Sequence[int]`, *optional*): Hidden states to pool instead of the last one (0: the token
                embeddings, i: the output of layer i): each mean-pooled and normalised, then concatenated (and scaled
                to norm 1). Lower layers keep more of a text's form and wording, which tells tasks apart better than
                its meaning alone (`peftprompt.continual.routing`).
        """
        if not texts:
            return torch.empty(0, self.hidden_size)
        encodings = self.tokenizer(list(texts), truncation=True, max_length=max_length)
        keys = list(encodings.keys())
        # Longest first: batches of similar lengths pad little, and a memory problem shows up in the first batch.
        order = sorted(range(len(texts)), key=lambda i: -len(encodings["input_ids"][i]))
        out = torch.empty(len(texts), self.hidden_size * (len(layers) if layers else 1))
        model = self._bf16_model if bf16 else self.model
        starts = range(0, len(texts), batch_size)
        with torch.inference_mode():
            for start in tqdm(starts, desc="embedding", unit="batch", disable=not progress):
                rows = order[start : start + batch_size]
                batch = self.tokenizer.pad({key: [encodings[key][i] for i in rows] for key in keys},
                                           return_tensors="pt")
                batch = {key: value.to(self.model.device) for key, value in batch.items()}
                outputs = model(**batch, output_hidden_states=bool(layers))
                states = [outputs.hidden_states[i] for i in layers] if layers else [outputs.last_hidden_state]
                mask = batch["attention_mask"].unsqueeze(-1).float()
                pooled = [torch.nn.functional.normalize((state.float() * mask).sum(1) / mask.sum(1).clamp(min=1e-9),
                                                        dim=-1) for state in states]
                out[rows] = (torch.cat(pooled, -1) / len(pooled) ** 0.5).cpu()
        return out

    @cached_property
    def _bf16_model(self):
        # bfloat16 weights rather than autocast, which casts every weight again at every forward pass
        return copy.deepcopy(self.model).to(torch.bfloat16)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run the block with one torch thread, then restore the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def native_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AMX or AVX512-BF16), so that bfloat16 weights pay off."""
    capabilities = getattr(torch.cpu, "get_capabilities", dict)()  # an older torch cannot tell: assume not
    return bool(capabilities.get("amx_bf16") or capabilities.get("avx512_bf16"))


def same_encoder(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two `SentenceEncoder.encoder_id` describe the same model: same hidden and vocabulary sizes and
    fingerprints within `FINGERPRINT_TOLERANCE`. Names and paths are not compared: the same model installed
    elsewhere has another path."""
    keys = ("hidden_size", "vocab_size")
    if any(a.get(key) != b.get(key) for key in keys):
        return False
    fa, fb = a.get("fingerprint") or [], b.get("fingerprint") or []
    return len(fa) == len(fb) > 0 and all(abs(x - y) <= FINGERPRINT_TOLERANCE for x, y in zip(fa, fb))


def describe_encoder(encoder_id: Optional[dict[str, Any]]) -> str:
    """A short name of an encoder for messages: ``name (name_or_path)``."""
    if not encoder_id:
        return "an unknown encoder"
    name, path = encoder_id.get("name"), encoder_id.get("name_or_path")
    return f"{name} ({path})" if path and path != name else str(name)
