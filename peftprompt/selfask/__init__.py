"""Recursive self-ask inference: the runner (the protocol), the backends that generate for it, and the answerers of
its follow-up questions."""

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
from .backend import CallableBackend, Continuation, GenerationBackend, GenerationRequest
from .llama_cpp_backend import LlamaCppBackend  # imports llama_cpp only when a model is loaded
from .runner import (
    FEW_SHOT_DIRECT,
    FEW_SHOT_SELF_ASK,
    ModelAnswerer,
    SelfAskResult,
    SelfAskRunner,
    format_episode,
    normalise_question,
)
from .stopping import END_OF_LINE, StopRule, StopWatch
from .transformers_backend import TransformersBackend

__all__ = [
    "END_OF_LINE",
    "FEW_SHOT_DIRECT",
    "FEW_SHOT_SELF_ASK",
    "Answer",
    "Answerer",
    "AnswererChain",
    "CallableBackend",
    "Continuation",
    "GenerationBackend",
    "GenerationRequest",
    "LlamaCppBackend",
    "ModelAnswerer",
    "OperatorAnswerer",
    "RetrieverAnswerer",
    "SelfAskResult",
    "SelfAskRunner",
    "StopRule",
    "StopWatch",
    "ToolAnswerer",
    "TransformersBackend",
    "answerer_from_name",
    "answerers_from_names",
    "as_answerer",
    "format_episode",
    "normalise_question",
]
