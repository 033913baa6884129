"""Model cards through huggingface_hub's `ModelCard`: the YAML metadata round-trips through `ModelCard.load`, the
adapter's and the merged export's cards come from the one template, section reading is robust, nothing reaches the
Hub."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from peftprompt.training import shipping
from peftprompt.training.shipping import (
    CARRIED_SECTIONS,
    MODEL_CARD_TEMPLATE,
    card_sections,
    export_merged,
    merged_model_card,
    read_model_card,
    write_model_card,
)

from conftest import REPO

ADAPTER_METADATA = {
    "base_model": "sentence-transformers/all-MiniLM-L6-v2",
    "datasets": ["sst2"],
    "library_name": "peft",
    "metrics": ["accuracy", "dev.f1"],
    "pipeline_tag": "text-classification",
    "tags": ["peftprompt", "lora"],
}


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    """Any attempt to download a card from the Hub fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a model card tried to reach the Hub: {args} {kwargs}")

    monkeypatch.setattr("huggingface_hub.repocard.hf_hub_download", refuse)


def adapter_card(directory: Path, command: str = "accelerate launch recipes/sst2_classification.py lr=1e-3") -> Path:
    return write_model_card(
        directory, base_model="minilm", method="lora", task="seq_cls", trainable_params=1_000,
        total_params=100_000, adapter_bytes=4_096, metrics={"accuracy": 0.8195, "dev": {"f1": 0.9}},
        command=command, config={"lr": 1e-3, "num_labels": 2}, datasets=["sst2"],
    )


def template_headings() -> list[str]:
    return re.findall(r"^## (.+)$", MODEL_CARD_TEMPLATE.read_text(), flags=re.M)


def headings(card: ModelCard) -> list[str]:
    return list(card_sections(card.text))


def test_adapter_card_metadata_round_trips_through_model_card_load(tmp_path):
    path = adapter_card(tmp_path / "sst2-lora")
    card = ModelCard.load(path)
    assert card.data.to_dict() == ADAPTER_METADATA
    assert card.data.base_model == ADAPTER_METADATA["base_model"] and card.data.library_name == "peft"
    assert headings(card) == template_headings()
    # what a reader of the card needs: the method, how to load, the command, results and parameter counts
    sections = card_sections(card.text)
    assert "peftprompt.load_adapter(base, \"path/to/sst2-lora\")" in sections["How to load"]
    assert "accelerate launch recipes/sst2_classification.py lr=1e-3" in sections["Training"]
    assert "| accuracy | 0.8195 |" in sections["Results"] and "| dev.f1 | 0.9000 |" in sections["Results"]
    assert "| trainable parameters | 1,000 |" in sections["Trainable parameters and adapter size"]
    assert ModelCard(path.read_text()).content == card.content  # a written card re-serialises unchanged


def test_full_checkpoint_card_is_a_transformers_card(tmp_path):
    path = write_model_card(tmp_path / "full", base_model="org/model", method="full", task="causal_lm",
                            trainable_params=10, total_params=10, adapter_bytes=40, metrics={}, command="x")
    data = ModelCard.load(path).data.to_dict()
    assert data == {"base_model": "org/model", "library_name": "transformers", "pipeline_tag": "text-generation",
                    "tags": ["peftprompt", "full"]}  # no datasets or metrics given: none in the header
    assert "AutoModelForCausalLM.from_pretrained" in path.read_text() and "(no results given)" in path.read_text()


def test_merged_card_comes_from_the_same_template_and_carries_the_adapters_sections(tmp_path):
    adapter_dir = tmp_path / "sst2-lora"
    adapter = ModelCard.load(adapter_card(adapter_dir))
    merged = merged_model_card(adapter_dir, tmp_path / "merged", base_model="minilm", method="lora", task="seq_cls")
    assert merged.data.to_dict() == {**ADAPTER_METADATA, "library_name": "transformers",
                                     "tags": ["peftprompt", "lora", "merged"]}
    reloaded = ModelCard(str(merged))  # what export_merged writes, read back
    assert reloaded.data.to_dict() == merged.data.to_dict()
    assert headings(merged) == headings(adapter) == template_headings()
    ours, theirs = card_sections(merged.text), card_sections(adapter.text)
    assert ours["Training"] == theirs["Training"] and ours["Results"] == theirs["Results"]
    assert theirs["Trainable parameters and adapter size"] in ours["Trainable parameters and adapter size"]
    assert "AutoModelForSequenceClassification.from_pretrained(\"path/to/merged\")" in ours["How to load"]
    assert "peftprompt.load_adapter" not in merged.text and "PeftModel" not in merged.text


def test_merged_card_of_an_adapter_without_our_card(tmp_path):
    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    merged = merged_model_card(adapter_dir, tmp_path / "m", base_model="org/model", method="ia3", task="causal_lm")
    assert merged.data.to_dict() == {"base_model": "org/model", "library_name": "transformers",
                                     "pipeline_tag": "text-generation", "tags": ["peftprompt", "ia3", "merged"]}
    sections = card_sections(merged.text)
    for name in CARRIED_SECTIONS:
        assert sections[name].endswith(f'(not recorded: the adapter\'s model card has no "{name}" section)')
    # PEFT's own stub card (metadata, no such sections) and a hand-edited card whose header is not a mapping
    (adapter_dir / "README.md").write_text("---\nlibrary_name: peft\nbase_model: org/model\n---\n\n# Model Card\n\n"
                                           "## Training procedure\n\n### Framework versions\n\n- PEFT 0.21.2\n")
    assert read_model_card(adapter_dir / "README.md") == (
        {"library_name": "peft", "base_model": "org/model"},
        {"Training procedure": "### Framework versions\n\n- PEFT 0.21.2"})
    (adapter_dir / "README.md").write_text("---\n- a list\n---\n\n## Results\n\n| a | 1 |\n")
    assert read_model_card(adapter_dir / "README.md") == ({}, {"Results": "| a | 1 |"})
    assert read_model_card(adapter_dir / "missing.md") == ({}, {})


def test_card_sections_ignore_headings_in_code_and_read_crlf():
    text = ("# Title\n\nintro\n\n## Training\n\n```bash\nrun.py --note '\n## not a heading'\n```\n\n"
            "### Hyper-parameters\n\n| lr | 1 |\n\n## Results ##\n\n~~~~\n## also code\n~~~\nstill code\n~~~~\n"
            "| em | 0.5 |\n\n## Results\n\nrepeated: ignored\n\n# Appendix\n\nnot in a section\n")
    sections = card_sections(text)
    assert list(sections) == ["Training", "Results"]
    assert sections["Training"] == ("```bash\nrun.py --note '\n## not a heading'\n```\n\n### Hyper-parameters\n\n"
                                    "| lr | 1 |")
    assert sections["Results"] == "~~~~\n## also code\n~~~\nstill code\n~~~~\n| em | 0.5 |"
    assert card_sections(text.replace("\n", "\r\n")) == sections
    assert card_sections("## Open\n\n```\n## inside an unclosed fence\n") == {
        "Open": "```\n## inside an unclosed fence"}


def test_a_command_with_a_heading_in_it_does_not_split_the_training_section(tmp_path):
    adapter_dir = tmp_path / "a"
    adapter_card(adapter_dir, command="python train.py \\\n## Results faked by the command")
    _, sections = read_model_card(adapter_dir / "README.md")
    assert "## Results faked by the command" in sections["Training"]
    assert sections["Results"].startswith("| metric | value |")


def test_the_template_ships_as_package_data():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    package_data = pyproject["tool"]["setuptools"]["package-data"]["peftprompt.training"]
    assert MODEL_CARD_TEMPLATE.name in package_data and MODEL_CARD_TEMPLATE.is_file()
    assert MODEL_CARD_TEMPLATE.parent == Path(shipping.__file__).parent


def test_export_merged_and_the_adapter_card_use_the_one_template(tmp_path, monkeypatch):
    """Both writers render `MODEL_CARD_TEMPLATE`: a changed template shows in the adapter's card and in the card that
    `export_merged` writes (a tiny random Llama, LoRA)."""
    from transformers import AutoTokenizer

    from peftprompt import attach, load_backbone, save_adapter
    from peftprompt.backbones import minilm_path

    from conftest import tiny_llama

    template = tmp_path / "template.md"
    template.write_text(MODEL_CARD_TEMPLATE.read_text().replace("## Results", "MARKER {{ merged }}\n\n## Results"))
    monkeypatch.setattr(shipping, "MODEL_CARD_TEMPLATE", template)
    base_dir, adapter_dir = tmp_path / "llama", tmp_path / "adapter"
    tiny_llama().save_pretrained(base_dir)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(base_dir)
    base, _ = load_backbone(str(base_dir), task="causal_lm")
    save_adapter(attach(base, "lora", task="causal_lm"), adapter_dir)
    write_model_card(adapter_dir, base_model=str(base_dir), method="lora", task="causal_lm", trainable_params=1,
                     total_params=2, adapter_bytes=3, metrics={"loss": 1.0}, command="x")
    out = export_merged(adapter_dir, tmp_path / "merged")
    assert "MARKER False" in (adapter_dir / "README.md").read_text()
    merged = ModelCard.load(out / "README.md")
    assert "MARKER True" in merged.text and merged.data.metrics == ["loss"]
    assert merged.data.base_model == str(base_dir) and merged.data.tags == ["peftprompt", "lora", "merged"]
