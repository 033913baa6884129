"""The packaged `evaluate` modules, one folder each (``<name>/<name>.py``, the score in ``<name>/compute_score.py``).

`peftprompt.metrics.load_metric` loads them by path; nothing here imports `evaluate`.
"""
