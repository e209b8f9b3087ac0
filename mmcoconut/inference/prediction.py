"""Answering one question about an image with a loaded checkpoint: `predict` returns a `Prediction`."""

from dataclasses import dataclass, field

import torch
from PIL import Image

from mmcoconut.analysis.attention import ATTENTION_CATEGORIES, analyze_batch, special_token_ids, thought_entry
from mmcoconut.constants import CHOICE_LETTERS, MAX_IMAGE_PIXELS
from mmcoconut.data.images import image_size, load_image
from mmcoconut.errors import UserValueError
from mmcoconut.inference.decoding import after_thinking, eos_ids, until_eos
from mmcoconut.preflight import check_image_pixels, check_question
from mmcoconut.text.answers import parse_answer, read_answer_line
from mmcoconut.text.prompt import messages_for, render_choices
from modeling_mmcoconut import position_ids_from_attention_mask


@dataclass
class Prediction:
    """One answer.

    Attributes:
        question: the user text the model read (with the choices rendered when there are any).
        generated_text: the completion up to (without) the first EOS, special tokens kept.
        answer: `"B. umbrella"` with choices, the free text of the `Answer:` line without; None when unparseable.
        letter: the chosen letter (None without choices or when unparseable).
        parse_error: why the completion gave no answer, else None.
        num_latents: the continuous thoughts the answer followed: the prompt's `<|latent|>` tokens, or with
            `adaptive` as many as the model chose (None: the prompt had no latent span).
        adaptive: the model decided how many thoughts to think (a checkpoint trained to stop thinking, prompted
            with the open span and no `num_latents`).
        thoughts: with `show_thoughts`, one `analyze_latents.thought_entry` dict per thought (`top_k` decodings,
            `attention` shares per category), else None.
        image_attention: with `show_thoughts` and an image, `(K, tiles, side, side)`: each thought's attention on
            every image token (mean over heads and layers), laid out as each tile's token grid.
        pixel_values: the tiles the model saw, `(tiles, 3, H, W)` normalised (None without an image).
    """

    question: str
    generated_text: str
    answer: str | None
    letter: str | None
    parse_error: str | None
    num_latents: int | None
    adaptive: bool = False
    thoughts: list | None = None
    image_attention: torch.Tensor | None = field(default=None, repr=False)
    pixel_values: torch.Tensor | None = field(default=None, repr=False)


def build_inputs(processor, image, question, num_latents=None):
    """`apply_chat_template` inputs (`input_ids`, `attention_mask`, `pixel_values` with an image) for one question;
    `num_latents=None` keeps the template's default latent span."""
    template_kwargs = {} if num_latents is None else {"num_latents": num_latents}
    return processor.apply_chat_template(
        messages_for(question, image), add_generation_prompt=True, tokenize=True, return_dict=True,
        return_tensors="pt", **template_kwargs,
    )


@torch.no_grad()
def predict(model, processor, image, question, choices=None, num_latents=None, max_new_tokens=None,
            show_thoughts=False, top_k=5, max_time=None):
    """Answer `question` about `image` (a path, a PIL image or None) greedily; returns a `Prediction`.

    `choices` (up to 26 strings) makes it multiple choice; `max_new_tokens=None` keeps the checkpoint's saved
    budget; `show_thoughts` needs a model loaded with `attn_implementation="eager"` and a latent span; `max_time`
    (seconds) stops decoding there (the caller decides what a stopped answer means). An empty question, one over
    `MAX_QUESTION_CHARS`, one whose prompt with its thoughts and budget needs more positions than the model has, and an
    image over `MAX_IMAGE_PIXELS` are `UserValueError`s, raised before the model runs.
    """
    check_question(question)
    if choices:
        if len(choices) > len(CHOICE_LETTERS):
            raise ValueError(f"at most {len(CHOICE_LETTERS)} choices, got {len(choices)}")
        question = render_choices(question, choices)
    if image is not None:
        image = open_request_image(image)
    inputs = build_inputs(processor, image, question, num_latents)
    check_positions(model, inputs["input_ids"][0].tolist(), max_new_tokens)
    inputs = _on(inputs, model)
    # Unset options come from the checkpoint's generation_config (its max_new_tokens); only a given budget overrides.
    budget = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
    if max_time is not None:  # transformers' MaxTimeCriteria: decoding stops there
        budget["max_time"] = max_time
    # A given count is a closed span of that many latents, even for a checkpoint that thinks adaptively.
    thinking = {} if num_latents is None else {"thinking": "fixed"}
    output = model.generate(**inputs, do_sample=False, return_dict_in_generate=True, **budget, **thinking)
    config = model.config
    prompt_ids = inputs["input_ids"][0].tolist()
    adaptive = prompt_ids[-1] == config.start_latent_id
    new_ids = after_thinking(
        prompt_ids, output.sequences[0, len(prompt_ids) :].tolist(), config.start_latent_id, config.end_latent_id
    )
    new_ids, _, _ = until_eos(new_ids, eos_ids(model))
    generated_text = processor.tokenizer.decode(new_ids, skip_special_tokens=False)

    if choices:
        parsed = parse_answer(generated_text, choices)
        answer = None if parsed.letter is None else f"{parsed.letter}. {parsed.choice_text}"
        letter, parse_error = parsed.letter, parsed.reason
    else:
        answer, parse_error = read_answer_line(generated_text)
        letter = None
    has_span = config.start_latent_id in prompt_ids
    prediction = Prediction(
        question=question,
        generated_text=generated_text,
        answer=answer,
        letter=letter,
        parse_error=parse_error,
        # adaptive: the thoughts the model chose; fixed: the prompt's latents (also for `pause` checkpoints, whose
        # latents are tokens, not thoughts, and which generate reports as 0 thoughts)
        num_latents=(int(output.num_thoughts[0]) if adaptive else prompt_ids.count(config.latent_token_id))
        if has_span else None,
        adaptive=adaptive,
        pixel_values=inputs.get("pixel_values"),
    )
    if show_thoughts and adaptive:
        # The thoughts of adaptive thinking are those of the closed span with as many latents: each is the
        # hidden state before it, whatever comes after (no thoughts chosen: nothing to show).
        if prediction.num_latents:
            inputs = build_inputs(processor, image, question, prediction.num_latents)
            _add_thoughts(model, processor, _on(inputs, model), prediction, top_k)
        else:
            prediction.thoughts = []
    elif show_thoughts:
        _add_thoughts(model, processor, inputs, prediction, top_k)
    return prediction


def open_request_image(image):
    """A request's image (path or PIL) as upright RGB, decoded once; over `MAX_IMAGE_PIXELS` (read from the header)
    or unreadable, a `UserValueError` (a web request must not decode a 20000x20000 image to refuse it)."""
    try:
        check_image_pixels(*image_size(image, "the question"), "the image")
        return load_image(image, "the question")
    except UserValueError:
        raise
    except ValueError as error:
        if isinstance(error.__cause__, Image.DecompressionBombError):  # PIL's own limit, far above ours
            raise UserValueError(f"the image is over {Image.MAX_IMAGE_PIXELS * 2 / 1e6:,.0f} megapixels; at most "
                                 f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixels are taken: scale it down") from None
        raise UserValueError(str(error).replace("record 'the question': ", "")) from None


def check_positions(model, prompt_ids, max_new_tokens=None):
    """Refuse a prompt that, with its thoughts and the answer budget, needs more positions than the model has (a
    100,000-character question would otherwise try to allocate tens of gigabytes before failing)."""
    config = model.config
    positions = config.internvl_config.text_config.max_position_embeddings
    budget = max_new_tokens or model.generation_config.max_new_tokens or 0
    # An open span (adaptive thinking): up to the checkpoint's thoughts, then <|end-latent|>.
    thoughts = config.num_inference_latents + 1 if prompt_ids[-1] == config.start_latent_id else 0
    needed = len(prompt_ids) + thoughts + budget
    if needed > positions:
        image = sum(1 for token in prompt_ids if token == config.internvl_config.image_token_id)
        raise UserValueError(
            f"the question is too long: the prompt is {len(prompt_ids):,} tokens ({image:,} of them the image's), "
            f"with {thoughts} thoughts to come and an answer budget of {budget} tokens it needs {needed:,} "
            f"positions, and the model has {positions:,}; shorten the question"
        )


def _on(inputs, model):
    """`inputs` on the model's device, `pixel_values` in its dtype."""
    device = next(model.parameters()).device
    return {k: v.to(device, model.dtype) if k == "pixel_values" else v.to(device) for k, v in inputs.items()}


def _add_thoughts(model, processor, inputs, prediction, top_k):
    """Fill `prediction.thoughts` and `.image_attention` with `analyze_latents.analyze_batch`."""
    if not prediction.num_latents:
        raise ValueError("the prompt has no <|latent|> tokens, so there are no thoughts to show (see --num-latents)")
    config = model.config
    attention_mask = inputs["attention_mask"]
    batch = {
        "input_ids": inputs["input_ids"],
        "attention_mask": attention_mask,
        "position_ids": position_ids_from_attention_mask(attention_mask),
        "pixel_values": inputs.get("pixel_values"),
    }
    if batch["pixel_values"] is not None:
        batch["num_tiles"] = torch.tensor([batch["pixel_values"].shape[0]], device=attention_mask.device)
    tokenizer = processor.tokenizer
    result = analyze_batch(model, batch, special_token_ids(tokenizer, config), top_k=top_k, keep_keys=True)
    prediction.thoughts = [
        thought_entry(k, result, 0, [], config.c_thought, tokenizer) for k in range(prediction.num_latents)
    ]
    if batch["pixel_values"] is not None:
        is_image = inputs["input_ids"][0] == config.internvl_config.image_token_id
        per_token = result["key_attention"][0][:, is_image].float().cpu()  # (K, tiles · tokens_per_tile)
        tiles = batch["pixel_values"].shape[0]
        side = int(round((per_token.shape[1] // tiles) ** 0.5))  # a tile's tokens form a side × side grid
        prediction.image_attention = per_token.view(per_token.shape[0], tiles, side, side)


def format_prediction(prediction):
    """The lines `mmcoconut-predict` prints."""
    answer = prediction.answer if prediction.answer is not None else f"(unparseable: {prediction.parse_error})"
    lines = [f"answer: {answer}", f"generated: {prediction.generated_text!r}"]
    if prediction.num_latents is not None:
        chosen = " (adaptive: the model stopped thinking there)" if prediction.adaptive else ""
        lines.append(f"latents: {prediction.num_latents}{chosen}")
    for thought in prediction.thoughts or []:
        tokens = ", ".join(f"{d['token']!r} {d['prob']:.3f}" for d in thought["top_k"])
        shares = " ".join(f"{c} {thought['attention']['mean'][c]:.2f}" for c in ATTENTION_CATEGORIES)
        lines.append(f"thought {thought['index'] + 1}: {tokens} | attention: {shares}")
    return "\n".join(lines)


__all__ = ["Prediction", "build_inputs", "open_request_image", "check_positions", "predict", "format_prediction"]
