"""Recursive (self-ask) prompting data: decomposition trees, converters, the unroller and the collator."""

from .collator import EncodedEpisode, EpisodeEncoder, SelfAskCollator, pack_rows
from .sources import SOURCES, convert, convert_report
from .tree import (
    ANSWER_SOURCES,
    DEFAULT_MAX_DEPTH,
    EVALUATION_ONLY_DATASETS,
    SCHEMA,
    Node,
    SkipReport,
    TreeError,
    check_trainable,
    read_trees,
    read_trees_report,
    resolve_templates,
    tree_stats,
    validate,
    write_trees,
)
from .unroll import LEAST_TO_MOST, SELF_ASK, TEMPLATES, Episode, LossPolicy, Span, Template, Unroller, parse_episode

__all__ = [
    "ANSWER_SOURCES",
    "LEAST_TO_MOST",
    "SELF_ASK",
    "TEMPLATES",
    "EncodedEpisode",
    "Episode",
    "EpisodeEncoder",
    "LossPolicy",
    "SelfAskCollator",
    "Span",
    "Template",
    "Unroller",
    "pack_rows",
    "parse_episode",
    "DEFAULT_MAX_DEPTH",
    "EVALUATION_ONLY_DATASETS",
    "SCHEMA",
    "SOURCES",
    "Node",
    "SkipReport",
    "TreeError",
    "check_trainable",
    "convert",
    "convert_report",
    "read_trees",
    "read_trees_report",
    "resolve_templates",
    "tree_stats",
    "validate",
    "write_trees",
]
