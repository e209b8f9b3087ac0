"""Convert an OpenGVLab original-format InternVL checkpoint to transformers' native format, once, to disk.

    mmcoconut-convert OpenGVLab/InternVL3-1B-Pretrained ./InternVL3-1B-Pretrained-hf

See `mmcoconut.conversion` for the mapping; the loader converts at load time too, so this is optional.
"""

import logging
from pathlib import Path

from mmcoconut.cli.help import Parser, command
from mmcoconut.constants import QWEN_IMAGE_CONTEXT_TOKEN_ID
from mmcoconut.preflight import looks_local, require_dir, require_hub


def build_parser():
    """The CLI's arguments; needs no torch, so `--help` answers before the imports below."""
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="original-format checkpoint: local directory or Hub id (owner/name)")
    parser.add_argument("destination", help="directory for the native InternVL checkpoint")
    parser.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: what from_pretrained picks)")
    parser.add_argument(
        "--image-token-id",
        type=int,
        default=None,
        help=f"id of <IMG_CONTEXT> (default: the checkpoint tokenizer's, else {QWEN_IMAGE_CONTEXT_TOKEN_ID})",
    )
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if Path(args.source).exists() or looks_local(args.source):  # torch-free, before the conversion's imports
        require_dir(args.source, "source")
    else:
        require_hub(args.source, "model", "source")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    from mmcoconut.conversion import convert_checkpoint

    convert_checkpoint(args.source, args.destination, dtype=args.dtype, image_token_id=args.image_token_id)


run = command(main)


if __name__ == "__main__":
    run()
