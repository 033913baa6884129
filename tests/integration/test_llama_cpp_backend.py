"""GGUF exports run by llama.cpp (llama-cpp-python, the optional extra ``llama``) against transformers + PEFT, on a
tiny random Llama with SmolLM2's tokenizer: the base model's GGUF with a GGUF LoRA beside it, and the merged model's
GGUF (LoRA and BitFit), give PEFT's logits and greedy tokens; `LlamaCppBackend` gives `SelfAskRunner` the
transcripts `TransformersBackend` gives, with and without its KV cache reuse; bad GGUF files are refused naming
them. Everything runs on one thread."""

import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import peftprompt
from peftprompt.errors import InputError
from peftprompt.gguf_export import export_lora_gguf, export_model_gguf
from peftprompt.selfask import FEW_SHOT_SELF_ASK, SelfAskRunner, StopRule
from peftprompt.selfask.backend import GenerationRequest
from peftprompt.selfask.llama_cpp_backend import LlamaCppBackend, _model_params, cpu_has_amx, import_llama_cpp
from peftprompt.selfask.transformers_backend import TransformersBackend
from peftprompt.training.shipping import merge_saved_adapter

from conftest import REPO

pytest.importorskip("llama_cpp")

F32_CACHE = {"type_k": int(gguf.GGMLQuantizationType.F32), "type_v": int(gguf.GGMLQuantizationType.F32)}
"""llama.cpp's KV cache in f32 (f16 by default), so an f32 GGUF computes as transformers does in fp32."""
PROMPTS = ["Question: Who was the president of France when Ada Lovelace was born?\n",
           "Question: Quelle est la capitale du pays où est né Gauss — 日本?\nAre follow up questions needed "
           "here:"]
QUESTIONS = ["Who was the president of France when Ada Lovelace was born?",
             "What is the capital of the country where Carl Friedrich Gauss was born?",
             "Which river flows through the city where Zoë Saldaña was born?"]


@pytest.fixture(scope="module")
def exported(tiny_smollm, tmp_path_factory):
    """The tiny model with a LoRA on every projection (random, non-zero B) and with BitFit (random biases), saved;
    its GGUF files: the base (f32), the LoRA (f32), the merged LoRA and merged BitFit models (f32)."""
    tmp = tmp_path_factory.mktemp("llama_cpp")
    torch.manual_seed(0)
    lora = peftprompt.attach(AutoModelForCausalLM.from_pretrained(tiny_smollm), "lora", task="causal_lm", r=4,
                             lora_alpha=8, init_lora_weights=False,
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"]).eval()
    bitfit = peftprompt.attach(AutoModelForCausalLM.from_pretrained(tiny_smollm), "bitfit", task="causal_lm").eval()
    with torch.no_grad():
        for name, parameter in bitfit.named_parameters():
            if parameter.requires_grad:
                parameter.normal_(std=0.5, generator=torch.Generator().manual_seed(len(name)))
    adapters = {name: peftprompt.save_adapter(model, tmp / name) for name, model in (("lora", lora),
                                                                                     ("bitfit", bitfit))}
    files = {"base": export_model_gguf(tiny_smollm, tmp / "base.gguf", dtype="f32"),
             "lora": export_lora_gguf(adapters["lora"], tmp / "lora.gguf", base_model=str(tiny_smollm))}
    for name, adapter in adapters.items():
        merged = merge_saved_adapter(adapter, base_model=str(tiny_smollm))
        files[f"merged_{name}"] = export_model_gguf(merged.model, tmp / f"merged_{name}.gguf", dtype="f32")
    return {"lora": lora, "bitfit": bitfit, "files": files, "tokenizer": AutoTokenizer.from_pretrained(tiny_smollm)}


def backend(model, lora=None, **kwargs) -> LlamaCppBackend:
    return LlamaCppBackend.from_files(model, lora=lora, n_ctx=2048, n_threads=1, **{**F32_CACHE, **kwargs})


def peft_logits_and_greedy(model, tokenizer, prompt: str, tokens: int) -> tuple[np.ndarray, list[int]]:
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1].numpy()
        greedy = model.generate(input_ids=ids, max_new_tokens=tokens, do_sample=False, min_new_tokens=tokens,
                                pad_token_id=tokenizer.pad_token_id)
    return logits, greedy[0, ids.shape[1]:].tolist()


def llama_cpp_greedy(llm: LlamaCppBackend, prompt: str, tokens: int) -> list[int]:
    out = []
    llm.logits(prompt)
    for _ in range(tokens):
        out.append(int(np.argmax(llm._last_logits())))
        llm.llm.eval([out[-1]])
    return out


@pytest.mark.parametrize(("adapter", "files"), [("lora", ("base", "lora")), ("lora", ("merged_lora", None)),
                                                ("bitfit", ("merged_bitfit", None))])
def test_gguf_exports_give_pefts_logits_and_greedy_tokens(exported, adapter, files):
    model, tokenizer = exported[adapter], exported["tokenizer"]
    model_file, lora_file = (exported["files"][name] if name else None for name in files)
    with backend(model_file, lora_file) as llm:
        for prompt in PROMPTS:
            logits, greedy = peft_logits_and_greedy(model, tokenizer, prompt, 8)
            assert np.abs(llm.logits(prompt) - logits).max() < 1e-3
            assert llama_cpp_greedy(llm, prompt, 8) == greedy


def test_the_adapter_changes_the_logits(exported):
    """The comparisons above are not of two base models: the LoRA and BitFit move the logits far more than the
    tolerance."""
    tokenizer = exported["tokenizer"]
    with backend(exported["files"]["base"]) as llm:
        base = llm.logits(PROMPTS[0])
    for name in ("lora", "bitfit"):
        with torch.no_grad():
            tuned = exported[name](input_ids=torch.tensor([tokenizer(PROMPTS[0])["input_ids"]])).logits[0, -1]
        assert np.abs(tuned.numpy() - base).max() > 1e-2


def transcripts(runner: SelfAskRunner, questions=QUESTIONS) -> list[tuple[str, str, int]]:
    return [(r.text, r.answer, r.generated_tokens) for r in runner.run_batch(questions)]


def test_self_ask_through_llama_cpp_gives_the_transformers_transcripts(exported):
    model, tokenizer = exported["lora"], exported["tokenizer"]
    settings = {"answerer": lambda question: "Paris", "max_new_tokens": 24, "max_total_tokens": 96}
    for few_shot in ("", FEW_SHOT_SELF_ASK):
        expected = transcripts(SelfAskRunner(model, tokenizer, few_shot=few_shot, **settings))
        assert all(tokens > 0 for _, _, tokens in expected)
        for reuse in (True, False):
            with backend(exported["files"]["base"], exported["files"]["lora"], reuse_kv_cache=reuse) as llm:
                runner = SelfAskRunner(backend=llm, few_shot=few_shot, batch_size=2, **settings)
                assert transcripts(runner) == expected
                assert transcripts(runner, QUESTIONS[:1]) == expected[:1]  # again, from the caches left behind


def test_a_banned_first_word_and_token_counts_match_transformers(exported):
    model, tokenizer = exported["lora"], exported["tokenizer"]
    reference = TransformersBackend(model, tokenizer)
    stop = StopRule(after=("\n",))
    with backend(exported["files"]["base"], exported["files"]["lora"]) as llm:
        free = [GenerationRequest(prompt, 6, stop) for prompt in PROMPTS]
        first = [out.text.split()[0] for out in llm.generate(free)]
        banned = [GenerationRequest(prompt, 6, stop, banned_first_word=word) for prompt, word in zip(PROMPTS, first)]
        for requests in (free, banned):
            ours, theirs = llm.generate(requests), reference.generate(requests)
            assert [(o.text, o.tokens, o.eos) for o in ours] == [(t.text, t.tokens, t.eos) for t in theirs]
        assert [out.text.split()[0] if out.text.split() else "" for out in llm.generate(banned)] != first


def test_bad_gguf_files_are_refused_naming_them(exported, tmp_path):
    base, lora = exported["files"]["base"], exported["files"]["lora"]
    truncated, text = tmp_path / "truncated.gguf", tmp_path / "notes.gguf"
    truncated.write_bytes(base.read_bytes()[: base.stat().st_size // 2])
    text.write_text("not a model\n" * 10)
    for model, adapter, says, named in (
            (truncated, None, "cut short: tensor", truncated), (text, None, "not a GGUF file", text),
            (base, truncated, "cut short", truncated), (lora, None, "is a GGUF adapter, not a model", lora),
            (base, base, "is not a GGUF LoRA adapter", base), (tmp_path / "missing.gguf", None, "does not exist",
                                                               tmp_path / "missing.gguf")):
        with pytest.raises(InputError, match=says) as refused:
            LlamaCppBackend.from_files(model, lora=adapter, n_threads=1)
        assert str(named) in str(refused.value)


def test_a_lora_of_another_shape_is_refused_naming_it(exported, tmp_path):
    """llama.cpp itself only logs the mismatch and goes on (llama-cpp-python 0.3.36): the shapes are checked first."""
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    config.save_pretrained(tmp_path / "wide")
    adapter = peftprompt.save_adapter(peftprompt.attach(LlamaForCausalLM(config), "lora", task="causal_lm"),
                                      tmp_path / "adapter")
    wide = export_lora_gguf(adapter, tmp_path / "wide.gguf", base_model=str(tmp_path / "wide"))
    with pytest.raises(InputError, match=r"tensor 'blk.0.attn_q.weight.lora_a' does not fit the model .*: a LoRA of "
                                         "another base model") as refused:
        LlamaCppBackend.from_files(exported["files"]["base"], lora=wide, n_threads=1)
    assert str(wide) in str(refused.value)


def test_eos_ends_a_continuation_as_in_transformers(tiny_smollm, tmp_path):
    """A tiny untied model whose every next token is EOS (the final norm keeps one feature, which the embeddings
    make large and positive, and only EOS's output row reads): the continuation is EOS alone, one token, no text."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_smollm)
    config = AutoModelForCausalLM.from_pretrained(tiny_smollm).config
    config.tie_word_embeddings = False
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 100.0
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokenizer.eos_token_id, 0] = 1.0
    model.save_pretrained(tmp_path / "eos")
    tokenizer.save_pretrained(tmp_path / "eos")
    file = export_model_gguf(tmp_path / "eos", tmp_path / "eos.gguf", dtype="f32")
    request = GenerationRequest(PROMPTS[0], 8, StopRule(after=("\n",)))
    expected = TransformersBackend(model, tokenizer).generate([request])
    with backend(file) as llm:
        assert [(o.text, o.tokens, o.eos) for o in llm.generate([request])] == [("", 1, True)] == [
            (o.text, o.tokens, o.eos) for o in expected]
        runner = SelfAskRunner(backend=llm, answerer=lambda question: "Paris")
        assert transcripts(runner, QUESTIONS[:1]) == transcripts(SelfAskRunner(model, tokenizer,
                                                                                answerer=lambda q: "Paris"),
                                                                  QUESTIONS[:1])


def test_extra_cpu_buffers_are_off_on_an_amx_cpu_and_a_q8_0_export_runs(tiny_smollm, exported, tmp_path):
    """llama.cpp's AMX matrix product crashes on Q8_0 and Q4_1 weights (the module docstring): where the CPU has
    AMX, the backend loads without the extra buffer types, and the Q8_0 export gives the f32 export's logits up to
    its rounding."""
    llama_cpp = import_llama_cpp()
    q8_0 = export_model_gguf(tiny_smollm, tmp_path / "q8_0.gguf", dtype="q8_0")
    with backend(q8_0) as quantised, backend(exported["files"]["base"], extra_buffers=False) as f32:
        assert quantised.llm.model_params.use_extra_bufts is not cpu_has_amx()
        assert f32.llm.model_params.use_extra_bufts is False
        for prompt in PROMPTS:
            reference = f32.logits(prompt)
            assert np.abs(quantised.logits(prompt) - reference).max() < 0.05 * np.abs(reference).max()
    assert llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts is True  # put back after loading
    with pytest.raises(TypeError, match="has no model parameter no_such_field"):
        with _model_params(llama_cpp, no_such_field=1):
            pass


@pytest.mark.slow
def test_the_self_ask_benchmark_quick_run_and_resume(tiny_smollm, exported, tmp_path):
    """`benchmarks/llama_cpp_selfask.py --quick` on the tiny model, a q8_0 export standing in for the shipped GGUF;
    a second run reuses every system's records."""
    adapter = exported["files"]["base"].parent / "lora"
    shipped = export_model_gguf(tiny_smollm, tmp_path / "shipped.gguf", dtype="q8_0")
    command = [sys.executable, str(REPO / "benchmarks" / "llama_cpp_selfask.py"), "--quick", "--adapter",
               str(adapter), "--model", str(tiny_smollm), "--shipped-gguf", str(shipped), "--threads", "1",
               "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "results")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    for run in (1, 2):
        done = subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert ("reusing" in done.stdout) == (run == 2)
    result = json.loads((tmp_path / "results" / "llama_cpp_selfask.json").read_text())
    assert result["n"] == 3 and result["quick"] and result["shipped_type"] == "Q8_0"
    assert set(result["systems"]) == {"transformers", "f16", "shipped"}
    for system in result["systems"].values():
        assert len(system["records"]) == 3 and system["questions_per_second"] > 0 and 0 <= system["em"] <= 1
    for base in ("f16", "shipped"):
        assert 0 <= result["comparison"][base]["identical"] <= 3 and result["logit_gap"][base] < 0.5
    assert result["sizes"]["adapter_gguf"] > 0 and set(result["targets_met"]) == {"identical", "em"}
    md = (tmp_path / "results" / "llama_cpp_selfask.md").read_text()
    assert "| llama.cpp, shipped Q8_0 base + GGUF LoRA | " in md and "| adapter as safetensors |" in md
    assert (tmp_path / "results" / "llama_cpp_selfask.png").stat().st_size > 0
