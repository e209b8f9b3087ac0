"""Tiny random MMCoconut models and hand-built samples shared by the tests."""

import torch

from configuration_mmcoconut import MMCoconutConfig
from mmcoconut.processing import tiny_internvl_config
from modeling_mmcoconut import MMCoconutForConditionalGeneration

VOCAB = 300
IMAGE, START, END, LATENT, PAD, EOS = 290, 291, 292, 293, 0, 1
PER_TILE = 4  # 28-px tiles, 7-px patches, pixel shuffle 0.5


def make_model(seed=0, tie=False, **config_kwargs):
    torch.manual_seed(seed)
    internvl_config = tiny_internvl_config(vocab_size=VOCAB, image_token_id=IMAGE, tie_word_embeddings=tie)
    config = MMCoconutConfig(
        internvl_config, latent_token_id=LATENT, start_latent_id=START, end_latent_id=END, **config_kwargs
    )
    model = MMCoconutForConditionalGeneration(config).float().eval()
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = PAD
    return model


def make_sample(num_tiles, num_latents, question_len=5, steps_len=6, seed=0):
    """`[img]*tiles question <start> <latent>*n <end> steps` with labels on the steps."""
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(2, 280, (n,), generator=g).tolist()  # noqa: E731
    prefix = [IMAGE] * (num_tiles * PER_TILE) + text(question_len)
    latent_span = [START] + [LATENT] * num_latents + [END] if num_latents else []
    steps = text(steps_len)
    ids = prefix + latent_span + steps
    labels = [-100] * (len(prefix) + len(latent_span)) + steps
    pixels = torch.randn(num_tiles, 3, 28, 28, generator=g) if num_tiles else None
    return ids, labels, pixels


def collate(samples):
    """Left-pad to a common width (enough for these tests; the real collator is tested elsewhere)."""
    width = max(len(ids) for ids, _, _ in samples)
    input_ids, labels, mask = [], [], []
    for ids, lab, _ in samples:
        pad = width - len(ids)
        input_ids.append([PAD] * pad + ids)
        labels.append([-100] * pad + lab)
        mask.append([0] * pad + [1] * len(ids))
    input_ids, labels, mask = map(torch.tensor, (input_ids, labels, mask))
    tiles = [p for _, _, p in samples if p is not None]
    pixel_values = torch.cat(tiles) if tiles else None
    num_tiles = torch.tensor([0 if p is None else p.shape[0] for _, _, p in samples])
    return dict(input_ids=input_ids, labels=labels, attention_mask=mask, pixel_values=pixel_values, num_tiles=num_tiles)
