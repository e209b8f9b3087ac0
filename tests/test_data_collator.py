import pytest
import torch

from data_collator import MMCoconutCollator

PAD, LAT = 0, 9
X = -100


def _tiles(n, value):
    return torch.full((n, 3, 2, 2), float(value))


def _batch():
    """A: latents at columns 3-4, two tiles. B: one latent at column 2, no image. C: no latent, one tile."""
    return [
        {"input_ids": [1, 2, 3, LAT, LAT, 4, 5], "labels": [X, X, X, X, X, 4, 5],
         "num_tiles": 2, "pixel_values": _tiles(2, 1)},
        {"input_ids": [6, 7, LAT, 8], "labels": [X, X, X, 8], "num_tiles": 0},
        {"input_ids": [11, 12, 13, 14, 15, 16, 17, 18], "labels": [X, X, 13, 14, 15, 16, 17, 18],
         "num_tiles": 1, "pixel_values": _tiles(1, 3)},
    ]


def test_first_latents_share_a_column():
    # 1 2 3 L L 4 5 -
    # - 6 7 L 8 - - -
    # 11 ......... 18
    batch = MMCoconutCollator(PAD, LAT)(_batch())
    assert torch.equal(batch["input_ids"], torch.tensor([
        [1, 2, 3, LAT, LAT, 4, 5, PAD],
        [PAD, 6, 7, LAT, 8, PAD, PAD, PAD],
        [11, 12, 13, 14, 15, 16, 17, 18],
    ]))
    assert torch.equal(batch["attention_mask"], torch.tensor([
        [1, 1, 1, 1, 1, 1, 1, 0],
        [0, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 1],
    ]))
    assert torch.equal(batch["position_ids"], torch.tensor([
        [0, 1, 2, 3, 4, 5, 6, 0],
        [0, 0, 1, 2, 3, 0, 0, 0],
        [0, 1, 2, 3, 4, 5, 6, 7],
    ]))
    assert torch.equal(batch["labels"], torch.tensor([
        [X, X, X, X, X, 4, 5, X],
        [X, X, X, X, 8, X, X, X],
        [X, X, 13, 14, 15, 16, 17, 18],
    ]))
    assert torch.equal(batch["num_tiles"], torch.tensor([2, 0, 1]))
    assert torch.equal(batch["pixel_values"], torch.cat([_tiles(2, 1), _tiles(1, 3)]))
    assert set(batch) == {"input_ids", "attention_mask", "position_ids", "labels", "num_tiles", "pixel_values"}


def test_pad_to_end_left_pads_prompts_and_passes_ids():
    features = [{"input_ids": f["input_ids"], "num_tiles": f["num_tiles"], "id": str(i),
                 **({"pixel_values": f["pixel_values"]} if "pixel_values" in f else {})}
                for i, f in enumerate(_batch())]
    batch = MMCoconutCollator(PAD, LAT, pad_to="end")(features)
    assert torch.equal(batch["input_ids"], torch.tensor([
        [PAD, 1, 2, 3, LAT, LAT, 4, 5],
        [PAD, PAD, PAD, PAD, 6, 7, LAT, 8],
        [11, 12, 13, 14, 15, 16, 17, 18],
    ]))
    assert torch.equal(batch["position_ids"], torch.tensor([
        [0, 0, 1, 2, 3, 4, 5, 6],
        [0, 0, 0, 0, 0, 1, 2, 3],
        [0, 1, 2, 3, 4, 5, 6, 7],
    ]))
    assert torch.equal(batch["attention_mask"], (batch["input_ids"] != PAD).long())
    assert "labels" not in batch and batch["ids"] == ["0", "1", "2"]


def test_text_only_batch_without_latents_is_right_padded():
    batch = MMCoconutCollator(PAD, LAT)([
        {"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([X, 6, 7]), "num_tiles": 0},
        {"input_ids": torch.tensor([8]), "labels": torch.tensor([8]), "num_tiles": 0},
    ])
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7], [8, PAD, PAD]]))
    assert torch.equal(batch["position_ids"], torch.tensor([[0, 1, 2], [0, 0, 0]]))
    assert torch.equal(batch["labels"], torch.tensor([[X, 6, 7], [8, X, X]]))
    assert torch.equal(batch["num_tiles"], torch.tensor([0, 0]))
    assert "pixel_values" not in batch


def test_padding_keeps_each_samples_tokens_and_positions():
    features = _batch()
    batch = MMCoconutCollator(PAD, LAT)(features)
    for row, feature in enumerate(features):
        real = batch["attention_mask"][row].bool()
        assert batch["input_ids"][row, real].tolist() == feature["input_ids"]
        assert batch["labels"][row, real].tolist() == feature["labels"]
        assert batch["position_ids"][row, real].tolist() == list(range(len(feature["input_ids"])))


@pytest.mark.parametrize(
    "features, match",
    [
        ([{"input_ids": [1], "labels": [1]}, {"input_ids": [2]}], "every feature has labels"),
        ([{"input_ids": [1], "num_tiles": 2, "pixel_values": _tiles(1, 0)}], "num_tiles=2 but pixel_values has 1"),
        ([{"input_ids": [1], "num_tiles": 1}], "num_tiles=1 but pixel_values has 0"),
        ([{"input_ids": [1], "attention_mask": [1]}], "unexpected feature keys"),
        ([{"input_ids": [1, 2], "labels": [1]}], "same shape"),
        ([{"input_ids": [1], "pixel_values": _tiles(1, 0)},
          {"input_ids": [1], "pixel_values": torch.zeros(1, 3, 4, 4)}], "tiles of different shapes"),
        ([], "empty"),
    ],
)
def test_bad_features_are_errors(features, match):
    with pytest.raises(ValueError, match=match):
        MMCoconutCollator(PAD, LAT)(features)


def test_unknown_pad_to():
    with pytest.raises(ValueError, match="pad_to"):
        MMCoconutCollator(PAD, LAT, pad_to="left")


def test_thought_labels_are_padded_to_the_most_latents_and_longest_step():
    features = _batch()
    features[0]["thought_labels"] = torch.tensor([[21, 22, 23], [24, X, X]])
    features[1]["thought_labels"] = torch.tensor([[25]])
    features[2]["thought_labels"] = torch.zeros((0, 0), dtype=torch.long)
    batch = MMCoconutCollator(PAD, LAT)(features)
    assert torch.equal(batch["thought_labels"], torch.tensor([
        [[21, 22, 23], [24, X, X]],
        [[25, X, X], [X, X, X]],
        [[X, X, X], [X, X, X]],
    ]))
    del features[1]["thought_labels"]
    with pytest.raises(ValueError, match="every feature has thought_labels or none"):
        MMCoconutCollator(PAD, LAT)(features)
