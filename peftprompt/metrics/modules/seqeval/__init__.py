"""The packaged seqeval module (``seqeval.py``) and its scores (``compute_score.py``)."""
