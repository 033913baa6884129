"""The packaged accuracy module (``accuracy.py``) and its score (``compute_score.py``)."""
