"""The recipe's argument dataclasses (besides transformers' `TrainingArguments`): torch-free, so `--help` is instant.

A recipe is YAML over these and `CurriculumTrainingArguments`; see `mmcoconut.training.recipe`.
"""

from dataclasses import dataclass, field

from mmcoconut.constants import DATA_SOURCES, THOUGHT_SUPERVISION, TOKENIZERS
from mmcoconut.errors import SetupError  # its home is mmcoconut.errors; imported from here too
from mmcoconut.modes import MODES


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="OpenGVLab/InternVL3-1B-Pretrained",
        metadata={"help": "InternVL checkpoint to start from: a Hub id or path, `-hf` or original (internvl_chat) format."},
    )
    load_model_path: str | None = field(
        default=None,
        metadata={"help": "An MMCoconut checkpoint of ours to continue from (e.g. the CoT run's output); "
                          "overrides model_name_or_path."},
    )
    tiny_internvl: dict | str | None = field(
        default=None,
        metadata={"help": "Build a tiny randomly initialised InternVL3-shaped model from config instead of "
                          "loading one (demo and tests): a dict of `tiny_internvl_config` overrides ({} for defaults)."},
    )
    tokenizer: str = field(
        default="internvl",
        metadata={"help": f"With tiny_internvl, one of {TOKENIZERS}. internvl: InternVL3's tokenizer (151,674 ids); "
                          "task: a byte-level BPE with InternVL3's special tokens, trained on the training records "
                          "(at most task_vocab_size ids), for models trained from scratch on CPU, whose steps it "
                          "makes several times faster (experiments/step_time_by_vocabulary.py)."},
    )
    task_vocab_size: int = field(default=512, metadata={"help": "Vocabulary cap of the task tokenizer."})
    model_dtype: str = field(
        default="bfloat16", metadata={"help": "Dtype of the loaded weights: float32, bfloat16 or float16."}
    )
    attn_implementation: str = field(default="sdpa", metadata={"help": "eager, sdpa or flash_attention_2."})
    freeze_vision_tower: bool = field(default=False, metadata={"help": "Train only the projector and LM."})
    use_lora: bool = field(default=False, metadata={"help": "Train PEFT LoRA adapters instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "Linear layer names adapted in the language model."},
    )
    lora_vision: bool = field(
        default=False, metadata={"help": "Also adapt the vision tower's attention and MLP (q/k/v_proj, fc1, fc2)."}
    )


@dataclass
class DataArguments:
    data_source: str = field(default="aokvqa_hf", metadata={"help": f"One of {DATA_SOURCES}."})
    hf_dataset_id: str = field(
        default="HuggingFaceM4/A-OKVQA", metadata={"help": "Hub id or save_to_disk path (data_source=aokvqa_hf)."}
    )
    aokvqa_dir: str | None = field(default=None, metadata={"help": "Official annotations dir (aokvqa_official)."})
    coco_dir: str | None = field(default=None, metadata={"help": "COCO 2017 images dir (aokvqa_official)."})
    train_file: str | None = field(default=None, metadata={"help": "Canonical JSON/JSONL training file (canonical)."})
    eval_file: str | None = field(default=None, metadata={"help": "Canonical JSON/JSONL validation file (canonical)."})
    train_split: str = field(default="train", metadata={"help": "A-OKVQA training split."})
    eval_split: str = field(default="val", metadata={"help": "A-OKVQA validation split."})
    synthetic_dir: str = field(
        default="data/generated/synthetic",
        metadata={"help": "Where the synthetic set is generated when missing (data_source=synthetic)."},
    )
    synthetic_task: str = field(default="shape_grid", metadata={"help": "Task of synthetic_data.py."})
    synthetic_train: int = field(default=64, metadata={"help": "Synthetic training questions."})
    synthetic_val: int = field(default=16, metadata={"help": "Synthetic validation questions."})
    steps_from: str = field(
        default="rationales",
        metadata={"help": "A-OKVQA steps: `rationales` (each rationale a step) or `first_rationale_sentences`."},
    )
    max_length: int = field(
        default=3072, metadata={"help": "Longer samples are skipped and counted, never truncated."}
    )
    max_tiles: int = field(default=8, metadata={"help": "InternVL dynamic tiling cap (tiles per image, + thumbnail)."})
    skip_bad_samples: bool = field(
        default=False, metadata={"help": "Skip (count, log) records with missing/unreadable images instead of failing."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training records."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N validation records."})


@dataclass
class CurriculumArguments:
    mode: str = field(default="coconut", metadata={"help": f"One of {MODES}."})
    c_thought: int = field(default=2, metadata={"help": "Continuous thoughts per replaced reasoning step."})
    epochs_per_stage: int = field(default=3, metadata={"help": "Epochs each curriculum stage lasts."})
    first_stage_epochs: int | None = field(
        default=None,
        metadata={"help": "Epochs of the run's first stage (None: epochs_per_stage). From scratch, a longer "
                          "stage 0 gives CoT the budget Coconut gives it as a separate run."},
    )
    max_latent_stage: int = field(default=3, metadata={"help": "Last stage; later epochs stay at it."})
    first_stage: int = field(
        default=0, metadata={"help": "Stage of the first epoch (1 when continuing from a stage-0 CoT checkpoint)."}
    )
    pad_latent_to_max: bool = field(
        default=True, metadata={"help": "Give every sample stage·c_thought latents even with fewer steps."}
    )
    uniform_prob: float = field(default=0.0, metadata={"help": "Probability of a sample at a random stage."})
    supervise_end_latent: bool = field(
        default=False,
        metadata={"help": "Teach when to stop thinking: each thought predicts <|latent|> (go on) or <|end-latent|> "
                          "(stop); needs mode coconut and pad_latent_to_max false. The checkpoint then generates "
                          "with thinking='adaptive' by default."},
    )
    thought_supervision: str = field(
        default="none",
        metadata={"help": f"One of {THOUGHT_SUPERVISION}. step: in training, each continuous thought is decoded by "
                          "the language model itself, on its own and teacher-forced, into the written step it "
                          "replaced, and that cross-entropy is added to the loss (mode coconut). Costs nothing at "
                          "inference; the checkpoint is the same kind."},
    )
    thought_supervision_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the step decoding loss (per decoded token, against the answer's tokens)."},
    )
    reset_optimizer: bool = field(default=True, metadata={"help": "Clear optimizer state at each new stage."})


@dataclass
class GenerationEvalArguments:
    eval_accuracy: bool = field(
        default=False,
        metadata={"help": "At each evaluation also generate answers and report eval_mc_accuracy, eval_da_accuracy, "
                          "eval_num_unparseable and eval_mean_generated_tokens (use with metric_for_best_model)."},
    )
    eval_max_new_tokens: int = field(default=256, metadata={"help": "Generation budget per answer in evaluation."})


RECIPE_DATACLASSES = (ModelArguments, DataArguments, CurriculumArguments, GenerationEvalArguments)


__all__ = [
    "SetupError", "ModelArguments", "DataArguments", "CurriculumArguments", "GenerationEvalArguments",
    "RECIPE_DATACLASSES",
]
