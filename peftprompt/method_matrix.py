"""The architecture x method matrix: every adapter method on tiny random models of 17 architectures.

For each cell, `check_architecture` attaches the method, takes one training step (``loss.backward()`` and the
method's optimiser step), saves it, reloads it in a fresh process (`Reloader`; the logits must be identical) and,
where the method merges, folds it into the base weights (`merged_for_inference`; the logits must not change). A cell
ends ``ok``, ``refused`` (``attach`` raised an `InputError`: the method cannot apply to that model, and says why) or
``failed`` (anything else). `tests/test_architectures.py` and ``benchmarks/architectures.py`` run it.

```py
>>> with Reloader() as reloader:
...     cells = check_architecture("phi3", METHODS, Path("/tmp/phi3"), reloader)
>>> print(markdown_table(cells))
```
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import traceback
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

VOCAB = 100
SEQ_LEN = 8
_DECODER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 64}
_ENCODER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
            "max_position_embeddings": 64}
# name -> (transformers config class, model class, config fields): causal LMs and sequence classifiers
ARCHITECTURES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _DECODER),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _DECODER),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**_DECODER, "head_dim": 8}),
    "mistral": ("MistralConfig", "MistralForCausalLM", _DECODER),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {**_DECODER, "head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**_DECODER, "head_dim": 8}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**_DECODER, "pad_token_id": 0, "eos_token_id": 2}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"n_embd": 32, "n_layer": 1, "n_head": 4, "n_positions": 64,
                                               "bos_token_id": 1, "eos_token_id": 2}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {**_ENCODER}),
    "opt": ("OPTConfig", "OPTForCausalLM", {"hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 1,
                                            "num_attention_heads": 4, "max_position_embeddings": 64,
                                            "word_embed_proj_dim": 32}),
    "falcon": ("FalconConfig", "FalconForCausalLM", {"hidden_size": 32, "num_hidden_layers": 1,
                                                     "num_attention_heads": 4}),
    "bert": ("BertConfig", "BertForSequenceClassification", _ENCODER),
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification", _ENCODER),
    "distilbert": ("DistilBertConfig", "DistilBertForSequenceClassification", {
        "dim": 32, "hidden_dim": 64, "n_layers": 1, "n_heads": 4, "max_position_embeddings": 64}),
    "deberta-v2": ("DebertaV2Config", "DebertaV2ForSequenceClassification", _ENCODER),
    # ELECTRA's embeddings are narrower than its hidden states (projected up before the first layer)
    "electra": ("ElectraConfig", "ElectraForSequenceClassification", {**_ENCODER, "embedding_size": 16}),
    "modernbert": ("ModernBertConfig", "ModernBertForSequenceClassification", {
        **_ENCODER, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "cls_token_id": 1, "sep_token_id": 2}),
}
ATOL_RELOAD = 1e-6  # a reloaded adapter: the same computation
ATOL_MERGED = 1e-4  # a merged adapter: the same function, summed in another order


@dataclass
class Cell:
    """The result of one method on one architecture.

    ``status`` is ``ok``, ``refused`` or ``failed``; ``reason`` the refusal or the failure; ``merged`` True / False
    where the method merges (None where it does not); ``changed`` whether the training step changed the logits.
    """

    architecture: str
    method: str
    status: str = "failed"
    reason: Optional[str] = None
    trainable_params: int = 0
    adapter_bytes: int = 0
    changed: Optional[bool] = None
    reloaded: Optional[bool] = None
    merged: Optional[bool] = None


def tiny_model(architecture: str, head_seed: Optional[int] = None):
    """The tiny random model of `architecture` (seed 0; one layer, width 32, vocabulary 100) in eval mode.

    With `head_seed`, a classifier's head is drawn again from that seed, so that a loaded adapter must bring its own.
    """
    import transformers

    from .tasks import SAVED_HEAD_NAMES
    from .methods.targets import inside_head

    config_name, model_name, fields = ARCHITECTURES[architecture]
    config = getattr(transformers, config_name)(vocab_size=VOCAB, **fields)
    if model_name.endswith("ForSequenceClassification"):
        config.num_labels = 2
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config)
    if head_seed is not None:
        generator = torch.Generator().manual_seed(head_seed)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if inside_head(name, SAVED_HEAD_NAMES):
                    parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return model.eval()


def tiny_batch(architecture: str) -> dict[str, torch.Tensor]:
    """2 sequences of `SEQ_LEN` tokens (the second padded by 2) with labels for the architecture's task."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, VOCAB, (2, SEQ_LEN), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -2:] = 0
    if ARCHITECTURES[architecture][1].endswith("ForSequenceClassification"):
        labels = torch.tensor([0, 1])
    else:
        labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def method_inputs(method: str, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What `attach` needs beside the model for the methods that need inputs: EVA's batches, the tokens to train."""
    if method == "eva":  # at least r * rho = 16 tokens per batch for the SVD of each layer's inputs
        generator = torch.Generator().manual_seed(1)
        return {"eva_dataloader": [{"input_ids": torch.randint(3, VOCAB, (4, SEQ_LEN), generator=generator)}]}
    if method == "trainable_tokens":
        return {"token_indices": sorted(set(batch["input_ids"][0, :3].tolist()))}
    return {}


def _logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return model(**inputs).logits.detach().clone()


def _train_one_step(model, method: str, batch: dict[str, torch.Tensor]) -> None:
    from .methods.optimizers import method_optimizer

    model.train()
    optimizer = method_optimizer(model, method, lr=1e-2) or torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**batch).loss.backward()
    optimizer.step()
    model.eval()


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def train_and_save(architecture: str, method: str, root: Path) -> tuple[Cell, Optional[torch.Tensor]]:
    """Attach `method` to the tiny `architecture`, train one step, save it under ``root/method`` and merge it;
    returns the cell and the logits after the step (None unless it trained)."""
    from peft import PeftModel

    from .adapters import directory_bytes, merged_for_inference, save_adapter
    from .errors import InputError
    from .methods import METHOD_TABLE, attach
    from .methods.catalog import REFUSED_METHODS

    cell = Cell(architecture, method)
    batch = tiny_batch(architecture)
    model = tiny_model(architecture)
    try:
        before = _logits(model, batch)
        try:
            model = attach(model, method, **method_inputs(method, batch))
        except InputError as err:
            cell.status, cell.reason = "refused", str(err)
            return cell, None
        cell.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        _train_one_step(model, method, batch)
        expected = _logits(model, batch)
        # prompt tuning's causal-LM logits start with its virtual tokens
        cell.changed = not torch.allclose(expected[:, -before.shape[1]:], before, atol=1e-6)
        save_adapter(model, root / method)
        cell.adapter_bytes = directory_bytes(root / method)
        if method not in REFUSED_METHODS and METHOD_TABLE[method].mergeable:
            merged = merged_for_inference(model)
            cell.merged = not isinstance(merged, PeftModel) and torch.allclose(
                _logits(merged, batch), expected, atol=ATOL_MERGED, rtol=0)
        cell.status = "saved"
        return cell, expected
    except Exception as err:  # a failure of the cell, recorded for the table
        cell.reason = _one_line(err) + " at " + traceback.extract_tb(err.__traceback__)[-1].name
        return cell, None


def check_architecture(architecture: str, methods: Iterable[str], root: Path, reloader: "Reloader") -> list[Cell]:
    """Every method of `methods` on `architecture`, saved under `root`, reloaded by `reloader`."""
    root.mkdir(parents=True, exist_ok=True)
    cells, expected = [], {}
    for method in methods:
        with warnings.catch_warnings():  # PEFT's advice for real models (ranks, CUDA kernels) says nothing here
            warnings.simplefilter("ignore")
            cell, logits = train_and_save(architecture, method, root)
        cells.append(cell)
        if logits is not None:
            expected[method] = logits
    reloaded, errors = reloader.reload(architecture, root, list(expected))
    for cell in cells:
        if cell.status != "saved":
            continue
        if cell.method in errors:
            cell.status, cell.reason = "failed", "reload: " + errors[cell.method]
            continue
        cell.reloaded = torch.allclose(reloaded[cell.method], expected[cell.method], atol=ATOL_RELOAD, rtol=0)
        problems = [text for text, bad in (
            ("the step trained nothing", not cell.trainable_params),
            ("the step left the logits unchanged", not cell.changed),
            ("the reloaded logits differ", not cell.reloaded),
            ("the merged logits differ", cell.merged is False),
        ) if bad]
        cell.status, cell.reason = ("failed", "; ".join(problems)) if problems else ("ok", None)
    return cells


def reload_saved(architecture: str, root: Path, methods: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load each saved method of ``root`` onto a fresh tiny model (its head drawn again) and compute its logits;
    run by the `Reloader`'s process. Returns the logits and the errors, by method."""
    from .adapters import load_adapter

    batch = tiny_batch(architecture)
    logits, errors = {}, {}
    for method in methods:
        try:
            logits[method] = _logits(load_adapter(tiny_model(architecture, head_seed=1), root / method), batch)
        except Exception as err:  # reported to the parent, which fails the cell
            errors[method] = _one_line(err)
    return logits, errors


class Reloader:
    """A fresh Python process that reloads saved adapters: ``with Reloader() as r: r.reload(arch, dir, methods)``.

    It imports peftprompt and nothing else of the caller's state (no attached model, no registration done by a
    test), so a reload that works here works in a new program. One process serves many architectures.
    """

    def __enter__(self) -> "Reloader":
        self.log = tempfile.TemporaryFile(mode="w+")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "peftprompt.method_matrix", "--serve"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
        )
        return self

    def reload(self, architecture: str, root: Path, methods: list[str]) -> tuple[dict, dict[str, str]]:
        """The logits of the adapters of `methods` saved under `root`, reloaded there, and the errors by method."""
        request = root / "reload.json"
        request.write_text(json.dumps({"architecture": architecture, "root": str(root), "methods": methods}))
        self.process.stdin.write(f"{request}\n")
        self.process.stdin.flush()
        while True:
            line = self.process.stdout.readline()
            if not line:
                self.log.seek(0)
                raise RuntimeError(f"the reload process ended: {self.log.read()[-3000:]}")
            if line.strip() == f"done {request}":
                break
        result = torch.load(root / "reloaded.pt")
        return result["logits"], result["errors"]

    def __exit__(self, *exc_info) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)
        self.log.close()


def _serve() -> None:
    """The `Reloader`'s process: one request file per line on stdin, ``done <file>`` on stdout when answered."""
    import peftprompt  # noqa: F401  (registers BitFit, as any program that loads adapters does)
    from transformers.utils import logging as transformers_logging

    torch.set_num_threads(1)
    transformers_logging.set_verbosity_error()
    warnings.simplefilter("ignore")
    for line in sys.stdin:
        request = Path(line.strip())
        spec = json.loads(request.read_text())
        root = Path(spec["root"])
        logits, errors = reload_saved(spec["architecture"], root, spec["methods"])
        torch.save({"logits": logits, "errors": errors}, root / "reloaded.pt")
        print(f"done {request}", flush=True)


def markdown_table(cells: list[Cell], architectures: Iterable[str], methods: Iterable[str]) -> str:
    """Architecture x method: ``ok`` (``ok, merged`` where merged), ``refused: reason`` or ``FAILED: reason``."""
    by_key = {(c.architecture, c.method): c for c in cells}
    architectures = list(architectures)
    lines = ["| method | " + " | ".join(architectures) + " |", "|---|" + "---|" * len(architectures)]
    for method in methods:
        row = []
        for architecture in architectures:
            cell = by_key.get((architecture, method))
            if cell is None:
                row.append("")
            elif cell.status == "ok":
                row.append("ok, merged" if cell.merged else "ok")
            elif cell.status == "refused":
                row.append("refused")
            else:
                row.append("**FAILED**")
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def cells_as_json(cells: list[Cell]) -> list[dict[str, Any]]:
    return [asdict(cell) for cell in cells]


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve()
