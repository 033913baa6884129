"""Entity-level precision / recall / F1 (seqeval) as an `evaluate` module, loaded from this file (no Hub access):
``peftprompt.metrics.load_metric("seqeval")`` or ``evaluate.load("<this folder>")``. The scores are
``compute_score.entity_f1``, shared with `peftprompt.metrics.entity_f1`.

Unlike the Hub's ``seqeval`` module, the results are the keys of `peftprompt.metrics.entity_f1` (``precision``,
``recall``, ``f1``, the entity counts and ``per_type``), the default scoring is conlleval's (the CoNLL-2003 measure)
and IOB1 tags are converted to IOB2 before strict scoring.
"""

import datasets
import evaluate

from .compute_score import entity_f1

_DESCRIPTION = """
Entity-level precision, recall and F1 of tagged sentences (seqeval), as for CoNLL-2003: conlleval-compatible
scoring by default, seqeval's strict IOB2 matching with mode="strict"; IOB1 tags (scheme="IOB1") are converted to
IOB2 first.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[list[str]]`): Predicted tags, one list per sentence ("O", "B-TYPE" or "I-TYPE").
    references (`list[list[str]]`): Gold tags, same shape.
    scheme (`str`, defaults to "IOB2"): "IOB2" or "IOB1".
    mode (`str`, defaults to "default"): "default" (conlleval) or "strict".

Returns:
    `dict`: precision, recall, f1 (in [0, 1]; 0.0 where undefined), gold_entities, predicted_entities and
    per_type ({"PER": {"precision", "recall", "f1", "gold_entities"}, ...}).

Examples:
    >>> metric = peftprompt.metrics.load_metric("seqeval")
    >>> metric.compute(predictions=[["B-PER", "I-PER", "O"]], references=[["B-PER", "I-PER", "O"]])["f1"]
    1.0
"""

_CITATION = """
@misc{seqeval,
  title={{seqeval}: A Python framework for sequence labeling evaluation},
  url={https://github.com/chakki-works/seqeval},
  author={Hiroki Nakayama},
  year={2018},
}
@inproceedings{tjong-kim-sang-de-meulder-2003-introduction,
  title = "Introduction to the {C}o{NLL}-2003 Shared Task: Language-Independent Named Entity Recognition",
  author = "Tjong Kim Sang, Erik F. and De Meulder, Fien",
  booktitle = "Proceedings of the Seventh Conference on Natural Language Learning at HLT-NAACL 2003",
  year = "2003",
  pages = "142--147",
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Seqeval(evaluate.Metric):
    """Entity-level precision, recall and F1 over tagged sentences."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            homepage="https://github.com/chakki-works/seqeval",
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("string")),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
        )

    def _compute(self, predictions, references, scheme: str = "IOB2", mode: str = "default") -> dict:
        return entity_f1(predictions, references, scheme=scheme, mode=mode)
