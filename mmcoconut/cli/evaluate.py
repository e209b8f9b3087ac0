"""Evaluate an MMCoconut checkpoint on A-OKVQA multiple choice (and direct answer).

    python evaluate_aokvqa.py --model runs/coconut/checkpoint-best --split val --mode coconut \\
        --hf-dataset HuggingFaceM4/A-OKVQA --output-dir runs/eval
    accelerate launch evaluate_aokvqa.py ...     # the questions are split across processes

Writes `predictions_{split}.json` (official format), `samples_{split}.jsonl` and `metrics_{split}.json` to
`--output-dir` (refusing to replace an earlier run's files of the split unless `--overwrite`) and prints a summary
table. See `mmcoconut.evaluation.aokvqa` for the modes and how unparseable answers are handled.
"""

import argparse
import logging
import re
from pathlib import Path

from mmcoconut.cli.help import Parser, command
from mmcoconut.constants import DEFAULT_MAX_NEW_TOKENS, DTYPE_NAMES, EVAL_MODES, HF_AOKVQA_ID, THINKING_MODES
from mmcoconut.errors import UserError, shorten
from mmcoconut.preflight import (
    check_thought_count,
    looks_local,
    read_config,
    require_dir,
    require_file,
    require_hub,
    require_model,
)

logger = logging.getLogger("evaluate_aokvqa")
SPLIT_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")


def build_parser():
    """The CLI's argument parser."""
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True,
                        help="checkpoint directory, Hub id (owner/name) or LoRA adapter directory (model + processor)")
    parser.add_argument("--split", default="val", help="train, val or test (a label only with --data-file)")
    source = parser.add_argument_group("data (exactly one source)")
    source.add_argument("--hf-dataset", help=f"Hub dataset id (e.g. {HF_AOKVQA_ID}) or a save_to_disk directory")
    source.add_argument(
        "--aokvqa-dir", help="official A-OKVQA annotations (aokvqa_v1p0_{split}.json); needs --coco-dir"
    )
    source.add_argument("--coco-dir", help="COCO 2017 images ({split}2017/*.jpg)")
    source.add_argument("--data-file", help="canonical records, JSON or JSONL")
    parser.add_argument("--mode", choices=EVAL_MODES, default="coconut",
                        help="the prompt: no reasoning (vanilla), written steps (cot) or continuous thoughts (coconut)")
    parser.add_argument(
        "--num-latents", type=int, default=None,
        help="latents in coconut prompts (default: the checkpoint's latent_stage × c_thought); implies --thinking fixed",
    )
    parser.add_argument(
        "--thinking", choices=THINKING_MODES, default=None,
        help="coconut: fixed latents in the prompt, or the model decides when to stop thinking (default: adaptive "
             "for checkpoints trained with supervise_end_latent, else fixed)",
    )
    parser.add_argument("--max-thoughts", type=int, default=None,
                        help="adaptive thinking: thoughts at most (default: the checkpoint's latent_stage × c_thought)")
    parser.add_argument("--end-latent-threshold", type=float, default=None,
                        help="adaptive thinking: stop when P(<|end-latent|>) >= this (default: when it is the argmax)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call, per process")
    parser.add_argument(
        "--max-new-tokens", type=int, default=None,
        help="generation budget (default: the checkpoint's generation_config, else per mode: "
             f"{DEFAULT_MAX_NEW_TOKENS})",
    )
    # Decoding options left unset keep the checkpoint's saved generation_config (greedy unless it says otherwise).
    parser.add_argument("--do-sample", action=argparse.BooleanOptionalAction, default=None,
                        help="sample (--no-do-sample: greedy decoding) (default: the checkpoint's generation_config)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="sampling temperature (default: the checkpoint's generation_config)")
    parser.add_argument("--top-p", type=float, default=None,
                        help="nucleus sampling (default: the checkpoint's generation_config)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (offset per process)")
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluate only the first N questions (default: all)")
    parser.add_argument("--output-dir", required=True, help="where the predictions, samples and metrics are written")
    parser.add_argument(
        "--max-tiles", type=int, default=None,
        help="InternVL tiles per image, at most (default: the tiling saved with the checkpoint)",
    )
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="auto",
                        help="dtype of the loaded weights (auto: the checkpoint's)")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (image tiling)")
    parser.add_argument(
        "--skip-bad-samples", action="store_true",
        help="skip (and count) questions whose image cannot be read instead of stopping",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace results of the same split already in --output-dir"
    )
    return parser


def _check_args(parser, args):
    official = args.aokvqa_dir is not None or args.coco_dir is not None
    if official and (args.aokvqa_dir is None or args.coco_dir is None):
        parser.error("--aokvqa-dir and --coco-dir go together")
    if sum([args.hf_dataset is not None, official, args.data_file is not None]) != 1:
        parser.error("give exactly one data source: --hf-dataset, --aokvqa-dir + --coco-dir, or --data-file")
    if args.num_latents is not None and args.mode != "coconut":
        parser.error(f"--num-latents applies to --mode coconut only, not {args.mode}")
    if args.thinking is not None and args.mode != "coconut":
        parser.error(f"--thinking applies to --mode coconut only, not {args.mode}")
    if args.num_latents is not None and args.thinking == "adaptive":
        parser.error("--num-latents fixes the number of thoughts; it cannot be combined with --thinking adaptive")
    if (args.max_thoughts is not None or args.end_latent_threshold is not None) and args.thinking == "fixed":
        parser.error("--max-thoughts and --end-latent-threshold apply to --thinking adaptive")
    if args.max_thoughts is not None and args.max_thoughts < 0:
        parser.error("--max-thoughts must be >= 0")
    if args.num_latents is not None and args.num_latents < 0:
        parser.error("--num-latents must be >= 0")
    for name in ("batch_size", "max_tiles", "limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be >= 1")
    # The split names the output files (predictions_{split}.json): a name, never a path.
    if not SPLIT_NAME.fullmatch(args.split):
        parser.error(f"--split must be a name of letters, digits, '.', '_' or '-' (it names the output files), "
                     f"got {shorten(args.split)}")


def check_sources(args):
    """Torch-free, in a fraction of a second: the model (a complete local checkpoint, or a Hub id the Hub answers
    for) and a `--hf-dataset` Hub id (or the local directory it names)."""
    require_model(args.model)
    if args.hf_dataset is not None and not Path(args.hf_dataset).exists():
        if looks_local(args.hf_dataset):
            require_dir(args.hf_dataset, "--hf-dataset")
        require_hub(args.hf_dataset, "dataset", "--hf-dataset")


def check_thought_counts(args, config):
    """`--num-latents` and `--max-thoughts` within the checkpoint's bound (`mmcoconut.preflight.thought_limit`)."""
    check_thought_count(args.num_latents, config, "--num-latents")
    check_thought_count(args.max_thoughts, config, "--max-thoughts")


def check_before_loading(args):
    """What can fail without the model, each in one line: the sources (`check_sources`), earlier results in the
    way, the local data files."""
    check_sources(args)
    if (Path(args.model) / "config.json").is_file():  # a Hub id's config is checked once it has loaded
        check_thought_counts(args, read_config(args.model))
    from mmcoconut.evaluation.aokvqa import check_outputs_free

    check_outputs_free(args.output_dir, args.split, args.overwrite)
    if args.data_file is not None:
        require_file(args.data_file, "--data-file")
    if args.aokvqa_dir is not None:
        require_dir(args.aokvqa_dir, "--aokvqa-dir")
        require_dir(args.coco_dir, "--coco-dir")


def load_records(args):
    """Canonical records of the chosen source and split, cut to `--limit`. Evaluation keeps records without
    rationales (they are only needed to train)."""
    from mmcoconut.data import aokvqa as data_aokvqa

    if args.hf_dataset is not None:
        source, path = "aokvqa_hf", None
    elif args.data_file is not None:
        source, path = "canonical", args.data_file
    else:
        source, path = "aokvqa_official", None
    return data_aokvqa.load_records(
        source, args.split, dataset_id=args.hf_dataset, aokvqa_dir=args.aokvqa_dir, coco_dir=args.coco_dir,
        path=path, require_rationales=False, limit=args.limit,
    )


def main(argv=None):
    """Run the CLI; returns the metrics dict (on every process)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    check_before_loading(args)
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from mmcoconut.evaluation.aokvqa import (
        build_eval_dataset,
        decoding_settings,
        default_num_latents,
        evaluate_model,
        format_summary,
        write_outputs,
    )
    from mmcoconut.inference.loading import load_model
    from mmcoconut.processing import load_internvl_processor

    accelerator = Accelerator()
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
    )

    # A merged checkpoint or a LoRA adapter directory (its base is loaded and the adapters merged in).
    model = load_model(args.model, dtype=args.dtype, device=accelerator.device)
    check_thought_counts(args, model.config)
    decoding = decoding_settings(
        model.generation_config, do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p
    )
    if decoding["do_sample"]:
        set_seed(args.seed, device_specific=True)
    processor = load_internvl_processor(args.model, max_tiles=args.max_tiles)
    num_latents, thinking = None, None
    if args.mode == "coconut":
        thinking = "fixed" if args.num_latents is not None else args.thinking or model.config.default_thinking
        if (args.max_thoughts is not None or args.end_latent_threshold is not None) and thinking == "fixed":
            raise UserError("--max-thoughts and --end-latent-threshold apply to adaptive thinking; this checkpoint "
                            "thinks a fixed number of thoughts by default (pass --thinking adaptive)")
        if thinking == "fixed":
            num_latents = args.num_latents if args.num_latents is not None else default_num_latents(model.config)
            logger.info(
                "coconut: %d latents per question (checkpoint latent_stage=%d, c_thought=%d)",
                num_latents, model.config.latent_stage, model.config.c_thought,
            )
        else:
            logger.info("coconut: adaptive thinking, at most %s thoughts",
                        args.max_thoughts if args.max_thoughts is not None else default_num_latents(model.config))
    max_new_tokens = args.max_new_tokens or model.generation_config.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[args.mode]

    records = load_records(args)
    dataset = build_eval_dataset(
        records, processor, args.mode, model.config, max_tiles=args.max_tiles, skip_bad_samples=args.skip_bad_samples,
        thinking=thinking,
    )
    logger.info("%d questions (%s split), %d process(es)", len(dataset), args.split, accelerator.num_processes)
    result = evaluate_model(
        model,
        dataset,
        num_latents=num_latents,
        thinking=thinking,
        max_thoughts=args.max_thoughts,
        end_latent_threshold=args.end_latent_threshold,
        batch_size=args.batch_size,
        max_new_tokens=max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        accelerator=accelerator,
        num_workers=args.num_workers,
    )
    metrics = {
        "model": args.model,
        "split": args.split,
        "mode": args.mode,
        "thinking": thinking,
        "num_latents": num_latents,
        "max_thoughts": args.max_thoughts,
        "end_latent_threshold": args.end_latent_threshold,
        "max_new_tokens": max_new_tokens,
        **decoding,
        "num_skipped": sum(dataset.skipped.values()),
        "skipped": dict(dataset.skipped),
        "skipped_ids": dict(dataset.skipped_ids),
        "num_processes": accelerator.num_processes,
        **result.metrics,
    }
    if accelerator.is_main_process:
        write_outputs(args.output_dir, args.split, result.samples, metrics, overwrite=args.overwrite)
        print(format_summary(metrics))
    accelerator.wait_for_everyone()
    return metrics


run = command(main)


if __name__ == "__main__":
    run()
