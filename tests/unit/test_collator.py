"""Tokenising episodes with span masks, padding and packing, and using the collator with Trainer and DataLoader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from peftprompt.backbones import minilm_path, smollm2_path
from peftprompt.recursive.collator import (
    IGNORE_INDEX,
    EncodedEpisode,
    EpisodeEncoder,
    EpisodeTooLongError,
    SelfAskCollator,
    pack_episodes,
    pack_rows,
)
from peftprompt.recursive.unroll import LossPolicy, Unroller

from conftest import TINY_VOCAB, golden_tree, tiny_llama, trees


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return AutoTokenizer.from_pretrained(smollm2_path())


@pytest.fixture(scope="module")
def bert_tokenizer():
    return AutoTokenizer.from_pretrained(minilm_path())


# Trained token positions of the golden tree's root episode, read off once and checked by eye (decoded below).
SMOLLM2_ROOT_TRAINED = [*range(16, 40), *range(44, 62), *range(67, 78)]
BERT_ROOT_TRAINED = [*range(16, 37), *range(40, 56), *range(60, 70)]


def decoded_trained(tokenizer, encoded: EncodedEpisode) -> str:
    return tokenizer.decode([i for i, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX])


def test_golden_positions_smollm2(smollm2_tokenizer):
    encoded = EpisodeEncoder(smollm2_tokenizer).encode_tree(golden_tree())
    root = encoded[0]
    assert len(root) == 78
    assert [i for i, label in enumerate(root.labels) if label != IGNORE_INDEX] == SMOLLM2_ROOT_TRAINED
    assert decoded_trained(smollm2_tokenizer, root) == (
        "Are follow up questions needed here: Yes.\nFollow up: What association published JPI?\nIntermediate answer:"
        "Follow up: Who was the first president of American Psychological Association?\nIntermediate answer:"
        "So the final answer is: G. Stanley Hall<|im_end|>"
    )
    assert [decoded_trained(smollm2_tokenizer, e) for e in encoded[2:]] == [
        "Are follow up questions needed here: No.\nSo the final answer is: Journal of Personality and Individual Differences<|im_end|>",
        "Are follow up questions needed here: No.\nSo the final answer is: American Psychological Association<|im_end|>",
        "Are follow up questions needed here: No.\nSo the final answer is: G. Stanley Hall<|im_end|>",
    ]


def test_golden_positions_bert_wordpiece(bert_tokenizer):
    root = EpisodeEncoder(bert_tokenizer).encode_tree(golden_tree())[0]
    assert len(root) == 71 and root.input_ids[0] == bert_tokenizer.cls_token_id
    assert [i for i, label in enumerate(root.labels) if label != IGNORE_INDEX] == BERT_ROOT_TRAINED
    assert decoded_trained(bert_tokenizer, root) == (
        "are follow up questions needed here : yes. follow up : what association published jpi? intermediate answer : "
        "follow up : who was the first president of american psychological association? intermediate answer : "
        "so the final answer is : g. stanley hall"
    )
    assert root.labels[0] == root.labels[-1] == IGNORE_INDEX  # [CLS] and [SEP]


@pytest.mark.parametrize("tokenizer_name", ["smollm2_tokenizer", "bert_tokenizer"])
def test_no_loss_on_context_and_every_trained_character_covered(tokenizer_name, request):
    tokenizer = request.getfixturevalue(tokenizer_name)
    for episode in Unroller(mode="flat", policy=LossPolicy(intermediate_answer={"gold": 0.5}))(golden_tree()) + Unroller()(golden_tree()):
        encoded = EpisodeEncoder(tokenizer).encode(episode)
        offsets = tokenizer(episode.text, return_offsets_mapping=True)["offset_mapping"]
        char_weight = np.zeros(len(episode.text))
        for span in episode.spans:
            char_weight[span.start : span.end] = span.weight
        covered = np.zeros(len(episode.text), dtype=bool)
        for (start, end), label, weight in zip(offsets, encoded.labels, encoded.weights):
            if label != IGNORE_INDEX:
                assert (char_weight[start:end] > 0).all(), f"loss on context: {episode.text[start:end]!r}"
                assert weight == char_weight[start:end].min()
                covered[start:end] = True
            else:
                assert weight == 0.0
        missed = [i for i, c in enumerate(episode.text) if char_weight[i] > 0 and not c.isspace() and not covered[i]]
        assert not missed, f"trained characters without a trained token: {[episode.text[i] for i in missed]}"


def test_intermediate_answer_weights_become_token_weights(smollm2_tokenizer):
    policy = LossPolicy(intermediate_answer={"gold": 0.5})
    (episode,) = Unroller(mode="flat", policy=policy)(golden_tree())
    encoded = EpisodeEncoder(smollm2_tokenizer).encode(episode)
    half = [i for i, w in zip(encoded.input_ids, encoded.weights) if w == 0.5]
    assert smollm2_tokenizer.decode(half) == " G. Stanley Hall\n"
    batch = SelfAskCollator(smollm2_tokenizer, unroller=Unroller(mode="flat", policy=policy))([golden_tree()])
    assert batch["loss_weights"].dtype == torch.float32
    assert sorted(set(batch["loss_weights"].flatten().tolist())) == [0.0, 0.5, 1.0]
    assert "loss_weights" not in SelfAskCollator(smollm2_tokenizer)([golden_tree()])


def test_padding(smollm2_tokenizer):
    collator = SelfAskCollator(smollm2_tokenizer, pad_to_multiple_of=16)
    batch = collator([golden_tree()])
    lengths = [78, 71, 31, 33, 34]
    assert batch["input_ids"].shape == (5, 80)
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert "position_ids" not in batch
    pad = batch["attention_mask"] == 0
    assert (batch["labels"][pad] == IGNORE_INDEX).all()
    assert (batch["input_ids"][pad] == smollm2_tokenizer.pad_token_id).all()
    assert collator.pad_fraction == pytest.approx(1 - sum(lengths) / (5 * 80))


def test_packing_restarts_positions_and_keeps_labels(smollm2_tokenizer):
    padded = SelfAskCollator(smollm2_tokenizer)([golden_tree()])
    collator = SelfAskCollator(smollm2_tokenizer, max_length=128, packing=True)
    packed = collator([golden_tree()])
    assert "attention_mask" not in packed
    # first-fit decreasing: 3 rows (78+34, 71+33, 31: padded to 112); balanced: 78, 71, 34+33+31 (padded to 98)
    assert packed["input_ids"].shape == (3, 98)
    assert packed["position_ids"][0].tolist() == list(range(78)) + list(range(20))  # then padding
    assert packed["position_ids"][2].tolist() == list(range(31)) + list(range(33)) + list(range(34))
    assert (packed["labels"] != IGNORE_INDEX).sum() == (padded["labels"] != IGNORE_INDEX).sum()
    assert collator.pad_fraction == pytest.approx(1 - 247 / (3 * 98))


def test_pack_episodes_uses_the_fewest_rows_and_balances_them():
    # first-fit decreasing needs 3 rows ([8, 2], [5, 4], [3]: padded to 10). Dealt longest first to the lightest of
    # 3 rows: 8 | 5 | 4, then 3 joins the 4 and 2 joins the 5: [8], [5, 2], [4, 3], padded to 8.
    assert pack_episodes([5, 3, 8, 2, 4], max_length=10) == [[2], [0, 3], [1, 4]]
    # balancing gains nothing here ([6, 4] and [6] either way), so first-fit decreasing's rows stay
    assert pack_episodes([6, 6, 4], max_length=10) == [[0, 2], [1]]
    assert pack_episodes([10, 10], max_length=10) == [[0], [1]]  # full rows stay as they are
    assert pack_episodes([], max_length=10) == []
    with pytest.raises(ValueError, match="an episode of 11 tokens does not fit in a row of max_length=10"):
        pack_episodes([11], max_length=10)


def test_packed_rows_attend_only_within_their_episode():
    """A packed row gives each episode exactly the logits it gets alone (use_cache=False: see collator docs)."""
    rows = [{"input_ids": list(range(3 + n, 3 + n + length)), "labels": [1] * length} for n, length in ((0, 9), (20, 6), (40, 11))]
    (row,) = pack_rows([{**r, "loss_weights": [1.0] * len(r["labels"])} for r in rows], max_length=32)
    model = tiny_llama()
    with torch.no_grad():
        packed = model(
            input_ids=torch.tensor([row["input_ids"]]), position_ids=torch.tensor([row["position_ids"]]), use_cache=False
        ).logits[0]
        start = 0
        for r in rows:
            alone = model(input_ids=torch.tensor([r["input_ids"]]), use_cache=False).logits[0]
            torch.testing.assert_close(packed[start : start + len(r["input_ids"])], alone, atol=1e-5, rtol=1e-5)
            start += len(r["input_ids"])


def test_weighted_loss_matches_model_loss_for_binary_weights(smollm2_tokenizer):
    """The collator's 0/1 loss weights, through the training engine's weighted loss, give the model's own loss."""
    from peftprompt.training.losses import training_loss

    model = tiny_llama()
    batch = SelfAskCollator(smollm2_tokenizer, return_loss_weights=True)([golden_tree()])
    batch["input_ids"] = batch["input_ids"] % TINY_VOCAB
    batch["labels"] = torch.where(batch["labels"] == IGNORE_INDEX, IGNORE_INDEX, batch["labels"] % TINY_VOCAB)
    expected = model(**{k: v for k, v in batch.items() if k != "loss_weights"}).loss
    loss, items, _ = training_loss(model, batch, "causal_lm")
    torch.testing.assert_close(loss / items.to(loss.dtype), expected)
    loss, items, _ = training_loss(model, {**batch, "loss_weights": batch["loss_weights"] * 0.5}, "causal_lm")
    torch.testing.assert_close(loss / items.to(loss.dtype), expected)  # normalised by the weight sum


def test_too_long_episodes_are_dropped_and_counted_or_refused(smollm2_tokenizer):
    collator = SelfAskCollator(smollm2_tokenizer, max_length=40)
    batch = collator([golden_tree()])
    assert batch["input_ids"].shape[0] == 3
    assert collator.dropped == {"longer than max_length": 2}
    with pytest.raises(EpisodeTooLongError, match="episode golden/jpi at root has 78 tokens, more than max_length=40"):
        SelfAskCollator(smollm2_tokenizer, max_length=40, overflow="error")([golden_tree()])


def test_trees_are_tokenised_once(smollm2_tokenizer):
    encoder = EpisodeEncoder(smollm2_tokenizer)
    first = encoder.encode_tree(golden_tree())
    assert encoder.encode_tree(golden_tree().to_dict()) is first


def test_bad_feature_is_named(smollm2_tokenizer):
    with pytest.raises(ValueError, match=r"got dict with keys \['text'\]"):
        SelfAskCollator(smollm2_tokenizer)([{"text": "hello"}])


def test_dataloader_and_trainer(smollm2_tokenizer, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    collator = SelfAskCollator(smollm2_tokenizer, max_length=128, packing=True)
    loader = DataLoader([golden_tree().to_dict()] * 4, batch_size=2, collate_fn=collator)
    assert [b["input_ids"].shape[0] for b in loader] == [5, 5]  # 10 episodes of 2 trees into 5 rows of 128

    encoded = EpisodeEncoder(smollm2_tokenizer, max_length=128).encode_all([golden_tree()] * 2)
    rows = [{k: v for k, v in e.as_features().items() if k != "loss_weights"} for e in encoded]
    dataset = Dataset.from_list([{**r, "input_ids": [i % TINY_VOCAB for i in r["input_ids"]],
                                  "labels": [l if l == IGNORE_INDEX else l % TINY_VOCAB for l in r["labels"]]} for r in rows])
    model = tiny_llama()
    model.config.use_cache = False
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, save_strategy="no", learning_rate=1e-2)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=SelfAskCollator(smollm2_tokenizer, packing=True))
    before = model.lm_head.weight.clone()
    assert trainer.train().training_loss > 0
    assert not torch.equal(before, model.lm_head.weight)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(trees(5), min_size=1, max_size=4), st.integers(min_value=96, max_value=256))
def test_packing_never_mixes_episodes(smollm2_tokenizer, batch_trees, max_length):
    encoder = EpisodeEncoder(smollm2_tokenizer, max_length=max_length)
    episodes = encoder.encode_all(batch_trees)
    if not episodes:
        return
    padded = SelfAskCollator(smollm2_tokenizer, max_length=max_length)(episodes)
    packed = SelfAskCollator(smollm2_tokenizer, max_length=max_length, packing=True)(episodes)
    assert (packed["labels"] != IGNORE_INDEX).sum() == (padded["labels"] != IGNORE_INDEX).sum()
    assert packed["input_ids"].shape[1] <= max_length
    # cut each row where positions restart: every piece is one whole episode (or trailing padding)
    expected = sorted(e.input_ids for e in episodes)
    pieces = []
    for ids, positions in zip(packed["input_ids"].tolist(), packed["position_ids"].tolist()):
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
        for a, b in zip(starts, starts[1:]):
            assert positions[a:b] == list(range(b - a))
            pieces.append(tuple(ids[a:b]))
    episode_pieces = sorted(p for p in pieces if p in set(expected))
    assert episode_pieces == expected
    assert all(set(p) == {smollm2_tokenizer.pad_token_id} for p in pieces if p not in set(expected))


def test_trl_sft_trainer(smollm2_tokenizer, tmp_path):
    """TRL's SFTTrainer takes the collator as it is, on a data set of trees, without preparing the data itself."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    class TinyVocab:  # the tiny Llama has 128 token ids: fold SmolLM2's ids into them
        def __init__(self, collator):
            self.collator = collator

        def __call__(self, features):
            batch = self.collator(features)
            batch["input_ids"] = batch["input_ids"] % TINY_VOCAB
            batch["labels"] = torch.where(batch["labels"] == IGNORE_INDEX, IGNORE_INDEX, batch["labels"] % TINY_VOCAB)
            return batch

    collator = SelfAskCollator(smollm2_tokenizer, max_length=128, packing=True)
    trees = [golden_tree().to_dict()] * 4
    dataset = Dataset.from_list(trees)  # Arrow fills missing fields with None: the collator drops them again
    model = tiny_llama()
    model.config.use_cache = False
    config = SFTConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[], use_cpu=True,
        save_strategy="no", learning_rate=1e-2, remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
    )
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=smollm2_tokenizer,
        data_collator=TinyVocab(collator),
    )
    before = model.lm_head.weight.clone()
    trainer.train()
    assert not torch.equal(before, model.lm_head.weight)
    assert collator.counts["rows"] == 2 * 5  # 2 steps, each 2 trees = 10 episodes packed into 5 rows
    assert dataset[0]["children"][1]["children"] is None and len(collator.encoder.encode_tree(dataset[0])) == 5
