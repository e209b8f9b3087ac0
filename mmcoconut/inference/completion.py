"""Batched completions of chat prompts (an image and a text each): what a harness such as lmms-eval asks a model for.

Each prompt goes through the checkpoint's chat template (`prediction.build_inputs`, the layout training used), the
prompts of a batch are left-padded to end in the same column (`MMCoconutCollator(pad_to="end")`, as evaluation pads
them), the model thinks and answers in one `generate` call, and each completion is cut where `predict` cuts it
(`decoding.after_thinking`, `decoding.until_eos`).
"""

from dataclasses import dataclass

import torch

from data_collator import MMCoconutCollator
from mmcoconut.constants import THINKING_MODES
from mmcoconut.data.images import load_image
from mmcoconut.inference.decoding import after_thinking, eos_ids, until_eos
from mmcoconut.inference.prediction import build_inputs

# `num_latents` for the chat template that gives the open span `<|start-latent|>` (adaptive thinking).
OPEN_SPAN = "open"


@dataclass
class Completion:
    """One prompt's completion.

    Attributes:
        text: the new tokens after the thinking, up to (without) the first EOS, special tokens kept.
        num_thoughts: the continuous thoughts it followed (the prompt's latents, or those adaptive thinking chose).
        stopped_at_eos: whether the model ended its turn within the budget.
    """

    text: str
    num_thoughts: int
    stopped_at_eos: bool


def template_latents(config, num_latents=None, thinking=None):
    """The chat template's `num_latents` for a thinking choice: None keeps the checkpoint's default span (closed with
    its latent count, open for an adaptive checkpoint, none for a `cot` / `no_cot` one); `thinking="adaptive"` opens
    the span; `thinking="fixed"` closes it with `num_latents` (default: `config.num_inference_latents`)."""
    if thinking is not None and thinking not in THINKING_MODES:
        raise ValueError(f"thinking must be one of {THINKING_MODES}, got {thinking!r}")
    if num_latents is not None and num_latents < 0:
        raise ValueError(f"num_latents must be >= 0, got {num_latents}")
    if thinking == "adaptive":
        if num_latents is not None:
            raise ValueError("num_latents fixes the number of thoughts; it cannot be combined with thinking=adaptive")
        return OPEN_SPAN
    if thinking == "fixed" and num_latents is None:
        return config.num_inference_latents
    return num_latents


@torch.no_grad()
def complete(model, processor, prompts, *, num_latents=None, thinking=None, max_thoughts=None,
             end_latent_threshold=None, max_new_tokens=None, do_sample=None, temperature=None, top_p=None):
    """Complete every `(image, text)` of `prompts` (image: a path, a PIL image or None) in one `generate` call.

    `num_latents` / `thinking` choose the latent span (`template_latents`); a given `num_latents` generates with
    `thinking="fixed"`, as `predict` does. The thinking and decoding options left None are not passed, so the
    checkpoint's `generation_config` decides them (its `max_new_tokens`, greedy unless it samples). Returns one
    `Completion` per prompt, in order.
    """
    if not prompts:
        raise ValueError("no prompts to complete")
    span = template_latents(model.config, num_latents, thinking)
    if span is not None and span != OPEN_SPAN:
        thinking = "fixed"
    features = []
    for position, (image, text) in enumerate(prompts):
        if image is not None:
            image = load_image(image, f"prompt {position}")
        inputs = build_inputs(processor, image, text, span)
        feature = {"input_ids": inputs["input_ids"][0]}
        if "pixel_values" in inputs:
            feature["pixel_values"] = inputs["pixel_values"]
        features.append(feature)
    config = model.config
    collator = MMCoconutCollator(
        pad_token_id=processor.tokenizer.pad_token_id, latent_token_id=config.latent_token_id, pad_to="end"
    )
    batch = collator(features)
    parameter = next(model.parameters())
    pixel_values = batch.get("pixel_values")
    if pixel_values is not None:
        pixel_values = pixel_values.to(parameter.device, model.dtype)
    options = {
        "thinking": thinking, "max_thoughts": max_thoughts, "end_latent_threshold": end_latent_threshold,
        "max_new_tokens": max_new_tokens, "do_sample": do_sample, "temperature": temperature, "top_p": top_p,
    }
    output = model.generate(
        input_ids=batch["input_ids"].to(parameter.device),
        attention_mask=batch["attention_mask"].to(parameter.device),
        pixel_values=pixel_values,
        num_tiles=batch["num_tiles"].to(parameter.device),
        return_dict_in_generate=True,
        **{name: value for name, value in options.items() if value is not None},
    )
    eos = eos_ids(model)
    width = batch["input_ids"].shape[1]
    completions = []
    for row, feature in enumerate(features):
        prompt_ids = feature["input_ids"].tolist()
        new_ids = after_thinking(
            prompt_ids, output.sequences[row, width:].tolist(), config.start_latent_id, config.end_latent_id
        )
        answer_ids, _, stopped = until_eos(new_ids, eos)
        completions.append(Completion(
            text=processor.tokenizer.decode(answer_ids, skip_special_tokens=False),
            num_thoughts=int(output.num_thoughts[row]),
            stopped_at_eos=stopped,
        ))
    return completions


__all__ = ["OPEN_SPAN", "Completion", "template_latents", "complete"]
