"""The passage index: reciprocal rank fusion on a hand-made corpus (a stub encoder fixes the dense ranking), save /
load in a fresh process with the real MiniLM, the manifest checks, atomic saves, recall@k and the command line."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from peftprompt.cli import main
from peftprompt.errors import InputError
from peftprompt.retrieval import index as index_module
from peftprompt.retrieval.index import RRF_K, PassageIndex
from peftprompt.retrieval.passages import Hop, OpenBookQuestion, Passage
from peftprompt.retrieval.recall import recall_at_k

from conftest import CORPUS, COSINES, StubEncoder

QUERY = "apollo moon landing"


def titles(hits) -> list[str]:
    return [hit.passage.title for hit in hits]


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

    from peftprompt.retrieval.embed import single_thread

    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), single_thread():
        assert torch.get_num_threads() == 1
        raise RuntimeError
    assert torch.get_num_threads() == before
