"""Why the learning-curve experiment uses a task tokenizer: one training step of its tiny model, side by side, with
InternVL3's 151,674-id vocabulary and with the task tokenizer.

    python -m experiments.step_time_by_vocabulary --threads 2

Builds the recipe's model (`recipes/experiment_colour_chain.yaml`) once per vocabulary on the experiment's training
split (`outputs/experiment/data`, written by `learning_curve.py --prepare`), times forward + backward + AdamW step on
the same CoT batches and prints the median step time of each and their ratio.
"""

import argparse
import time
from pathlib import Path

import torch
from transformers import InternVLForConditionalGeneration

from data_collator import MMCoconutCollator
from experiments.learning_curve import DEFAULT_RECIPE
from mmcoconut.cli.help import DefaultsHelpFormatter
from mmcoconut.data.aokvqa import load_canonical
from mmcoconut.data.curriculum import CurriculumDataset
from mmcoconut.processing import (
    build_internvl_processor,
    build_internvl_tokenizer,
    build_task_tokenizer,
    tiny_internvl_config,
)
from mmcoconut.text.prompt import tokenizer_texts
from mmcoconut.training.recipe import read_recipe
from modeling_mmcoconut import MMCoconutForConditionalGeneration

ROOT = Path(__file__).resolve().parent.parent



def build_parser():
    """The CLI's arguments; needs no torch, so `--help` answers before the imports below."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter
    )
    parser.add_argument("--train-file", default="outputs/experiment/data/canonical/train.jsonl")
    parser.add_argument("--task-vocab-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return parser






def median_step_seconds(tokenizer, overrides, records, batch_size, steps, warmup):
    torch.manual_seed(0)
    config = tiny_internvl_config(
        vocab_size=len(tokenizer), image_token_id=tokenizer.context_image_token_id, **overrides
    )
    processor = build_internvl_processor(config, tokenizer, max_tiles=1)
    model = MMCoconutForConditionalGeneration.from_internvl(InternVLForConditionalGeneration(config), tokenizer)
    model.train()
    dataset = CurriculumDataset(records, processor, mode="cot", c_thought=1, max_latent_stage=3)
    collator = MMCoconutCollator(tokenizer.pad_token_id, model.config.latent_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    for step in range(warmup + steps):
        batch = collator([dataset[i] for i in range(step * batch_size, (step + 1) * batch_size)])
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return sorted(times[warmup:])[steps // 2], len(tokenizer)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    overrides = dict(read_recipe(DEFAULT_RECIPE)["tiny_internvl"])
    records = load_canonical(args.train_file)
    needed = (args.warmup + args.steps) * args.batch_size
    if len(records) < needed:
        raise ValueError(f"{args.train_file} has {len(records)} records; {needed} are needed")
    tokenizers = {
        "internvl": build_internvl_tokenizer(),
        "task": build_task_tokenizer(tokenizer_texts(records), args.task_vocab_size),
    }
    seconds = {}
    for name, tokenizer in tokenizers.items():
        seconds[name], vocabulary = median_step_seconds(
            tokenizer, overrides, records[:needed], args.batch_size, args.steps, args.warmup
        )
        print(f"{name:>8}: vocabulary {vocabulary:>7}, median step {seconds[name]:.3f} s")
    ratio = seconds["internvl"] / seconds["task"]
    print(f"internvl / task: {ratio:.1f}x ({torch.get_num_threads()} threads, batch {args.batch_size})")
    return seconds


if __name__ == "__main__":
    main()
