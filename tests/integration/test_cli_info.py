"""The `peftprompt` command line and the SST-2 reader's errors."""

from __future__ import annotations

import json

import pytest

from peftprompt.cli import main


def test_info_prints_the_report_as_json(capsys):
    assert main(["info", "--model", "minilm", "--method", "bitfit", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["method"] == "bitfit"
    assert row["trainable_params"] == 26_882
    assert row["trainable_pct"] == pytest.approx(100 * 26_882 / row["total_params"])
    assert row["adapter_bytes"] > 4 * 26_882


def test_info_prints_a_table(capsys):
    assert main(["info", "--model", "minilm", "--method", "lora"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "minilm (seq_cls)"
    assert out[1].startswith("| method | trainable params |")
    assert out[3].startswith("| lora | 74,498 |")


@pytest.mark.slow
def test_info_all_lists_every_method_refused_ones_with_the_reason(tiny_bert, capsys):
    from peftprompt.methods import METHODS, REFUSED_METHODS

    assert main(["info", "--model", str(tiny_bert), "--method", "all", "--json"]) == 0
    rows = {row["method"]: row for row in json.loads(capsys.readouterr().out)}
    assert list(rows) == [*METHODS, *REFUSED_METHODS]
    for method in ("lora", "dora", "vera", "ln_tuning", "osf", "full"):
        assert rows[method]["refused"] is None and rows[method]["trainable_params"] > 0
        assert rows[method]["adapter_bytes"] > 4 * rows[method]["trainable_params"]
    assert rows["xlora"]["refused"].startswith("method 'xlora' is refused: X-LoRA mixes LoRA adapters")
    assert rows["prefix"]["refused"] is None  # BERT takes past_key_values (DistilBERT does not)
    assert rows["shadow"]["refused"].startswith("method 'shadow' cannot apply to BertForSequenceClassification")
    assert rows["eva"]["refused"].startswith("method 'eva' needs eva_dataloader=")
