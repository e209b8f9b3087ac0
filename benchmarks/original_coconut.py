"""The original Coconut algorithm (facebookresearch/coconut, `coconut.py`), rewritten for InternVL as a baseline.

Written from the algorithm's description, not copied; it keeps the original's costs on purpose:
- latent positions gathered with one `.item()` per latent into per-sample Python lists;
- passes over a KV cache: compute range `[0, first latent)`, then one token per pass, then the rest;
- after each pass the input embeddings are rebuilt from a Python list of per-token tensors, with
  the latents replaced by the last hidden state of the position before them;
- the base model's full LM head on every position of every pass, logits concatenated, then the loss;
- generation: batch size 1, the latent forward over the prompt, then every new token recomputes
  the whole sequence (thoughts included as fixed embeddings) without a cache, full logits again.
The only addition is the image: its features are merged into the embeddings once, before the passes
(the multimodal seed's way). The base model is `InternVLForConditionalGeneration` called on
`inputs_embeds`, as the original calls its `base_causallm`.
"""

import time

import torch
from torch.nn import CrossEntropyLoss

from modeling_mmcoconut import CACHE_KWARG


def embed_with_images(internvl, input_ids, pixel_values):
    """Token embeddings with the projected image features at the image-token positions."""
    inputs_embeds = internvl.get_input_embeddings()(input_ids)
    if pixel_values is not None:
        features = internvl.model.get_image_features(pixel_values=pixel_values).pooler_output
        image_mask = (input_ids == internvl.config.image_token_id)[..., None]
        inputs_embeds = inputs_embeds.masked_scatter(image_mask, features.reshape(-1, features.shape[-1]))
    return inputs_embeds


def original_coconut_forward(internvl, input_ids, attention_mask, position_ids, labels, latent_token_id,
                             pixel_values=None):
    """The original multi-pass forward; returns `(loss, inputs_embeds with thoughts, full logits)`."""
    batch_size, seq_len = input_ids.shape
    latent_indices = (input_ids == latent_token_id).nonzero()  # (num_latents, 2)
    latent_lists = [[idx[1].item() for idx in latent_indices if idx[0] == b] for b in range(batch_size)]
    max_n_latents = max(len(positions) for positions in latent_lists)

    inputs_embeds = embed_with_images(internvl, input_ids, pixel_values)
    compute_range = (0, seq_len)
    if max_n_latents > 0:
        compute_range = (0, latent_indices[:, 1].min().item())

    logits, cache = [], None
    for pass_idx in range(max_n_latents):
        start, end = compute_range
        outputs = internvl(
            inputs_embeds=inputs_embeds[:, start:end],
            attention_mask=attention_mask[:, :end],
            position_ids=position_ids[:, start:end],
            **{CACHE_KWARG: cache},
            use_cache=True,
            output_hidden_states=True,
        )
        logits.append(outputs.logits)
        hidden = outputs.hidden_states[-1]  # offset by `start`: the cache covers [0, start)
        cache = outputs[CACHE_KWARG]
        compute_range = (end, seq_len if pass_idx + 1 >= max_n_latents else end + 1)

        fills = [(b, positions[pass_idx]) for b, positions in enumerate(latent_lists) if len(positions) > pass_idx]
        # The original rebuilds the embeddings from per-token tensors to avoid in-place writes.
        tensor_list = [[inputs_embeds[b, t] for t in range(seq_len)] for b in range(batch_size)]
        for b, t in fills:
            tensor_list[b][t] = hidden[b, t - 1 - start]
        inputs_embeds = torch.stack([torch.stack(row) for row in tensor_list])

    start, end = compute_range
    outputs = internvl(
        inputs_embeds=inputs_embeds[:, start:end],
        attention_mask=attention_mask[:, :end],
        position_ids=position_ids[:, start:end],
        **{CACHE_KWARG: cache},
        use_cache=cache is not None,
        output_hidden_states=True,
    )
    logits.append(outputs.logits)
    logits = torch.cat(logits, dim=-2)  # (B, T, V)
    shift_logits = logits[..., :-1, :].contiguous()
    shift_labels = labels[..., 1:].contiguous()
    loss = CrossEntropyLoss()(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))
    return loss, inputs_embeds, logits


@torch.no_grad()
def original_coconut_generate(internvl, input_ids, latent_token_id, max_new_tokens, pixel_values=None,
                              eos_token_id=None, timestamps=None):
    """Greedy decoding of one prompt `(1, T)` the original way; returns the new token ids (a list).

    `timestamps`, a list, receives `time.perf_counter()` as each token is known (`.item()` synchronises).
    """
    stamp = timestamps.append if timestamps is not None else lambda _: None
    if input_ids.shape[0] != 1:
        raise ValueError(f"the original decoding takes one prompt at a time, got a batch of {input_ids.shape[0]}")
    embedding = internvl.get_input_embeddings()
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    _, inputs_embeds, logits = original_coconut_forward(
        internvl, input_ids, torch.ones_like(input_ids), positions, input_ids.clone(), latent_token_id,
        pixel_values=pixel_values,
    )
    tokens = [torch.argmax(logits[0, -1]).item()]
    stamp(time.perf_counter())
    first_embed = embedding(torch.tensor(tokens[-1], device=input_ids.device)).view(1, 1, -1)
    inputs_embeds = torch.cat([inputs_embeds, first_embed], dim=1)
    for _ in range(max_new_tokens - 1):
        logits = internvl(inputs_embeds=inputs_embeds).logits
        next_token = torch.argmax(logits[0, -1]).item()
        stamp(time.perf_counter())
        if next_token == eos_token_id:
            break
        tokens.append(next_token)
        new_embed = embedding(torch.tensor(next_token, device=input_ids.device)).view(1, 1, -1)
        inputs_embeds = torch.cat([inputs_embeds, new_embed], dim=1)
    return tokens


__all__ = ["embed_with_images", "original_coconut_forward", "original_coconut_generate"]
