"""A web demo (Gradio): ask a trained model about an image and see where each continuous thought looks.

    mmcoconut-app --model outputs/demo                      # serves http://127.0.0.1:7860
    mmcoconut-app --model outputs/demo --screenshot docs/app.png --example-image X --example-question Q

The page is `mmcoconut.app`. Needs the `app` extra: `pip install -e ".[app]"` (gradio; `--screenshot` also needs
a `chromium` binary).
"""

import argparse
import logging
import os

from mmcoconut.cli.help import DefaultsHelpFormatter
from mmcoconut.constants import DTYPE_NAMES, QUANTIZATIONS


def build_parser():
    """The CLI's arguments (torch-free: `--help` answers at once)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter
    )
    parser.add_argument("--model", default="outputs/demo", help="checkpoint or LoRA adapter directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default="none")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="auto")
    parser.add_argument("--device", default=None)
    parser.add_argument("--screenshot", help="serve on a free loopback port, save a PNG of the page here, exit")
    parser.add_argument("--example-image", help="pre-filled image (its answer is shown on load)")
    parser.add_argument("--example-question", default="What colour is the shape to the right of the circle?")
    parser.add_argument("--example-choices", nargs="*", default=[])
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local demo
    from mmcoconut.app import build_demo, free_port, take_screenshot
    from mmcoconut.inference.loading import load

    model, processor = load(args.model, args.quantization, args.dtype, args.device, attn_implementation="eager")
    example = None
    if args.example_image:
        example = (args.example_image, args.example_question, "\n".join(args.example_choices))
    demo = build_demo(model, processor, args.model, example)
    if args.screenshot:
        port = free_port()
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        try:
            take_screenshot(f"http://127.0.0.1:{port}/", args.screenshot)
        finally:
            demo.close()
        return
    demo.launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
