"""A small, deterministic, A-OKVQA-shaped visual reasoning set for tests and the demo.

    mmcoconut-data --out data/synthetic --n-train 64 --n-val 16 --seed 0

writes

    {out}/aokvqa/aokvqa_v1p0_{train,val}.json     official A-OKVQA fields (load_official_aokvqa)
    {out}/coco/{train,val}2017/{image_id:012}.jpg COCO layout
    {out}/canonical/{train,val}.jsonl             canonical records (load_canonical), image paths relative
    {out}/hf/                                     with --hf: the Hub copy's layout (load_hf_aokvqa), save_to_disk

Every question needs the image and several steps. The default task, `shape_grid`, draws a grid of coloured
shapes and asks e.g. "What colour is the shape to the right of the circle?", with the steps "The circle is in
row 2, column 1.", "The shape to the right of it, in row 2, column 2, is a square.", "The square is red.".
The rationales are three phrasings of that chain; the canonical steps are the first rationale's sentences, so the
A-OKVQA loaders reproduce the canonical records with `steps_from="first_rationale_sentences"`.

The multi-hop task, `colour_chain` (`--task colour_chain`), draws a 4×4 board of mostly empty cells; five
cells are pointer tiles, each split in half: its left half's colour points to its right half's colour. The question
and the four choices are the same for every image ("Start at red and follow the pointers 3 times. Which colour do
you reach?", A. green B. blue C. yellow D. purple), so only the image decides the answer, and a model that does not
see it cannot beat chance (25%). Each step starts from the colour the previous step reached: "red points to
blue.", "blue points to yellow.", "yellow points to green." (short steps: at the real 151k vocabulary every label
token costs a full LM-head row on CPU). Sizes match the tiny model of the
experiment (`experiments/learning_curve.py`): a 56-px image of 14-px cells, i.e. one InternVL image token (2×2
patches of 7 px after the pixel shuffle) per cell, the left patches holding the key colour and the right ones
the value.

The variable-depth task, `colour_chain_depth`, is the same board with 1 to 4 hops drawn per question and stated
in it ("... follow the pointers 2 times ..."): the question tells how deep to think, only the image tells the
answer (for adaptive thinking, where the model decides how many thoughts a question needs).

A new task is a class with `name` and `sample(rng) -> SyntheticExample`, registered in `TASKS`.
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
