"""A passage index: BM25 (`bm25s`) and dense (`SentenceEncoder`) retrieval over the same passages, fused by
reciprocal rank, saved atomically with a manifest that `PassageIndex.load` checks.

```py
>>> index = PassageIndex.build(pooled_passages(read_questions("musique_context", "dev")))
>>> index.save("idx/")
>>> index = PassageIndex.load("idx/")     # the encoder loads at the first dense or hybrid query
>>> [hit.passage.title for hit in index.search("Who directed Jaws?", k=3)]
```

On disk (``directory/``): ``passages.jsonl`` (one ``{id, title, text}`` a line, in index order),
``embeddings.safetensors`` (``embeddings``: float32, one L2-normalised row a passage), ``bm25/`` (the `bm25s` files)
and ``manifest.json`` (`INDEX_FORMAT_VERSION`, the encoder's ``encoder_id``, the number of passages, the sha256 of
every other file, the build settings and time).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import bm25s
import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from ..atomic import write_dir_atomically
from ..errors import InputError, InputFileNotFoundError
from .embed import SentenceEncoder, describe_encoder, native_bf16, same_encoder, single_thread
from .passages import Passage, as_dict

INDEX_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PASSAGES_FILE = "passages.jsonl"
EMBEDDINGS_FILE = "embeddings.safetensors"
BM25_DIR = "bm25"
BM25_FILES = ("data.csc.index.npy", "indices.csc.index.npy", "indptr.csc.index.npy", "vocab.index.json",
              "params.index.json")
INDEX_FILES = (PASSAGES_FILE, EMBEDDINGS_FILE, *(f"{BM25_DIR}/{name}" for name in BM25_FILES))
"""The files every index has, besides the manifest (paths relative to the index directory)."""

MODES = ("hybrid", "bm25", "dense")
RRF_K = 60
"""Reciprocal rank fusion: a passage at rank ``r`` (1-based) of a list scores ``1 / (RRF_K + r)``."""
RRF_DEPTH = 50
"""How many candidates of each list the fusion sees (at least ``k``)."""
PASSAGE_MAX_LENGTH = 256
"""Tokens of ``"{title}: {text}"`` embedded per passage."""
QUERY_MAX_LENGTH = 128
FEW_QUERIES = 8
"""Up to this many queries are encoded on one thread (`single_thread`)."""
STOPWORDS = "en"
BM25_PARAMETERS = {"method": "lucene", "k1": 1.5, "b": 0.75}


@dataclass(frozen=True)
class Hit:
    """A retrieved passage: the `passage`, its `score` (BM25, cosine or fused reciprocal rank, after the mode) and
    its `rank` (1-based)."""

    passage: Passage
    score: float
    rank: int


def passage_text(passage: Passage) -> str:
    """What is indexed of a passage: ``"{title}: {text}"``."""
    return f"{passage.title}: {passage.text}"


def _tokenize(texts: Sequence[str]) -> list[list[str]]:
    """BM25 tokens: lower-cased words of two or more characters, English stopwords removed, no stemming."""
    return bm25s.tokenize(list(texts), lower=True, stopwords=STOPWORDS, return_ids=False, show_progress=False)


def _ranking(scores: np.ndarray, depth: int, positive_only: bool = False) -> np.ndarray:
    """Indices of the `depth` best `scores`, best first; equal scores keep passage order.

    Only the passages scoring at least the `depth`-th best score are sorted (a partition finds it), not the corpus.
    """
    if depth < len(scores):
        threshold = np.partition(scores, len(scores) - depth)[len(scores) - depth]
        candidates = np.flatnonzero(scores >= threshold)  # ascending, so the stable sort keeps ties in passage order
    else:
        candidates = np.arange(len(scores))
    order = candidates[np.argsort(-scores[candidates], kind="stable")][:depth]
    return order[scores[order] > 0] if positive_only else order


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class PassageIndex:
    """BM25 and dense retrieval over `passages`; build one with `build`, reopen a saved one with `load`.

    Args:
        passages (`list[Passage]`): The passages, in index order (ties in a ranking keep this order).
        embeddings (`np.ndarray`): Their float32 L2-normalised embeddings, shape ``(len(passages), hidden)``.
        bm25 (`bm25s.BM25`): The BM25 index over `_tokenize` of their `passage_text`, or `None` when there are no
            passages.
        encoder_id (`dict`): `SentenceEncoder.encoder_id` of the model that made `embeddings`.
        encoder (`SentenceEncoder`, *optional*): That model; loaded at the first dense or hybrid query if not given.
        settings (`dict`, *optional*): How the index was built (recorded in the manifest).

    Attributes:
        path (`Path`): The directory the index was loaded from (`None` for a built one).
    """

    def __init__(
        self,
        passages: list[Passage],
        embeddings: np.ndarray,
        bm25: Optional[bm25s.BM25],
        encoder_id: dict[str, Any],
        encoder: Optional[SentenceEncoder] = None,
        settings: Optional[dict[str, Any]] = None,
    ):
        self.passages = list(passages)
        self.embeddings = embeddings
        self.bm25 = bm25
        self.encoder_id = encoder_id
        self._encoder = encoder
        self.settings = settings or {}
        self.path: Optional[Path] = None

    def __len__(self) -> int:
        return len(self.passages)

    @classmethod
    def build(
        cls,
        passages: Sequence[Passage],
        encoder: Union[str, SentenceEncoder] = "minilm",
        progress: bool = True,
        max_length: int = PASSAGE_MAX_LENGTH,
        batch_size: int = 32,
        bf16: Optional[bool] = None,
    ) -> "PassageIndex":
        """Index `passages` (deduplicated by id, first kept).

        Args:
            passages (`Sequence[Passage]`): The corpus, e.g. `peftprompt.retrieval.passages.pooled_passages`.
            encoder (`str` or `SentenceEncoder`, defaults to ``"minilm"``): The dense encoder, or its backbone name.
            progress (`bool`, defaults to `True`): Show a progress bar while embedding.
            max_length (`int`, defaults to `PASSAGE_MAX_LENGTH`): Tokens embedded per passage.
            batch_size (`int`, defaults to 32): Passages per forward pass.
            bf16 (`bool`, *optional*): Embed the passages with a bfloat16 copy of the encoder (queries stay float32); by
                default where the CPU has native bfloat16 (`native_bf16`), where it is several times faster and
                ranks as float32 does but for rare ties (`benchmarks/openbook.py` records build times).
        """
        start = time.perf_counter()
        encoder = encoder if isinstance(encoder, SentenceEncoder) else SentenceEncoder(encoder)
        unique: dict[str, Passage] = {}
        for passage in passages:
            unique.setdefault(passage.id, passage)
        passages = list(unique.values())
        texts = [passage_text(p) for p in passages]
        bf16 = native_bf16() if bf16 is None else bf16
        embeddings = encoder.encode(texts, batch_size=batch_size, max_length=max_length, progress=progress,
                                    bf16=bf16).numpy()
        bm25 = bm25s.BM25(**BM25_PARAMETERS) if passages else None
        if bm25 is not None:
            bm25.index(_tokenize(texts), show_progress=False)
        settings = {"max_length": max_length, "bf16": bf16, "rrf_k": RRF_K, "bm25": BM25_PARAMETERS,
                    "bm25_tokens": f"lower-cased words, stopwords={STOPWORDS}, no stemmer",
                    "build_seconds": round(time.perf_counter() - start, 3)}
        return cls(passages, embeddings, bm25, encoder.encoder_id, encoder=encoder, settings=settings)

    @property
    def encoder(self) -> SentenceEncoder:
        """The dense encoder; loaded from the manifest's ``encoder_id`` name at first use, and checked against it."""
        if self._encoder is None:
            encoder = SentenceEncoder(self.encoder_id["name"])
            _check_encoder(encoder, self.encoder_id, self.path / MANIFEST if self.path else None)
            self._encoder = encoder
        return self._encoder

    def search(self, query: str, k: int = 5, mode: str = "hybrid") -> list[Hit]:
        """The `k` best passages for `query` (see `search_batch`)."""
        return self.search_batch([query], k=k, mode=mode)[0]

    def search_batch(self, queries: Sequence[str], k: int = 5, mode: str = "hybrid") -> list[list[Hit]]:
        """The `k` best passages for each of `queries`.

        Args:
            queries (`Sequence[str]`): The queries.
            k (`int`, defaults to 5): Passages per query (fewer when the index is smaller, or in ``bm25`` mode when
                fewer passages share a word with the query).
            mode (`str`, defaults to ``"hybrid"``): ``"bm25"``, ``"dense"`` (cosine similarity) or ``"hybrid"``
                (reciprocal rank fusion: ``sum 1 / (RRF_K + rank)`` over the top ``max(RRF_DEPTH, k)`` of each).
                Equal scores keep passage order.

        Raises:
            InputError: An unknown `mode`, or `k` < 1.
        """
        if mode not in MODES:
            raise InputError(f"unknown search mode {mode!r}; choose one of {', '.join(MODES)}", field="mode")
        if k < 1:
            raise InputError(f"k must be >= 1, got {k}", field="k")
        if not self.passages or not queries:
            return [[] for _ in queries]
        depth = k if mode != "hybrid" else max(RRF_DEPTH, k)
        bm25 = self._bm25_scores(queries) if mode != "dense" else None
        dense = self._dense_scores(queries) if mode != "bm25" else None
        results = []
        for row in range(len(queries)):
            if mode == "bm25":
                order = _ranking(bm25[row], k, positive_only=True)
                scores = bm25[row][order]
            elif mode == "dense":
                order = _ranking(dense[row], k)
                scores = dense[row][order]
            else:
                fused = np.zeros(len(self.passages))
                for ranked in (_ranking(bm25[row], depth, positive_only=True), _ranking(dense[row], depth)):
                    fused[ranked] += 1.0 / (RRF_K + np.arange(1, len(ranked) + 1))
                order = _ranking(fused, k, positive_only=True)
                scores = fused[order]
            results.append([Hit(self.passages[i], float(s), rank)
                            for rank, (i, s) in enumerate(zip(order.tolist(), scores.tolist()), start=1)])
        return results

    def _bm25_scores(self, queries: Sequence[str]) -> np.ndarray:
        scores = np.zeros((len(queries), len(self.passages)), dtype=np.float32)
        for row, tokens in enumerate(_tokenize(queries)):
            ids = self.bm25.get_tokens_ids([t for t in tokens if t])
            if ids:
                scores[row] = self.bm25.get_scores_from_ids(ids)
        return scores

    def _dense_scores(self, queries: Sequence[str]) -> np.ndarray:
        # A few short queries are matrices too small to split over threads: one thread skips the synchronisation
        # that costs more than the arithmetic, most of all on a busy machine.
        threads = single_thread() if len(queries) <= FEW_QUERIES else contextlib.nullcontext()
        with threads:
            vectors = self.encoder.encode(list(queries), batch_size=64, max_length=QUERY_MAX_LENGTH).numpy()
        return vectors @ self.embeddings.T

    def save(self, directory: Union[str, os.PathLike]) -> Path:
        """Write the index to `directory` atomically: into a temporary sibling directory first, swapped in once
        complete, so an existing index there is replaced whole or not at all.

        Raises:
            InputError: `directory` exists, is not empty and holds no index (it is not replaced).
        """
        directory = check_index_target(directory)

        def write(tmp: Path) -> None:
            _write_passages(tmp / PASSAGES_FILE, self.passages)
            _write_embeddings(tmp / EMBEDDINGS_FILE, self.embeddings)
            if self.bm25 is not None:
                self.bm25.save(str(tmp / BM25_DIR), show_progress=False)
            files = sorted(str(path.relative_to(tmp).as_posix()) for path in tmp.rglob("*") if path.is_file())
            manifest = {
                "format_version": INDEX_FORMAT_VERSION,
                "encoder_id": self.encoder_id,
                "passages": len(self.passages),
                "dimensions": int(self.embeddings.shape[1]),
                "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "settings": self.settings,
                "sha256": {name: _sha256((tmp / name).read_bytes()) for name in files},
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")

        return write_dir_atomically(directory, write)

    @classmethod
    def load(cls, directory: Union[str, os.PathLike], encoder: Optional[SentenceEncoder] = None) -> "PassageIndex":
        """Open an index written by `save`, checking every file against the manifest.

        Args:
            directory (`str` or `os.PathLike`): The index directory.
            encoder (`SentenceEncoder`, *optional*): The dense encoder to query with; it must be the model the index
                was built with. Without it, the model named in the manifest loads at the first dense or hybrid query.

        Raises:
            InputError: A missing directory or file, a file whose sha256 differs from the manifest's (corrupt), fewer
                or more passages than the manifest says (partial), an unknown format version, or an `encoder` other
                than the index's; the message names the file.
        """
        directory = Path(directory)
        if not directory.exists():
            raise InputFileNotFoundError(f"passage index {directory} does not exist", file=directory)
        if not directory.is_dir():
            raise InputError(f"{directory} is a file, not a passage index directory", file=directory)
        manifest = _read_manifest(directory / MANIFEST)
        if encoder is not None:
            _check_encoder(encoder, manifest["encoder_id"], directory / MANIFEST)
        count = manifest["passages"]
        required = INDEX_FILES if count else INDEX_FILES[:2]  # an empty index has no BM25 files
        data = {name: _checked_bytes(directory, name, manifest["sha256"]) for name in required}
        passages = _read_passages(directory / PASSAGES_FILE, data[PASSAGES_FILE])
        if len(passages) != count:
            raise InputError(f"holds {len(passages)} passages, the manifest says {count}: the index is partial; "
                             "rebuild it", file=directory / PASSAGES_FILE)
        embeddings = _read_embeddings(directory / EMBEDDINGS_FILE, data[EMBEDDINGS_FILE], count)
        bm25 = bm25s.BM25.load(str(directory / BM25_DIR), show_progress=False) if count else None
        if bm25 is not None and bm25.scores["num_docs"] != count:
            raise InputError(f"indexes {bm25.scores['num_docs']} passages, the manifest says {count}: the index is "
                             "partial; rebuild it", file=directory / BM25_DIR / "params.index.json")
        index = cls(passages, embeddings, bm25, manifest["encoder_id"], encoder=encoder, settings=manifest["settings"])
        index.path = directory
        return index


def check_index_target(directory: Union[str, os.PathLike]) -> Path:
    """`directory` as a `Path`, if an index may be saved there: it does not exist, is empty or holds an index.

    Raises:
        InputError: `directory` is a file, or a directory with other content (`PassageIndex.save` replaces it whole).
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise InputError(f"{directory} is a file, not a passage index directory", file=directory)
    if directory.is_dir() and any(directory.iterdir()) and not (directory / MANIFEST).is_file():
        raise InputError(f"{directory} exists and is not a passage index (no {MANIFEST}); refusing to replace it",
                         file=directory)
    return directory


def _check_encoder(encoder: SentenceEncoder, built_with: dict[str, Any], where: Optional[Path]) -> None:
    if not same_encoder(encoder.encoder_id, built_with):
        raise InputError(f"the index was built with another embedding model: {describe_encoder(built_with)}, not "
                         f"{describe_encoder(encoder.encoder_id)}; query it with that model or rebuild the index",
                         file=where)


def _write_passages(path: Path, passages: Sequence[Passage]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for passage in passages:
            f.write(json.dumps(as_dict(passage), ensure_ascii=False) + "\n")


def _write_embeddings(path: Path, embeddings: np.ndarray) -> None:
    path.write_bytes(save_safetensors({"embeddings": np.ascontiguousarray(embeddings, dtype=np.float32)}))


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputFileNotFoundError(f"{path} is missing: {path.parent} is not a passage index (or was not saved "
                                     "completely); build one with `peftprompt index build`", file=path)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read the index manifest ({err})", file=path) from err
    if not isinstance(manifest, dict) or manifest.get("format_version") != INDEX_FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise InputError(f"unknown index format version {version!r}; this version of peftprompt reads "
                         f"{INDEX_FORMAT_VERSION}: rebuild the index", file=path)
    types = {"encoder_id": dict, "passages": int, "sha256": dict, "settings": dict}
    for key, kind in types.items():
        if not isinstance(manifest.get(key), kind):
            raise InputError(f"must be a {kind.__name__}, got {manifest.get(key)!r}", file=path, field=key)
    return manifest


def _checked_bytes(directory: Path, name: str, hashes: dict[str, str]) -> bytes:
    path = directory / name
    if name not in hashes:
        raise InputError(f"the manifest lists no sha256 for {name}: the index is incomplete; rebuild it",
                         file=directory / MANIFEST)
    if not path.is_file():
        raise InputFileNotFoundError(f"{path} is missing: the index is incomplete; rebuild it", file=path)
    data = path.read_bytes()
    if _sha256(data) != hashes[name]:
        raise InputError(f"{path} does not match the sha256 in the manifest: the file is corrupt, partial or was "
                         "changed; rebuild the index", file=path)
    return data


def _read_passages(path: Path, data: bytes) -> list[Passage]:
    passages = []
    for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        try:
            row = json.loads(line)
            passages.append(Passage(row["id"], row["title"], row["text"]))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise InputError(f"not a passage ({err!r})", file=path, line=number) from err
    return passages


def _read_embeddings(path: Path, data: bytes, count: int) -> np.ndarray:
    try:
        embeddings = load_safetensors(data)["embeddings"]
    except Exception as err:  # safetensors raises its own error types on a damaged header
        raise InputError(f"cannot read the embeddings ({type(err).__name__}: {err})", file=path) from err
    if embeddings.ndim != 2 or embeddings.shape[0] != count:
        raise InputError(f"holds embeddings of shape {tuple(embeddings.shape)}, the manifest says {count} passages: "
                         "the index is partial; rebuild it", file=path)
    return embeddings
