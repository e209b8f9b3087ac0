"""Train MMCoconut: `accelerate launch train.py recipes/coconut.yaml` (or `mmcoconut-train recipes/demo.yaml`).

A recipe is YAML over `ModelArguments`, `DataArguments`, `CurriculumArguments`, `GenerationEvalArguments` and
transformers' `TrainingArguments`, parsed by `HfArgumentParser`. A recipe may name a `base` recipe (a path relative
to itself) whose keys it overrides. Command-line flags override the recipe:
`train.py recipes/cot.yaml --learning_rate 1e-5 --output_dir outputs/try`.
"""

import logging
import sys
from pathlib import Path

from mmcoconut.cli.help import command
from mmcoconut.errors import UserValueError
from mmcoconut.training.recipe import parse_args

logger = logging.getLogger("train")


def main(argv=None):
    model_args, data_args, curriculum_args, eval_args, training_args = parse_args(
        sys.argv[1:] if argv is None else argv
    )
    # The recipe parsed (or --help answered) without torch; the rest of training needs it.
    from mmcoconut.training.checks import check_args
    from mmcoconut.training.run_lock import output_dir_lock

    check_args(model_args, data_args, curriculum_args, eval_args, training_args)

    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if training_args.process_index == 0 else logging.WARNING,
    )
    # Held from before the "previous run" guard to the end: a second run into this output_dir fails at once.
    with output_dir_lock(training_args.output_dir, main_process=training_args.process_index == 0):
        return _train(model_args, data_args, curriculum_args, eval_args, training_args)


def _train(model_args, data_args, curriculum_args, eval_args, training_args):
    """The run itself, inside the output_dir lock."""
    import transformers
    from transformers import set_seed

    from data_collator import MMCoconutCollator
    from mmcoconut.data.curriculum import CurriculumDataset
    from mmcoconut.data.records import unlabeled_ids
    from mmcoconut.training.build import build_model_and_processor, export_merged, load_records
    from mmcoconut.training.checks import check_distributed_setup, prepare_output_dir, require_hub_access
    from mmcoconut.training.report import final_eval_metrics, model_card_info, run_summary
    from trainer_curriculum import CurriculumSchedule, CurriculumTrainer

    resume_from_checkpoint = prepare_output_dir(training_args)
    transformers.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)
    require_hub_access(model_args, data_args)

    with training_args.main_process_first(desc="loading data"):  # rank 0 generates/caches, the others read
        train_records = load_records(data_args, "train")
        evaluate = training_args.eval_strategy != "no" or training_args.do_eval
        eval_records = load_records(data_args, "eval") if evaluate else None
    if not data_args.skip_bad_samples:  # before the model loads: a record without an answer cannot be trained on
        for split, records in (("train", train_records), ("eval", eval_records)):
            missing = unlabeled_ids(records) if records is not None else []
            if missing:
                raise UserValueError(
                    f"{len(missing)} {split} record(s) have no answer ({', '.join(map(repr, missing[:5]))}), and "
                    "training needs one for every record; add them, drop the records, or set skip_bad_samples to "
                    "skip them"
                )
    model, processor = build_model_and_processor(model_args, data_args, curriculum_args, train_records)
    dataset_kwargs = dict(
        processor=processor,
        mode=curriculum_args.mode,
        c_thought=curriculum_args.c_thought,
        max_latent_stage=curriculum_args.max_latent_stage,
        pad_latent_to_max=curriculum_args.pad_latent_to_max,
        supervise_end_latent=curriculum_args.supervise_end_latent,
        thought_supervision=curriculum_args.thought_supervision == "step",
        max_length=data_args.max_length,
        skip_bad_samples=data_args.skip_bad_samples,
        require_answers=True,
        max_tiles=data_args.max_tiles,
        seed=training_args.seed,
    )
    train_dataset = CurriculumDataset(train_records, uniform_prob=curriculum_args.uniform_prob, **dataset_kwargs)
    eval_dataset = CurriculumDataset(eval_records, **dataset_kwargs) if evaluate else None

    schedule = CurriculumSchedule(
        epochs_per_stage=curriculum_args.epochs_per_stage,
        first_stage_epochs=curriculum_args.first_stage_epochs,
        max_latent_stage=curriculum_args.max_latent_stage,
        first_stage=curriculum_args.first_stage,
        reset_optimizer=curriculum_args.reset_optimizer,
        mode=curriculum_args.mode,
    )
    trainer = CurriculumTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=MMCoconutCollator(
            pad_token_id=processor.tokenizer.pad_token_id, latent_token_id=model.config.latent_token_id
        ),
        processing_class=processor,
        schedule=schedule,
        generation_eval_kwargs={"max_new_tokens": eval_args.eval_max_new_tokens} if eval_args.eval_accuracy else None,
        model_card_info=model_card_info(model_args, data_args, curriculum_args, training_args),
        inference_max_new_tokens=eval_args.eval_max_new_tokens,
    )
    check_distributed_setup(trainer)
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    # With LoRA: the adapters and the run's config; as every checkpoint, with the chat template and the budget.
    trainer.save_model(training_args.output_dir)
    if eval_dataset is not None:
        trainer.save_metrics("eval", final_eval_metrics(trainer))
    trainer.create_model_card()
    if training_args.push_to_hub:
        trainer.push_to_hub(commit_message=f"mmcoconut {curriculum_args.mode}, stage {model.config.latent_stage}")
    if model_args.use_lora and trainer.is_world_process_zero():
        if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
            logger.warning("LoRA merge skipped: the weights are sharded; the adapters are in %s", training_args.output_dir)
        else:
            export_merged(trainer.model, processor, Path(training_args.output_dir) / "merged")
    if trainer.is_world_process_zero():
        print(run_summary(trainer, eval_records, model_args, data_args, curriculum_args, eval_args, training_args))
    leave_process_group()
    return trainer


def leave_process_group():
    """Under `accelerate launch` / torchrun: every rank waits for the others, then the process group is torn down
    before the interpreter exits. Left to exit, a rank could abort (`terminate called without an active exception`,
    exit -6) after the run had finished and saved, and the launcher reported the whole run as failed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# The console entry point: a user error (`mmcoconut.errors`: a bad recipe, a previous run in output_dir, no network
# for a Hub id) is one line, not a traceback; MMCOCONUT_DEBUG=1 shows it (`--debug` is TrainingArguments' own flag).
run = command(main)


if __name__ == "__main__":
    run()
