"""Saving adapters atomically, checking broken adapter directories, and the parameter report."""

from __future__ import annotations

import pytest

from peftprompt import attach, parameter_report


def test_parameter_report_counts_and_measures(minilm_seq_cls):
    biases = sum(p.numel() for n, p in minilm_seq_cls.named_parameters() if n.endswith(".bias") and "classifier" not in n)
    head = sum(p.numel() for p in minilm_seq_cls.classifier.parameters())
    total = sum(p.numel() for p in minilm_seq_cls.parameters())
    report = parameter_report(attach(minilm_seq_cls, "bitfit", task="seq_cls"))
    assert report.method == "bitfit"
    assert report.trainable_params == biases + head == 26_882
    # the deltas live beside the frozen biases, and PEFT keeps the original head beside its trained copy
    assert report.total_params == total + biases + head
    # float32 deltas and head, plus the safetensors header
    assert 4 * report.trainable_params < report.adapter_bytes < 4 * report.trainable_params + 20_000
    assert report.as_dict()["trainable_pct"] == pytest.approx(100 * report.trainable_params / report.total_params)
