"""The padding and continuation-row helpers every scorer, decoder and trainer shares."""
from __future__ import annotations

from pipeline.lora.batching import continuation_rows, left_pad
from pipeline.lora.train import collate


def test_left_pad_aligns_the_ends_and_counts_real_tokens_only():
    ids, mask, pos = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]  # a padded prompt reads as it does alone


def test_collate_and_continuation_rows():
    batch = collate([([1, 2, 3], [4, 5]), ([6], [7, 8, 9])], pad_id=0)
    assert batch["prompt_width"] == 3
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 0], [0, 0, 6, 7, 8, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    real = batch["attention_mask"].bool()
    assert batch["position_ids"][real].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    assert batch["input_ids"][batch["target"]].tolist() == [4, 5, 7, 8, 9]
    select = continuation_rows(batch["target"], batch["prompt_width"])
    # Column j's logits predict token j+1: the selected columns are those just before each continuation token.
    assert select.nonzero().tolist() == [[0, 2], [0, 3], [1, 2], [1, 3], [1, 4]]
