"""Recursive self-ask inference: the runner, and the answerers of its follow-up questions."""

from .answerers import (
    Answer,
    Answerer,
    AnswererChain,
    OperatorAnswerer,
    RetrieverAnswerer,
    ToolAnswerer,
    answerer_from_name,
    answerers_from_names,
    as_answerer,
)
from .runner import (
    FEW_SHOT_DIRECT,
    FEW_SHOT_SELF_ASK,
    Continuation,
    ModelAnswerer,
    SelfAskResult,
    SelfAskRunner,
    format_episode,
    normalise_question,
)

__all__ = [
    "FEW_SHOT_DIRECT",
    "FEW_SHOT_SELF_ASK",
    "Answer",
    "Answerer",
    "AnswererChain",
    "Continuation",
    "ModelAnswerer",
    "OperatorAnswerer",
    "RetrieverAnswerer",
    "SelfAskResult",
    "SelfAskRunner",
    "ToolAnswerer",
    "answerer_from_name",
    "answerers_from_names",
    "as_answerer",
    "format_episode",
    "normalise_question",
]
