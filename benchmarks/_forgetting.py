"""Forgetting: how far a trained model has moved from its frozen backbone on held-out text that no task trains on.

PEFT's method comparison measures the rise of the base model's loss on Wikipedia text. Here, per kind of backbone:

- Causal LMs (SmolLM2): the rise of the causal-LM loss (token-weighted mean negative log-likelihood) on the held-out
  texts with the adapter active (or the fully fine-tuned weights), over the frozen backbone's (`lm_loss`). 0: no
  change; positive: the model predicts general text worse.
- Encoders trained with a task head (MiniLM on SST-2 / CoNLL-2003): the checkpoint ships no pretraining head
  (all-MiniLM-L6-v2 is a sentence-embedding model, without its masked-LM head), so the drift of what it was trained
  to produce, its sentence embeddings: the mean over the texts of ``1 - cos(e_base, e_trained)``, ``e`` the
  mean-pooled last hidden state (the checkpoint's own pooling) of the frozen backbone and of the trained model, task
  head unused (`sentence_embeddings`, `embedding_drift`). 0: unchanged; 1: orthogonal on average. Prompt-learning
  adapters move it before any training (their virtual tokens and prefixes are attended to; about 0.02 on a tiny BERT).

The held-out texts (`held_out_texts`) are Wikipedia paragraphs of the HotpotQA distractor ``train`` split, a seeded
sample: SST-2 and CoNLL-2003 train on their own sentences, and self-ask training (``selfask_sft.py``) holds
questions and short answers only, never a paragraph.

```py
>>> texts = held_out_texts(64)
>>> base_loss = lm_loss(base_model, tokenizer, texts)
>>> lm_loss(trained_model, tokenizer, texts) - base_loss          # the rise
>>> embedding_drift(sentence_embeddings(base, tok, texts), sentence_embeddings(trained, tok, texts))
```
"""

from __future__ import annotations

import random

import torch
from transformers import PreTrainedTokenizerBase

from peftprompt.retrieval.passages import pooled_passages, read_questions

SOURCE, SPLIT = "hotpotqa_distractor", "train"
SEED = 0


def held_out_texts(n: int, seed: int = SEED) -> list[str]:
    """`n` distinct paragraphs (``title: text``) of the HotpotQA distractor train split, drawn with `seed`."""
    passages = pooled_passages(read_questions(SOURCE, SPLIT))
    return [f"{p.title}: {p.text}" for p in random.Random(seed).sample(passages, min(n, len(passages)))]


def _batches(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int, batch_size: int):
    for start in range(0, len(texts), batch_size):
        yield tokenizer(texts[start:start + batch_size], truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt")


@torch.no_grad()
def lm_loss(model, tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int = 256,
            batch_size: int = 4) -> float:
    """The causal-LM loss of `model` on `texts` (each cut to `max_length` tokens): the mean negative
    log-likelihood of every token after a text's first, padding excluded. Computed from the logits, not by the model
    (an AdaLoRA model loaded for inference cannot compute its own loss), at the input's own positions (a
    prompt-learning adapter's virtual tokens are left out)."""
    total, count = 0.0, 0
    for batch in _batches(tokenizer, texts, max_length, batch_size):
        length = batch["input_ids"].shape[1]
        logits = model(**batch).logits[:, -length:-1].float()
        targets = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
        total += float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="sum"))
        count += int((targets != -100).sum())
    return total / count


@torch.no_grad()
def sentence_embeddings(model, tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int = 128,
                        batch_size: int = 16) -> torch.Tensor:
    """Mean-pooled last hidden states of `model` over the tokens of `texts` (each cut to `max_length` tokens), one
    row per text. Positions a prompt-learning adapter prepends (virtual tokens) are left out of the mean."""
    rows = []
    for batch in _batches(tokenizer, texts, max_length, batch_size):
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1]
        hidden = hidden[:, -batch["input_ids"].shape[1]:]  # the input's own positions
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        rows.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(rows).float()


def embedding_drift(base: torch.Tensor, trained: torch.Tensor) -> float:
    """The mean of ``1 - cos`` between matching rows of `base` and `trained` sentence embeddings."""
    return float((1 - torch.nn.functional.cosine_similarity(base, trained, dim=-1)).clamp(min=0).mean())
