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

import argparse
import json
import logging
import os

from mmcoconut.cli.help import DefaultsHelpFormatter, command
from mmcoconut.constants import DTYPE_NAMES, QUANTIZATIONS


def build_parser():
    """The CLI's arguments (torch-free: `--help` answers at once)."""
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


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_latents is not None and args.num_latents < 0:
        parser.error("--num-latents must be >= 0")
    if args.image is not None and not os.path.isfile(args.image):
        parser.error(f"--image {args.image}: no such file")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    from mmcoconut.inference.loading import load
    from mmcoconut.inference.prediction import format_prediction, predict

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


run = command(main)


if __name__ == "__main__":
    main()
