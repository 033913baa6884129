"""The passage index: reciprocal rank fusion on a hand-made corpus (a stub encoder fixes the dense ranking), save /
load in a fresh process with the real MiniLM, the manifest checks, atomic saves, recall@k and the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from peftprompt.cli import main
from peftprompt.retrieval.embed import SentenceEncoder, same_encoder
from peftprompt.retrieval.index import PassageIndex
from peftprompt.retrieval.passages import pooled_passages, read_questions

from conftest import REPO

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def minilm() -> SentenceEncoder:
    return SentenceEncoder("minilm")


def test_sentence_encoder_restores_order_and_normalises(minilm):
    texts = ["short", "a much longer sentence about the Apollo moon landing in July 1969", "mid length text"]
    together = minilm.encode(texts, batch_size=2)
    alone = torch.cat([minilm.encode([t]) for t in texts])
    assert together.dtype == torch.float32 and together.shape == (3, 384)
    assert torch.allclose(together, alone, atol=1e-5)
    assert torch.allclose(together.norm(dim=1), torch.ones(3), atol=1e-5)
    assert minilm.encode([]).shape == (0, 384)
    bf16 = minilm.encode(texts, bf16=True)
    assert bf16.dtype == torch.float32 and torch.nn.functional.cosine_similarity(bf16, together).min() > 0.999
    ident = minilm.encoder_id
    assert (ident["name"], ident["hidden_size"], ident["vocab_size"], len(ident["fingerprint"])) == (
        "minilm", 384, 30522, 8)
    assert same_encoder(ident, json.loads(json.dumps(ident)))
    assert not same_encoder(ident, {**ident, "fingerprint": [v + 0.01 for v in ident["fingerprint"]]})


def test_sentence_encoder_pools_the_layers_asked_for(minilm):
    texts = ["short", "a much longer sentence about the Apollo moon landing in July 1969", "mid length text"]
    last = minilm.encode(texts, batch_size=2)
    assert torch.allclose(minilm.encode(texts, batch_size=2, layers=[6]), last, atol=1e-6)  # layer 6 is the last
    layered = minilm.encode(texts, batch_size=2, layers=[1, 3, 6])
    assert layered.shape == (3, 3 * 384) and torch.allclose(layered.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(layered[:, 768:] * 3 ** 0.5, last, atol=1e-5)  # each layer's part: its normalised pool
    assert not torch.allclose(layered[:, :384], layered[:, 384:768], atol=1e-2)


SEARCH_SCRIPT = """
import json, sys
from peftprompt.retrieval.index import PassageIndex
index = PassageIndex.load(sys.argv[1])
queries = json.loads(sys.argv[2])
hits = {mode: index.search_batch(queries, k=5, mode=mode) for mode in ("bm25", "dense", "hybrid")}
print(json.dumps({mode: [[(h.passage.id, h.score) for h in ranked] for ranked in hits[mode]] for mode in hits}))
"""


def test_a_fresh_process_loads_the_same_index(minilm, tmp_path):
    questions = read_questions("musique_context", "dev", limit=4)
    index = PassageIndex.build(pooled_passages(questions), minilm, progress=False)
    assert len(index) == len(pooled_passages(questions)) == 79
    queries = [q.question for q in questions]
    expected = {mode: [[(h.passage.id, h.score) for h in hits] for hits in index.search_batch(queries, k=5, mode=mode)]
                for mode in ("bm25", "dense", "hybrid")}
    saved = index.save(tmp_path / "idx")
    done = subprocess.run([sys.executable, "-c", SEARCH_SCRIPT, str(saved), json.dumps(queries)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    for mode in expected:
        assert [[i for i, _ in hits] for hits in got[mode]] == [[i for i, _ in hits] for hits in expected[mode]]
        assert [s for hits in got[mode] for _, s in hits] == pytest.approx(
            [s for hits in expected[mode] for _, s in hits], abs=1e-5)
    assert all(len(hits) == 5 for hits in expected["hybrid"])


def test_cli_build_and_search(tmp_path, capsys):
    out = tmp_path / "idx"
    assert main(["index", "build", "--source", "musique_context", "--split", "dev", "--limit", "3",
                 "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "60 passages from musique_context/dev 3 questions"
    assert lines[1].startswith("built in ") and lines[1].endswith(f"wrote {out}")
    assert lines[2] == "musique_context/dev:"
    assert lines[3].split()[:3] == ["questions", "n=3", "hybrid"] and lines[4].split()[:2] == ["hops", "n=6"]
    passage = read_questions("musique_context", "dev", limit=1)[0].passages[0]
    assert main(["index", "search", "--index", str(out), "--k", "3", f"{passage.title}: {passage.text}"]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert len(shown) == 4 and shown[1].startswith("   1. ") and shown[1].endswith(f"{passage.title}  [{passage.id}]")
