"""Write the synthetic A-OKVQA-shaped set (tasks and layout: `mmcoconut.data.synthetic`).

    mmcoconut-data --out data/synthetic --n-train 64 --n-val 16 --seed 0 [--task colour_chain] [--hf]
"""

import logging
from pathlib import Path

from mmcoconut.cli.help import Parser, command
from mmcoconut.data.synthetic import (  # PIL and the standard library only: --help stays fast
    TASKS,
    official_to_hf,
    write_synthetic_aokvqa,
)


def build_parser():
    """The CLI's arguments (torch-free: `--help` answers at once)."""
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--n-train", type=int, default=64, help="training questions")
    parser.add_argument("--n-val", type=int, default=16, help="validation questions")
    parser.add_argument("--seed", type=int, default=0, help="random seed (the same seed writes the same set)")
    parser.add_argument("--task", default="shape_grid", choices=sorted(TASKS), help="which synthetic task")
    parser.add_argument("--hf", action="store_true", help="also write {out}/hf as the Hub copy (save_to_disk)")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths = write_synthetic_aokvqa(args.out, args.n_train, args.n_val, args.seed, args.task)
    if args.hf:
        official_to_hf(paths["aokvqa_dir"], paths["coco_dir"]).save_to_disk(Path(args.out) / "hf")


run = command(main)


if __name__ == "__main__":
    run()
