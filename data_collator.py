"""Batching for MMCoconut: latent-aligned padding, per-sample positions, tiles concatenated in batch order."""

from dataclasses import dataclass

import torch

PAD_TO = ("latent", "end")
_FEATURE_KEYS = {"input_ids", "labels", "pixel_values", "num_tiles", "id", "thought_labels"}


@dataclass
class MMCoconutCollator:
    r"""
    Pads `CurriculumDataset` features into a batch for `MMCoconutForConditionalGeneration`.

    `pad_to="latent"` (training): every sample that has a `<|latent|>` is left-padded so that its first latent
    sits in the same column across the batch, then all rows are right-padded to the longest. The latent forward
    runs one pass per latent column, so aligned latents mean the fewest passes and the longest shared prefix in
    the KV cache. Samples without latents (stage 0, `cot`, `no_cot`, `no_thoughts`) are not left-padded; their
    real tokens start at column 0:

        xxxxxxxxxx<latent><latent>xxxxx--
        -----xxxxx<latent>xxxxxxxx-------
        xxxxxxxxxxxxxxxxxxx--------------

    `pad_to="end"` (generation prompts): every row is left-padded so that all prompts end in the last column,
    where decoding continues.

    Padding never moves a sample's tokens relative to each other: `position_ids` count from 0 at each sample's
    first real token (pads get 0), `attention_mask` is 0 on pads and `labels` are `label_pad_token_id` there.

    Args:
        pad_token_id: id written into padded `input_ids` columns (masked out, never attended or supervised).
        latent_token_id: id of `<|latent|>`.
        pad_to: `"latent"` or `"end"`, see above.
        label_pad_token_id: label of padded columns.

    Returns a dict with `input_ids`, `attention_mask`, `position_ids` (all `[B, T]` long), `labels` `[B, T]` when
    the features have labels, `num_tiles` `[B]`, `pixel_values` `[sum(num_tiles), 3, H, W]` (the samples' tiles
    concatenated in batch order) when any sample has an image, `ids` (list of str) when the features carry
    `id` (prompt features), and `thought_labels` `[B, max latents, longest step]` (padded with `label_pad_token_id`)
    when they carry them (step-level supervision of the thoughts: row k of a sample is its latent k's step).
    """

    pad_token_id: int
    latent_token_id: int
    pad_to: str = "latent"
    label_pad_token_id: int = -100

    def __post_init__(self):
        if self.pad_to not in PAD_TO:
            raise ValueError(f"pad_to must be one of {PAD_TO}, got {self.pad_to!r}")

    def _left_pads(self, sequences):
        lengths = [len(ids) for ids in sequences]
        if self.pad_to == "end":
            return [max(lengths) - length for length in lengths]
        first_latent = [
            int((ids == self.latent_token_id).nonzero()[0]) if (ids == self.latent_token_id).any() else None
            for ids in sequences
        ]
        anchor = max((col for col in first_latent if col is not None), default=0)
        return [0 if col is None else anchor - col for col in first_latent]

    def __call__(self, features):
        if not features:
            raise ValueError("cannot collate an empty list of features")
        unknown = set().union(*features) - _FEATURE_KEYS
        if unknown:
            raise ValueError(f"unexpected feature keys {sorted(unknown)}; expected a subset of {sorted(_FEATURE_KEYS)}")
        with_labels = ["labels" in f for f in features]
        if any(with_labels) and not all(with_labels):
            raise ValueError("either every feature has labels or none does")

        sequences = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]
        labels = [torch.as_tensor(f["labels"], dtype=torch.long) for f in features] if all(with_labels) else None
        for i, ids in enumerate(sequences):
            if ids.dim() != 1 or (labels is not None and labels[i].shape != ids.shape):
                raise ValueError(f"sample {i}: input_ids must be 1-D and labels the same shape")

        left = self._left_pads(sequences)
        width = max(pad + len(ids) for pad, ids in zip(left, sequences))
        batch_size = len(features)
        input_ids = torch.full((batch_size, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, width), dtype=torch.long)
        position_ids = torch.zeros((batch_size, width), dtype=torch.long)
        padded_labels = torch.full((batch_size, width), self.label_pad_token_id, dtype=torch.long)
        for i, (pad, ids) in enumerate(zip(left, sequences)):
            span = slice(pad, pad + len(ids))
            input_ids[i, span] = ids
            attention_mask[i, span] = 1
            position_ids[i, span] = torch.arange(len(ids))
            if labels is not None:
                padded_labels[i, span] = labels[i]

        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        if labels is not None:
            batch["labels"] = padded_labels
        batch.update(self._tiles(features))
        if any("thought_labels" in f for f in features):
            batch["thought_labels"] = self._thought_labels(features)
        if any("id" in f for f in features):
            batch["ids"] = [f.get("id") for f in features]
        return batch

    def _thought_labels(self, features):
        if not all("thought_labels" in f for f in features):
            raise ValueError("either every feature has thought_labels or none does")
        rows = [torch.as_tensor(f["thought_labels"], dtype=torch.long) for f in features]
        latents = max(r.shape[0] for r in rows)
        width = max([r.shape[1] for r in rows if r.numel()], default=1)
        out = torch.full((len(rows), latents, width), self.label_pad_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : r.shape[0], : r.shape[1]] = r
        return out

    @staticmethod
    def _tiles(features):
        num_tiles, tiles = [], []
        for i, f in enumerate(features):
            pixel_values = f.get("pixel_values")
            count = 0 if pixel_values is None else pixel_values.shape[0]
            if "num_tiles" in f and int(f["num_tiles"]) != count:
                raise ValueError(f"sample {i}: num_tiles={int(f['num_tiles'])} but pixel_values has {count} tiles")
            num_tiles.append(count)
            if count:
                tiles.append(pixel_values)
        out = {"num_tiles": torch.tensor(num_tiles, dtype=torch.long)}
        if tiles:
            if len({t.shape[1:] for t in tiles}) != 1:
                raise ValueError(f"tiles of different shapes in one batch: {sorted({tuple(t.shape[1:]) for t in tiles})}")
            out["pixel_values"] = torch.cat(tiles)  # (sum(num_tiles), 3, H, W), batch order
        return out


__all__ = ["MMCoconutCollator"]
