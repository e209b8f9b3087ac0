"""Write the synthetic A-OKVQA-shaped set (tasks and layout: `mmcoconut.data.synthetic`).

    mmcoconut-data --out data/synthetic --n-train 64 --n-val 16 --seed 0 [--task colour_chain] [--hf]
"""

import argparse
import logging
from pathlib import Path

from mmcoconut.cli.help import DefaultsHelpFormatter
from mmcoconut.data.synthetic import (  # PIL and the standard library only: --help stays fast
    TASKS,
    official_to_hf,
    write_synthetic_aokvqa,
)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--n-val", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", default="shape_grid", choices=sorted(TASKS))
    parser.add_argument("--hf", action="store_true", help="also write {out}/hf as the Hub copy (save_to_disk)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths = write_synthetic_aokvqa(args.out, args.n_train, args.n_val, args.seed, args.task)
    if args.hf:
        official_to_hf(paths["aokvqa_dir"], paths["coco_dir"]).save_to_disk(Path(args.out) / "hf")


if __name__ == "__main__":
    main()
