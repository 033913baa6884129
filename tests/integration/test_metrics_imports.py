"""Metrics on small hand-made examples: accuracy, entity F1 (IOB1 / IOB2, conlleval / strict), SQuAD EM and F1; the
packaged `evaluate` modules loaded offline, combined, and a user's own module by path."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_importing_metrics_data_and_selfask_evaluation_loads_neither_evaluate_nor_the_engine():
    code = (
        "import sys, peftprompt.metrics\n"
        "assert 'evaluate' not in sys.modules and 'seqeval' not in sys.modules, 'metrics imported evaluate'\n"
        "import peftprompt.data, peftprompt.selfask.evaluate\n"
        "print(sorted(m for m in sys.modules if m.startswith('peftprompt.training')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
