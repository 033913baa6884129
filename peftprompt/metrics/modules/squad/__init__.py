"""The packaged SQuAD module (``squad.py``) and its scores (``compute_score.py``)."""
