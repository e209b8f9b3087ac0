"""Ask a trained model about an image, from the command line.

    python predict.py --model outputs/demo --image cat.jpg --question "What is on the mat?"
    python predict.py --model outputs/demo --image cat.jpg --question "What is on the mat?" \\
        --choices cat dog bird fish [--num-latents N] [--show-thoughts] [--quantization torchao-int8]

With `--choices` the question is shown to the model with the choices rendered `A. ..` to `D. ..` (as A-OKVQA
training does) and the answer is a letter and its text; without, it is the free text of the model's `Answer:` line.
The prompt is the checkpoint's chat template (`prompt_format`: the training-time layout, with the checkpoint's
latent span unless `--num-latents` says otherwise; a checkpoint trained with `supervise_end_latent` decides how many
thoughts to think, and `--num-latents N` forces N). `--model` may be a merged checkpoint or a LoRA adapter directory
(its base is loaded and the adapters merged in). `--show-thoughts` decodes each continuous thought through the LM
head and measures where it attends (`analyze_latents`).
"""

import argparse
import json
import logging
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from cli_help import DefaultsHelpFormatter

# `torchao-int8`: int8 weight-only (torchao through transformers' TorchAoConfig), runs on CPU and GPU.
# `bnb-8bit` / `bnb-4bit`: bitsandbytes LLM.int8() / NF4, CUDA only.
QUANTIZATIONS = ("none", "torchao-int8", "bnb-8bit", "bnb-4bit")
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")  # the keys of DTYPES below


def build_parser():
    """The CLI's arguments; needs no torch, so `--help` answers before the imports below."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter
    )
    parser.add_argument("--model", required=True, help="checkpoint directory, Hub id or LoRA adapter directory")
    parser.add_argument("--image", help="image file (omit for a text-only question)")
    parser.add_argument("--question", required=True)
    parser.add_argument("--choices", nargs="+", help="answer choices: the answer is then a letter and its text")
    parser.add_argument("--num-latents", type=int, default=None,
                        help="latents in the prompt (default: the checkpoint's, latent_stage × c_thought; a "
                             "checkpoint trained with supervise_end_latent decides, up to that many)")
    parser.add_argument("--show-thoughts", action="store_true",
                        help="print what each continuous thought decodes to and where it attends")
    parser.add_argument("--top-k", type=int, default=5, help="decoded tokens shown per thought")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="generation budget (default: the checkpoint's generation_config)")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default="none")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="auto")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--json", action="store_true", help="print the prediction as JSON")
    return parser


if __name__ == "__main__":  # `--help` and usage errors answer here, before the seconds-long imports below
    build_parser().parse_args()

import torch  # noqa: E402

from analyze_latents import ATTENTION_CATEGORIES, analyze_batch, special_token_ids, thought_entry
from aokvqa_evaluation import _eos_ids, _until_eos, after_thinking
from answer_parsing import parse_answer, read_answer_line
from configuration_mmcoconut import MMCoconutConfig
from data_aokvqa import CHOICE_LETTERS, render_choices
from data_curriculum import load_image
from modeling_mmcoconut import MMCoconutForConditionalGeneration
from processing_mmcoconut import load_internvl_processor, set_chat_template
from prompt_format import messages_for

logger = logging.getLogger("predict")

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


# ---------------------------------------------------------------------------------------------- loading


def quantization_config(name, tied_embeddings=True):
    """transformers' `quantization_config` for a `QUANTIZATIONS` choice (None for `none`).

    torchao also quantizes an untied LM head (at a 151k vocabulary it holds most of a small model's weights);
    a head tied to the input embedding stays as it is, since untying it would add a copy rather than save one.
    """
    if name not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {name!r}")
    if name == "none":
        return None
    if name == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        return TorchAoConfig(Int8WeightOnlyConfig(), include_input_output_embeddings=not tied_embeddings)
    if not torch.cuda.is_available():
        raise ValueError(
            f"--quantization {name} uses bitsandbytes, which needs a CUDA GPU and there is none here; "
            "on CPU use --quantization torchao-int8"
        )
    from transformers import BitsAndBytesConfig

    if name == "bnb-8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)


def _base_model_path(base, adapter_dir):
    """A local directory holding the LoRA base `base`: itself, or its snapshot in the Hugging Face cache (downloaded
    when the Hub can be reached). Fails at once, naming `base`, when it is nowhere to be had."""
    if Path(base).is_dir():
        return base
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    offline = constants.HF_HUB_OFFLINE
    try:  # one attempt, not transformers' retrying from_pretrained: a missing base should fail in seconds
        return snapshot_download(base, local_files_only=offline)
    except (LocalEntryNotFoundError, HFValidationError, OSError) as error:
        where = "HF_HUB_OFFLINE is set, and it is not in the local Hugging Face cache" if offline else str(error)
        raise FileNotFoundError(
            f"{adapter_dir} holds LoRA adapters for the base model {base!r}, which is not a local directory and "
            f"could not be loaded ({where}). It needs the Hub (huggingface-cli download {base}) or a local copy: "
            f"point base_model_name_or_path in {Path(adapter_dir) / 'adapter_config.json'} to it."
        ) from error


def _load_lora(path, **load_kwargs):
    """The base named by `path/adapter_config.json`, with the run's config (`path/config.json`, written by train.py)
    and the adapters merged in."""
    from peft import PeftModel

    base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(
            f"{path} holds LoRA adapters whose adapter_config.json names no base model (a model built from a fresh "
            f"InternVL); use the merged model train.py writes to {path / 'merged'}"
        )
    base_path = _base_model_path(base, path)
    base_config = json.loads((Path(base_path) / "config.json").read_text())
    if base_config.get("model_type") != MMCoconutConfig.model_type:
        raise ValueError(
            f"the LoRA base {base!r} is a {base_config.get('model_type')!r} model, not an MMCoconut checkpoint; "
            f"use the merged model train.py writes to {path / 'merged'}"
        )
    config = MMCoconutConfig.from_pretrained(path) if (path / "config.json").is_file() else None
    model = MMCoconutForConditionalGeneration.from_pretrained(base_path, config=config, **load_kwargs)
    logger.info("LoRA: base %s, adapters %s (merged)", base, path)
    with warnings.catch_warnings():
        # peft (0.21) reads `PreTrainedModel.is_gradient_checkpointing`, a deprecated alias since transformers 5.23.
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        return PeftModel.from_pretrained(model, path).merge_and_unload()


def load_model(model_path, quantization="none", dtype="auto", device=None, attn_implementation=None):
    """The model of a checkpoint or LoRA adapter directory, in eval mode on `device` (default: cuda if available).

    `quantization` is one of `QUANTIZATIONS`; `attn_implementation="eager"` is needed to show thoughts.
    """
    path = Path(model_path)
    tied = quantization != "none" and MMCoconutConfig.from_pretrained(model_path).tie_word_embeddings
    quantization_cfg = quantization_config(quantization, tied_embeddings=tied)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    load_kwargs = {"dtype": DTYPES[dtype] if isinstance(dtype, str) else dtype}
    if attn_implementation is not None:
        load_kwargs["attn_implementation"] = attn_implementation
    if (path / "adapter_config.json").is_file():
        if quantization_cfg is not None:
            raise ValueError(f"{path} holds LoRA adapters; quantize the merged model ({path / 'merged'}) instead")
        model = _load_lora(path, **load_kwargs).to(device)
    elif quantization_cfg is not None:
        device_map = {"": 0} if quantization.startswith("bnb") else device
        model = MMCoconutForConditionalGeneration.from_pretrained(
            model_path, quantization_config=quantization_cfg, device_map=device_map, **load_kwargs
        )
    else:
        model = MMCoconutForConditionalGeneration.from_pretrained(model_path, **load_kwargs).to(device)
    return model.eval()


def load(model_path, quantization="none", dtype="auto", device=None, attn_implementation=None):
    """(model in eval mode, processor) of a checkpoint or LoRA adapter directory, ready for `predict`.

    The processor keeps the tiling saved with the checkpoint; a checkpoint saved without a chat template (before
    train.py wrote one) gets the one its config implies. See `load_model` for the arguments.
    """
    model = load_model(model_path, quantization, dtype, device, attn_implementation)
    processor = load_internvl_processor(model_path)
    if processor.chat_template is None:
        logger.info("%s has no chat template; using the one its config implies", model_path)
        set_chat_template(processor, model.config)
    return model, processor


# ---------------------------------------------------------------------------------------------- answering


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
            show_thoughts=False, top_k=5):
    """Answer `question` about `image` (a path, a PIL image or None) greedily; returns a `Prediction`.

    `choices` (up to 26 strings) makes it multiple choice; `max_new_tokens=None` keeps the checkpoint's saved
    budget; `show_thoughts` needs a model loaded with `attn_implementation="eager"` and a latent span.
    """
    if choices:
        if len(choices) > len(CHOICE_LETTERS):
            raise ValueError(f"at most {len(CHOICE_LETTERS)} choices, got {len(choices)}")
        question = render_choices(question, choices)
    if image is not None:
        image = load_image(image, "the question")
    inputs = _on(build_inputs(processor, image, question, num_latents), model)
    # Unset options come from the checkpoint's generation_config (its max_new_tokens); only a given budget overrides.
    budget = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
    # A given count is a closed span of that many latents, even for a checkpoint that thinks adaptively.
    thinking = {} if num_latents is None else {"thinking": "fixed"}
    output = model.generate(**inputs, do_sample=False, return_dict_in_generate=True, **budget, **thinking)
    config = model.config
    prompt_ids = inputs["input_ids"][0].tolist()
    adaptive = prompt_ids[-1] == config.start_latent_id
    new_ids = after_thinking(
        prompt_ids, output.sequences[0, len(prompt_ids) :].tolist(), config.start_latent_id, config.end_latent_id
    )
    new_ids, _, _ = _until_eos(new_ids, _eos_ids(model))
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
        "position_ids": (attention_mask.long().cumsum(-1) - 1).clamp_min(0),
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


# ---------------------------------------------------------------------------------------------- CLI


def format_prediction(prediction):
    """The lines `predict.py` prints."""
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



def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_latents is not None and args.num_latents < 0:
        parser.error("--num-latents must be >= 0")
    if args.image is not None and not os.path.isfile(args.image):
        parser.error(f"--image {args.image}: no such file")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    model, processor = load(
        args.model, args.quantization, args.dtype, args.device,
        attn_implementation="eager" if args.show_thoughts else None,
    )
    prediction = predict(
        model, processor, args.image, args.question, choices=args.choices, num_latents=args.num_latents,
        max_new_tokens=args.max_new_tokens, show_thoughts=args.show_thoughts, top_k=args.top_k,
    )
    if args.json:
        fields = (
            "question", "generated_text", "answer", "letter", "parse_error", "num_latents", "adaptive", "thoughts"
        )
        print(json.dumps({name: getattr(prediction, name) for name in fields}, ensure_ascii=False))
    else:
        print(format_prediction(prediction))
    return prediction


if __name__ == "__main__":
    main(sys.argv[1:])
