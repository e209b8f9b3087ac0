r"""Ask a trained model about an image, from the command line.

    mmcoconut-predict --model outputs/demo --image cat.jpg --question "What is on the mat?"
    mmcoconut-predict --model outputs/demo --image cat.jpg --question "What is on the mat?" \
        --choices cat dog bird fish [--num-latents N] [--show-thoughts] [--quantization torchao-int8]

With `--choices` the question is shown to the model with the choices rendered `A. ..` to `D. ..` (as A-OKVQA
training does) and the answer is a letter and its text; without, it is the free text of the model's `Answer:` line.
The prompt is the checkpoint's chat template (`mmcoconut.text.prompt`: the training-time layout, with the checkpoint's
latent span unless `--num-latents` says otherwise; a checkpoint trained with `supervise_end_latent` decides how many
thoughts to think, and `--num-latents N` forces N). `--model` may be a merged checkpoint or a LoRA adapter directory
(its base is loaded and the adapters merged in). `--show-thoughts` decodes each continuous thought through the LM
head and measures where it attends (`mmcoconut.analysis.attention`).
"""

import json
import logging
import shlex
from pathlib import Path

from mmcoconut.cli.help import Parser, add_loading_args, command
from mmcoconut.constants import CHOICE_LETTERS
from mmcoconut.errors import UserValueError, shorten
from mmcoconut.preflight import (
    check_question,
    check_thought_count,
    read_config,
    require_file,
    require_model,
    require_quantization,
)

EXAMPLE_CHOICES = ("green", "blue", "yellow", "purple")


def build_parser():
    """The CLI's arguments (torch-free: `--help` answers at once)."""
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint directory, Hub id (owner/name) or LoRA adapter "
                                                       "directory")
    parser.add_argument("--image", help="image file (default: none, a text-only question)")
    parser.add_argument("--question", required=True, help="the question, one string")
    parser.add_argument("--choices", nargs="+", metavar="CHOICE",
                        help=f"the {len(CHOICE_LETTERS)} answer choices, each its own argument (e.g. --choices "
                             f"{' '.join(EXAMPLE_CHOICES)}): the answer is then a letter and its text (default: none, "
                             "a free-text answer)")
    parser.add_argument("--num-latents", type=int, default=None,
                        help="latents in the prompt (default: the checkpoint's, latent_stage × c_thought; a "
                             "checkpoint trained with supervise_end_latent decides, up to that many)")
    parser.add_argument("--show-thoughts", action="store_true",
                        help="print what each continuous thought decodes to and where it attends")
    parser.add_argument("--top-k", type=int, default=5, help="decoded tokens shown per thought")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="generation budget (default: the checkpoint's generation_config)")
    add_loading_args(parser)
    parser.add_argument("--json", action="store_true", help="print the prediction as JSON")
    return parser


def check_choices(choices):
    """`--choices` as the checkpoint was trained: exactly `len(CHOICE_LETTERS)` separate arguments (A-OKVQA's four).

    One string with commas (`--choices "green, blue, yellow, purple"`) or another count is one line showing the
    form that works."""
    if choices is None:
        return
    count = len(CHOICE_LETTERS)
    if len(choices) == 1 and "," in choices[0]:
        parts = [part.strip() for part in choices[0].split(",") if part.strip()]
        raise UserValueError(
            f"--choices takes the {count} choices as separate arguments, not one string with commas: "
            f"--choices {' '.join(shlex.quote(part) for part in parts)}"
        )
    if len(choices) != count:
        raise UserValueError(
            f"--choices takes exactly {count} choices ({CHOICE_LETTERS[0]}-{CHOICE_LETTERS[-1]}, as the checkpoint "
            f"was trained), each its own argument, e.g. --choices {' '.join(EXAMPLE_CHOICES)}; got {len(choices)}: "
            f"{shorten(' '.join(shlex.quote(choice) for choice in choices), 200, quote=False)}"
        )


def check_before_loading(args):
    """Everything that can fail without torch, in one line each: the choices, the extras, the image, the model."""
    check_question(args.question, "--question")
    check_choices(args.choices)
    require_quantization(args.quantization)
    if args.image is not None:
        require_file(args.image, "--image", image=True)
    require_model(args.model)
    if (Path(args.model) / "config.json").is_file():  # a Hub id's config is checked once it has loaded
        check_thought_count(args.num_latents, read_config(args.model), "--num-latents")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_latents is not None and args.num_latents < 0:
        parser.error("--num-latents must be >= 0")
    if args.top_k < 1:
        parser.error("--top-k must be >= 1")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be >= 1")
    check_before_loading(args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    from mmcoconut.inference.loading import load
    from mmcoconut.inference.prediction import format_prediction, predict

    model, processor = load(
        args.model, args.quantization, args.dtype, args.device,
        attn_implementation="eager" if args.show_thoughts else None,
    )
    check_thought_count(args.num_latents, model.config, "--num-latents")
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


run = command(main)


if __name__ == "__main__":
    run()
