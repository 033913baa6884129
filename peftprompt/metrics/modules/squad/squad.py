"""SQuAD exact match and token F1 as an `evaluate` module, loaded from this file (no Hub access):
``peftprompt.metrics.load_metric("squad")`` or ``evaluate.load("<this folder>")``. The scores are
``compute_score.qa_scores``, built on the per-question ``exact_match`` / ``token_f1`` that the self-ask evaluation
calls.

Unlike the Hub's ``squad`` module, predictions and references are plain strings and lists of gold aliases (no
SQuAD ``id`` dicts), and the scores are fractions in [0, 1] rather than percentages.
"""

import datasets
import evaluate

from .compute_score import qa_scores

_DESCRIPTION = """
SQuAD exact match and token-overlap F1 of predicted answers against their gold aliases (the best alias counts),
after SQuAD normalisation (lower case, no punctuation, no articles a/an/the, whitespace collapsed). Two answers that
normalise to nothing match (F1 1.0); one empty side scores 0.0.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): Predicted answers, one per question.
    references (`list[list[str]]`): The gold answer and its aliases, one non-empty list per question.

Returns:
    `dict`: exact_match and f1 (means over the questions, in [0, 1]) and count (the number of questions).

Examples:
    >>> metric = peftprompt.metrics.load_metric("squad")
    >>> metric.compute(predictions=["Paris"], references=[["Paris", "Paris, France"]])
    {'exact_match': 1.0, 'f1': 1.0, 'count': 1}
"""

_CITATION = """
@inproceedings{rajpurkar-etal-2016-squad,
  title = "{SQ}u{AD}: 100,000+ Questions for Machine Comprehension of Text",
  author = "Rajpurkar, Pranav and Zhang, Jian and Lopyrev, Konstantin and Liang, Percy",
  booktitle = "Proceedings of the 2016 Conference on Empirical Methods in Natural Language Processing",
  year = "2016",
  pages = "2383--2392",
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Squad(evaluate.Metric):
    """SQuAD exact match and token F1 over answers with aliases."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            homepage="https://rajpurkar.github.io/SQuAD-explorer/",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references) -> dict:
        return qa_scores(predictions, references)
