"""The passage index: reciprocal rank fusion on a hand-made corpus (a stub encoder fixes the dense ranking), save /
load in a fresh process with the real MiniLM, the manifest checks, atomic saves, recall@k and the command line."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from peftprompt.cli import main
from peftprompt.errors import InputError
from peftprompt.retrieval import index as index_module
from peftprompt.retrieval.embed import SentenceEncoder, same_encoder
from peftprompt.retrieval.index import RRF_K, PassageIndex
from peftprompt.retrieval.passages import Hop, OpenBookQuestion, Passage, pooled_passages, read_questions
from peftprompt.retrieval.recall import recall_at_k

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
QUERY = "apollo moon landing"


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


def titles(hits) -> list[str]:
    return [hit.passage.title for hit in hits]


@pytest.fixture
def stub_index() -> PassageIndex:
    return PassageIndex.build(CORPUS, StubEncoder(COSINES), progress=False)


def test_reciprocal_rank_fusion_order(stub_index):
    assert titles(stub_index.search(QUERY, k=4, mode="bm25")) == ["Alpha", "Beta"]  # only passages sharing a word
    dense = stub_index.search(QUERY, k=4, mode="dense")
    assert titles(dense) == ["Gamma", "Beta", "Delta", "Alpha"]
    assert [h.score for h in dense] == pytest.approx([0.9, 0.8, 0.7, 0.1], abs=1e-6)
    hybrid = stub_index.search(QUERY, k=4, mode="hybrid")
    assert titles(hybrid) == ["Beta", "Alpha", "Gamma", "Delta"]
    assert [h.score for h in hybrid] == pytest.approx(
        [2 / (RRF_K + 2), 1 / (RRF_K + 1) + 1 / (RRF_K + 4), 1 / (RRF_K + 1), 1 / (RRF_K + 3)])
    assert [h.rank for h in hybrid] == [1, 2, 3, 4]
    assert titles(stub_index.search(QUERY, k=2)) == ["Beta", "Alpha"]
    assert [titles(hits) for hits in stub_index.search_batch([QUERY, "programme"], k=1, mode="bm25")] == [
        ["Alpha"], ["Beta"]]


@pytest.mark.parametrize("order", [[0, 1], [1, 0]])
def test_equal_fused_scores_keep_passage_order(order):
    # A is first by BM25 and second by cosine, B the other way round: equal fused scores, so passage order decides.
    pair = [Passage.make("A", "apollo moon landing"), Passage.make("B", "apollo")]
    index = PassageIndex.build([pair[i] for i in order], StubEncoder({"apollo moon landing": 0.5, "apollo": 0.6}),
                               progress=False)
    hits = index.search(QUERY, k=2)
    assert hits[0].score == hits[1].score == 1 / (RRF_K + 1) + 1 / (RRF_K + 2)
    assert titles(hits) == [["A", "B"][i] for i in order]


@pytest.mark.parametrize("positive_only", [False, True])
def test_partial_ranking_is_the_stable_full_sort(positive_only):
    # Many ties, including at the cut: the partitioned ranking must equal a stable sort of the whole corpus.
    rng = np.random.default_rng(0)
    for size in (1, 7, 60, 500):
        scores = rng.integers(0, 4, size).astype(np.float32)
        for depth in (1, 3, 50, 1000):
            expected = np.argsort(-scores, kind="stable")[:depth]
            if positive_only:
                expected = expected[scores[expected] > 0]
            assert index_module._ranking(scores, depth, positive_only).tolist() == expected.tolist()


def test_bad_mode_and_k_are_input_errors(stub_index):
    with pytest.raises(InputError, match="unknown search mode 'sparse'"):
        stub_index.search(QUERY, mode="sparse")
    with pytest.raises(InputError, match="k must be >= 1, got 0"):
        stub_index.search(QUERY, k=0)


def test_empty_index_searches_to_nothing(tmp_path):
    empty = PassageIndex.build([], StubEncoder({}), progress=False)
    assert empty.search(QUERY) == [] and empty.search_batch([QUERY, "x"], mode="bm25") == [[], []]
    loaded = PassageIndex.load(empty.save(tmp_path / "idx"), encoder=StubEncoder({}))
    assert len(loaded) == 0 and loaded.search(QUERY, mode="dense") == []


@pytest.fixture
def saved(stub_index, tmp_path) -> Path:
    return stub_index.save(tmp_path / "idx")


def test_save_writes_the_manifest(saved):
    manifest = json.loads((saved / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["passages"] == 4
    assert manifest["encoder_id"]["name"] == "stub" and manifest["settings"]["build_seconds"] >= 0
    assert set(manifest["sha256"]) == {"passages.jsonl", "embeddings.safetensors", "bm25/data.csc.index.npy",
                                       "bm25/indices.csc.index.npy", "bm25/indptr.csc.index.npy",
                                       "bm25/vocab.index.json", "bm25/params.index.json"}
    assert len((saved / "passages.jsonl").read_text().splitlines()) == 4


def damage(path: Path, how: str) -> None:
    if how == "corrupt":
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "delete":
        path.unlink()
    else:
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(lines[:-1]))


@pytest.mark.parametrize("name, how, message", [
    ("embeddings.safetensors", "corrupt", "does not match the sha256 in the manifest"),
    ("bm25/vocab.index.json", "delete", "is missing: the index is incomplete"),
    ("passages.jsonl", "truncate", "does not match the sha256 in the manifest"),
    ("manifest.json", "delete", "is not a passage index"),
])
def test_load_names_the_damaged_file(saved, name, how, message):
    damage(saved / name, how)
    with pytest.raises(InputError, match=message) as info:
        PassageIndex.load(saved)
    assert info.value.file == str(saved / name) and str(saved / name) in str(info.value)


def test_load_refuses_a_partial_index_and_unknown_version(saved):
    manifest = json.loads((saved / "manifest.json").read_text())
    (saved / "manifest.json").write_text(json.dumps({**manifest, "passages": 5}))
    with pytest.raises(InputError, match="holds 4 passages, the manifest says 5: the index is partial") as info:
        PassageIndex.load(saved)
    assert info.value.file == str(saved / "passages.jsonl")
    (saved / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(InputError, match="unknown index format version 99") as info:
        PassageIndex.load(saved)
    assert info.value.file == str(saved / "manifest.json")
    with pytest.raises(InputError, match="does not exist"):
        PassageIndex.load(saved.parent / "nothing")


def test_load_refuses_another_encoder(saved):
    assert PassageIndex.load(saved, encoder=StubEncoder(COSINES, fingerprint=0.5001)).search(QUERY, k=1)
    with pytest.raises(InputError, match=r"built with another embedding model: stub, not other \(elsewhere\)") as info:
        other = StubEncoder(COSINES, fingerprint=0.6)
        other.encoder_id.update(name="other", name_or_path="elsewhere")
        PassageIndex.load(saved, encoder=other)
    assert info.value.file == str(saved / "manifest.json")


def test_a_failed_save_leaves_the_old_index_intact(saved, monkeypatch):
    def broken(path, embeddings):
        path.write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(index_module, "_write_embeddings", broken)
    smaller = PassageIndex.build(CORPUS[:2], StubEncoder(COSINES), progress=False)
    with pytest.raises(OSError, match="disk full"):
        smaller.save(saved)
    assert titles(PassageIndex.load(saved).search(QUERY, k=4, mode="bm25")) == ["Alpha", "Beta"]
    assert len(PassageIndex.load(saved)) == 4
    assert sorted(p.name for p in saved.parent.iterdir()) == ["idx"]  # no temporary directory left behind


def test_save_refuses_to_replace_another_directory(stub_index, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="exists and is not a passage index"):
        stub_index.save(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_recall_at_k_of_questions_and_hops(stub_index):
    alpha, beta, gamma, delta = (p.id for p in CORPUS)
    question = OpenBookQuestion(
        id="q1", question=QUERY, answer="x", aliases=(), dataset="musique_context", split="dev", kind="2hop",
        passages=tuple(CORPUS), supporting=(beta, gamma),
        hops=(Hop("apollo programme", "x", supporting=(beta,)), Hop("space race", "y", supporting=(delta,))))
    report = recall_at_k(stub_index, [question], ks=(1, 2, 3), mode="hybrid")  # fused: Beta, Alpha, Gamma, Delta
    assert report.questions.n == 1
    assert report.questions.recall == {1: 0.5, 2: 0.5, 3: 1.0}
    assert report.questions.all_found == {1: 0.0, 2: 0.0, 3: 1.0}
    # "apollo programme": Beta first in both lists; "space race": Delta only by BM25 and 3rd by cosine, so 1st fused
    assert report.hops.n == 2 and report.hops.recall == {1: 1.0, 2: 1.0, 3: 1.0}
    assert recall_at_k(stub_index, [question], ks=(1,), mode="bm25").questions.recall == {1: 0.0}
    no_hops = recall_at_k(stub_index, [dataclasses.replace(question, hops=())], ks=(1,))
    assert no_hops.hops is None
    with pytest.raises(InputError, match="cut-offs"):
        recall_at_k(stub_index, [question], ks=(0, 1))


# --- the real MiniLM ---------------------------------------------------------------------------------------------


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


@pytest.mark.parametrize("argv, message", [
    (["index", "search", "--index", "/no/such/index", "q"], "passage index /no/such/index does not exist"),
    (["index", "build", "--split", "dev", "--source", "musique_context", "--out", "x"],
     "--split dev must follow the --source it belongs to"),
    (["index", "build", "--source", "musique", "--out", "x"], "unknown source 'musique'"),
    (["index", "build", "--source", "musique_context", "--split", "test", "--out", "x"], "has split(s) train, dev"),
])
def test_cli_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("peftprompt index: error: ") and message in err and err.count("\n") == 1


def test_single_thread_restores_the_thread_count():
    import torch

    from peftprompt.retrieval.embed import single_thread

    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), single_thread():
        assert torch.get_num_threads() == 1
        raise RuntimeError
    assert torch.get_num_threads() == before
