"""A web demo (Gradio): ask a trained model about an image and see where each continuous thought looks.

    mmcoconut-app --model outputs/demo                      # serves http://127.0.0.1:7860
    mmcoconut-app --model outputs/demo --screenshot docs/app.png --example-image X --example-question Q

The page is `mmcoconut.app`. Needs the `app` extra: `pip install -e ".[app]"` (gradio; `--screenshot` also needs
a `chromium` binary).
"""

import json
import logging
import os
import re
from pathlib import Path

import yaml

from mmcoconut.cli.help import Parser, add_loading_args, command
from mmcoconut.constants import APP_QUEUE_SIZE, APP_TIME_LIMIT_S, THOUGHTS_FACTOR
from mmcoconut.errors import UserError
from mmcoconut.preflight import chromium_binary, require_extra, require_file, require_model, require_quantization


def build_parser():
    """The CLI's arguments (torch-free: `--help` answers at once)."""
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="outputs/demo",
                        help="checkpoint directory, Hub id (owner/name) or LoRA adapter directory")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on")
    parser.add_argument("--max-thoughts", type=int, default=None,
                        help=f"continuous thoughts one request may ask for, at most (default: {THOUGHTS_FACTOR} x "
                             "the checkpoint's)")
    parser.add_argument("--time-limit", type=float, default=APP_TIME_LIMIT_S,
                        help="seconds of generation one request may take; a longer one is refused with a message")
    parser.add_argument("--queue-size", type=int, default=APP_QUEUE_SIZE,
                        help="requests waiting at most (one is answered at a time); more are refused at once")
    add_loading_args(parser)
    parser.add_argument("--screenshot", help="serve on a free loopback port, save a PNG of the page here, exit "
                                             "(needs a chromium binary)")
    parser.add_argument("--example-image", help="pre-filled image (its answer is shown on load) (default: for a "
                                                "run that kept its generated data, as the demo does, its first "
                                                "validation question; for a model trained on A-OKVQA, a bundled "
                                                "example)")
    parser.add_argument("--example-question", default="What colour is the shape to the right of the circle?",
                        help="pre-filled question (with --example-image)")
    parser.add_argument("--example-choices", nargs="*", default=[], metavar="CHOICE",
                        help="pre-filled choices, each its own argument (with --example-image) (default: none)")
    return parser


def check_before_loading(args):
    """Everything that can fail without torch, in one line each: the bounds, the extras, the files, the model."""
    for flag, value in (("--max-thoughts", args.max_thoughts), ("--time-limit", args.time_limit),
                        ("--queue-size", args.queue_size)):
        if value is not None and (value < 0 if flag == "--max-thoughts" else value <= 0):
            raise UserError(f"{flag} must be {'>= 0' if flag == '--max-thoughts' else '> 0'}, got {value}")
    require_extra("gradio", "mmcoconut-app")
    require_quantization(args.quantization)
    if args.screenshot and chromium_binary() is None:
        raise UserError("--screenshot needs Chromium, and there is none on PATH (apt-get install chromium)")
    if args.example_image:
        require_file(args.example_image, "--example-image", image=True)
    require_model(args.model)


# The example for a checkpoint trained on A-OKVQA (or on anything but generated data): an A-OKVQA-style question that
# needs outside knowledge, on the public-domain portrait of Grace Hopper (US Navy) that matplotlib ships as sample data.
AOKVQA_EXAMPLE_IMAGE = "grace_hopper.jpg"
AOKVQA_EXAMPLE = ("Which branch of the military does this person serve in?", ("army", "navy", "air force", "marines"))
RECIPE_BLOCK = re.compile(r"^## Training recipe\s*```yaml\n(.*?)^```", re.DOTALL | re.MULTILINE)


def trained_recipe(model):
    """The recipe in a local checkpoint's model card (`README.md`, as training writes it), or None."""
    card = Path(model) / "README.md"
    if not card.is_file():
        return None
    match = RECIPE_BLOCK.search(card.read_text(encoding="utf-8"))
    if match is None:
        return None
    recipe = yaml.safe_load(match.group(1))
    return recipe if isinstance(recipe, dict) else None


def trained_on(recipe):
    """What the model was trained on, in words, from its card's recipe (None: the card does not say)."""
    if recipe is None:
        return None
    source = recipe.get("data_source")
    if source == "synthetic":
        return f"the generated `{recipe.get('synthetic_task')}` task (mmcoconut's synthetic data, not photos)"
    if source in ("aokvqa_hf", "aokvqa_official"):
        return "A-OKVQA (COCO photos, questions that need outside knowledge)"
    if source == "canonical":
        return f"the records in `{recipe.get('train_file')}`"
    return None


def bundled_example():
    """(image, question, choices) of the A-OKVQA-style example the app ships with."""
    from matplotlib import cbook

    question, choices = AOKVQA_EXAMPLE
    return str(cbook.get_sample_data(AOKVQA_EXAMPLE_IMAGE, asfileobj=False)), question, "\n".join(choices)


def choose_example(model, recipe):
    """The page's example: a run's own first validation question when it kept its generated data (the demo), the
    bundled A-OKVQA-style example unless the model was trained on generated data (which it alone understands), else
    None."""
    own = run_example(model)
    if own is not None:
        return own
    if recipe is not None and recipe.get("data_source") == "synthetic":
        return None
    return bundled_example()


def run_example(model):
    """(image, question, choices) of the first validation question a training run generated for itself
    (`{model}/data/canonical/val.jsonl`, the demo's layout), or None."""
    records = Path(model) / "data" / "canonical" / "val.jsonl"
    if not records.is_file():
        return None
    with open(records, encoding="utf-8") as f:
        record = json.loads(f.readline())
    image = (records.parent / record["image"]).resolve()
    if not image.is_file():
        return None
    return str(image), record["question"].split("\n")[0], "\n".join(record.get("choices") or [])


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_before_loading(args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local demo
    from mmcoconut.app import build_demo, free_port, take_screenshot
    from mmcoconut.inference.loading import load

    model, processor = load(args.model, args.quantization, args.dtype, args.device, attn_implementation="eager")
    recipe = trained_recipe(args.model)
    if args.example_image:
        example = (args.example_image, args.example_question, "\n".join(args.example_choices))
    else:
        example = choose_example(args.model, recipe)
    demo = build_demo(model, processor, args.model, example, trained_on=trained_on(recipe),
                      max_thoughts=args.max_thoughts, time_limit_s=args.time_limit, queue_size=args.queue_size)
    if args.screenshot:
        port = free_port()
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        try:
            take_screenshot(f"http://127.0.0.1:{port}/", args.screenshot)
        finally:
            demo.close()
        return
    demo.launch(server_name=args.host, server_port=args.port)


run = command(main)


if __name__ == "__main__":
    run()
