"""Train MMCoconut: `accelerate launch train.py recipes/coconut.yaml` (or `python train.py recipes/demo.yaml`).

A recipe is YAML over `ModelArguments`, `DataArguments`, `CurriculumArguments`,
`GenerationEvalArguments` and transformers' `TrainingArguments`, parsed by `HfArgumentParser`. A recipe may name a `base` recipe
(a path relative to itself) whose keys it overrides. Command-line flags override the recipe:
`python train.py recipes/cot.yaml --learning_rate 1e-5 --output_dir outputs/try`.
"""

import argparse
import copy
import enum
import json
import logging
import os
import shutil
import sys
import types
import typing
import urllib.error
import urllib.request
import warnings
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import yaml

# torch, transformers and the project's modules are imported where they are used, so that `train.py --help`
# answers in a fraction of a second instead of the ~10 s they take to import.

logger = logging.getLogger("train")

# `data_aokvqa.SOURCES` + "synthetic" and `data_curriculum.MODES`, named here for the help without importing those
# modules (tests/test_cli.py keeps them equal).
DATA_SOURCES = ("aokvqa_hf", "aokvqa_official", "canonical", "synthetic")
MODES = ("cot", "coconut", "no_cot", "no_thoughts", "pause")
TOKENIZERS = ("internvl", "task")
HUB_PROBE_TIMEOUT_S = 5


class SetupError(RuntimeError):
    """This machine cannot run the recipe as it stands (no network for a Hub id, no GPU for bf16).

    Run from the command line, train.py prints the message as one line (no traceback) and exits with status 1.
    """


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
        metadata={"help": "Epochs of the run's first stage (default: epochs_per_stage). From scratch, a longer "
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
    reset_optimizer: bool = field(default=True, metadata={"help": "Clear optimizer state at each new stage."})


@dataclass
class GenerationEvalArguments:
    eval_accuracy: bool = field(
        default=False,
        metadata={"help": "At each evaluation also generate answers and report eval_mc_accuracy, eval_da_accuracy, "
                          "eval_num_unparseable and eval_mean_generated_tokens (use with metric_for_best_model)."},
    )
    eval_max_new_tokens: int = field(default=256, metadata={"help": "Generation budget per answer in evaluation."})


def read_recipe(path, _chain=()):
    """The recipe at `path` merged over its `base` chain (later keys win)."""
    path = Path(path)
    chain = (*_chain, path)
    if path.resolve() in {link.resolve() for link in _chain}:
        raise ValueError(f"recipe base chain loops: {' -> '.join(map(str, chain))}")
    with open(path, encoding="utf-8") as f:
        recipe = yaml.safe_load(f) or {}
    if not isinstance(recipe, dict):
        raise ValueError(f"{path}: a recipe must be a YAML mapping, got {type(recipe).__name__}")
    base = recipe.pop("base", None)
    if base is None:
        return recipe
    if not isinstance(base, str):
        raise ValueError(f"{path}: base must be a recipe path, got {base!r}")
    if not (path.parent / base).is_file():
        raise FileNotFoundError(f"{path}: base recipe {path.parent / base} not found")
    return {**read_recipe(path.parent / base, chain), **recipe}


def _type_name(hint):
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return f"one of {[member.value for member in hint]}"
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    return getattr(hint, "__name__", str(hint))


def _accepts(hint, value):
    """Whether a YAML value fits a dataclass field's type (classes we do not know are left to the dataclass)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(arg, value) for arg in args)
    if origin is typing.Literal:
        return value in args
    if hint is typing.Any:
        return True
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return isinstance(value, hint) or value in {member.value for member in hint}
    if hint is list or origin is list:
        return isinstance(value, list) and (not args or all(_accepts(args[0], item) for item in value))
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    return True


def check_recipe_types(recipe, dataclass_types, source):
    """Every recipe value must fit its field's type, before it becomes a parser default.

    argparse converts only string defaults (YAML's `1e-3` is one, and stays valid); anything else would reach
    the run unchecked: `c_thought: 1.5` crashed in the DataLoader, `learning_rate: [1, 2]` inside AdamW.
    """
    hints = {}
    for dataclass_type in dataclass_types:
        hints.update(typing.get_type_hints(dataclass_type))
    problems = [
        f"{key}: {value!r} is {type(value).__name__}, expected {_type_name(hints[key])}"
        for key, value in recipe.items()
        if not isinstance(value, str) and not _accepts(hints[key], value)
    ]
    if problems:
        raise ValueError(f"{source}: wrong recipe value types: " + "; ".join(problems))


RECIPE_DATACLASSES = (ModelArguments, DataArguments, CurriculumArguments, GenerationEvalArguments)
USAGE = "train.py RECIPE.yaml [--field value ...]"


def help_parser():
    """`train.py --help`: every field of our four dataclasses with its default, without importing transformers."""
    parser = argparse.ArgumentParser(
        prog="train.py",
        usage=USAGE,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Every field of transformers' TrainingArguments is a recipe key and a flag too (output_dir, "
               "num_train_epochs, learning_rate, per_device_train_batch_size, bf16, eval_strategy, save_strategy, "
               "report_to, ...): `train.py RECIPE.yaml --help` lists all of them with that recipe's values as "
               "defaults.",
    )
    for dataclass_type in RECIPE_DATACLASSES:
        group = parser.add_argument_group(dataclass_type.__name__)
        for f in fields(dataclass_type):
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            group.add_argument(f"--{f.name}", default=default, help=f.metadata.get("help", "").replace("%", "%%"))
    return parser


def parse_args(argv):
    if argv and argv[0] in ("-h", "--help"):
        help_parser().print_help()
        raise SystemExit(0)
    if not argv or not argv[0].endswith((".yaml", ".yml")):
        raise SystemExit(f"usage: {USAGE}\n(train.py --help lists the fields)")
    from transformers import HfArgumentParser

    from trainer_curriculum import CurriculumTrainingArguments

    parser = HfArgumentParser((*RECIPE_DATACLASSES, CurriculumTrainingArguments))
    recipe = read_recipe(argv[0])
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(recipe) - known)
    if unknown:
        raise ValueError(f"{argv[0]}: unknown recipe keys {unknown}")
    if isinstance(recipe.get("resume_from_checkpoint"), bool):  # YAML `true`: TrainingArguments holds a string
        recipe["resume_from_checkpoint"] = str(recipe["resume_from_checkpoint"]).lower()
    check_recipe_types(recipe, parser.dataclass_types, argv[0])
    # The recipe becomes the defaults, so flags given after it override it.
    for action in parser._actions:
        if action.dest in recipe:
            action.required = False
    parser.set_defaults(**recipe)
    check_device_support(parser.parse_known_args(argv[1:])[0], argv[0])
    return parser.parse_args_into_dataclasses(args=argv[1:])


def check_args(model_args, data_args, curriculum_args, eval_args, training_args):
    """Validate the whole configuration before any model or data is loaded (minutes, for InternVL3-1B).

    Raises one ValueError listing every problem; an incomplete checkpoint directory is a FileNotFoundError
    naming the missing files.
    """
    import data_aokvqa
    from processing_mmcoconut import CHECKPOINT_PARTS, check_checkpoint_dir
    from trainer_curriculum import SCHEDULES

    problems = []

    def need(condition, message):
        if not condition:
            problems.append(message)

    c = curriculum_args
    need(c.mode in MODES, f"mode must be one of {MODES}, got {c.mode!r}")
    need(c.c_thought >= 1, f"c_thought must be >= 1, got {c.c_thought}")
    need(c.max_latent_stage >= 0, f"max_latent_stage must be >= 0, got {c.max_latent_stage}")
    need(c.epochs_per_stage >= 1, f"epochs_per_stage must be >= 1, got {c.epochs_per_stage}")
    # Stage max_latent_stage + 1 is the final one (every step replaced); later stages do not exist.
    need(0 <= c.first_stage <= c.max_latent_stage + 1,
         f"first_stage must be in 0..max_latent_stage + 1 = {c.max_latent_stage + 1}, got {c.first_stage}")
    need(0.0 <= c.uniform_prob <= 1.0, f"uniform_prob must be in [0, 1], got {c.uniform_prob}")

    d = data_args
    need(d.data_source in DATA_SOURCES, f"data_source must be one of {DATA_SOURCES}, got {d.data_source!r}")
    need(d.steps_from in data_aokvqa.STEPS_FROM,
         f"steps_from must be one of {data_aokvqa.STEPS_FROM}, got {d.steps_from!r}")
    need(d.max_length is None or d.max_length >= 1, f"max_length must be >= 1, got {d.max_length}")
    need(d.max_tiles >= 1, f"max_tiles must be >= 1, got {d.max_tiles}")
    for name in ("max_train_samples", "max_eval_samples"):
        need(getattr(d, name) is None or getattr(d, name) >= 1, f"{name} must be >= 1, got {getattr(d, name)}")
    evaluate = training_args.eval_strategy != "no" or training_args.do_eval
    if d.data_source == "canonical":
        for name, needed in (("train_file", True), ("eval_file", evaluate)):
            path = getattr(d, name)
            need(not needed or path is not None, f"data_source canonical needs {name}")
            need(path is None or Path(path).is_file(), f"{name} {path} does not exist")
    if d.data_source == "aokvqa_official":
        need(d.aokvqa_dir is not None and d.coco_dir is not None,
             "data_source aokvqa_official needs aokvqa_dir and coco_dir")
    if d.data_source == "synthetic":
        need(d.synthetic_train >= 1 and d.synthetic_val >= 1,
             f"synthetic_train and synthetic_val must be >= 1, got {d.synthetic_train}, {d.synthetic_val}")

    m = model_args
    need(m.model_dtype in ("float32", "bfloat16", "float16"),
         f"model_dtype must be float32, bfloat16 or float16, got {m.model_dtype!r}")
    need(not m.use_lora or m.lora_r >= 1, f"lora_r must be >= 1, got {m.lora_r}")
    if isinstance(m.tiny_internvl, str):
        try:
            parsed = json.loads(m.tiny_internvl)
            need(isinstance(parsed, dict), f"tiny_internvl must be a JSON object, got {m.tiny_internvl!r}")
        except json.JSONDecodeError as error:
            problems.append(f"tiny_internvl is not valid JSON ({error}): {m.tiny_internvl!r}")
    need(eval_args.eval_max_new_tokens >= 1, f"eval_max_new_tokens must be >= 1, got {eval_args.eval_max_new_tokens}")

    t = training_args
    scheduler = getattr(t.lr_scheduler_type, "value", t.lr_scheduler_type)
    need(scheduler in SCHEDULES,
         f"lr_scheduler_type must be one of {SCHEDULES} (restarted per stage), got {scheduler!r}")
    # max_steps > 0 overrides the epochs; otherwise no epoch would save an untrained model and exit 0.
    need(t.max_steps > 0 or t.num_train_epochs > 0, f"num_train_epochs must be > 0, got {t.num_train_epochs}")
    if problems:
        raise ValueError("invalid configuration:\n  - " + "\n  - ".join(problems))

    if m.load_model_path:
        check_checkpoint_dir(m.load_model_path)
    elif m.tiny_internvl is None and Path(m.model_name_or_path).is_dir():
        from convert_internvl_chat import is_internvl_chat_checkpoint

        base = Path(m.model_name_or_path)
        # Original-format checkpoints need no processor files: their processor is built from the config.
        original = (base / "config.json").is_file() and is_internvl_chat_checkpoint(base)
        check_checkpoint_dir(base, ("config", "weights", "tokenizer") if original else CHECKPOINT_PARTS)


_PREVIOUS_RUN_FILES = (
    "config.json", "model.safetensors", "model.safetensors.index.json", "adapter_config.json",
    "adapter_model.safetensors", "training_args.bin",
)


def prepare_output_dir(training_args):
    """The checkpoint to resume from (None for a new run), after guarding the previous run in `output_dir`.

    `resume_from_checkpoint` `true`/`latest` means the newest `checkpoint-*` in `output_dir`; `false` none.
    A new run into an `output_dir` that holds checkpoints or a final model is refused unless
    `overwrite_output_dir`; then the old `checkpoint-*` folders are removed, since `save_total_limit` rotation
    sorts by step and would delete the new run's checkpoints before the old run's.
    """
    from transformers.trainer_utils import get_last_checkpoint, sort_checkpoints

    output_dir = Path(training_args.output_dir)
    resume = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("false", "none", ""):
        resume = None
    if isinstance(resume, str) and resume.lower() in ("true", "latest"):
        resume = get_last_checkpoint(output_dir) if output_dir.is_dir() else None
        if resume is None:
            raise FileNotFoundError(
                f"resume_from_checkpoint {training_args.resume_from_checkpoint}: no checkpoint-* folder in {output_dir}"
            )
        logger.info("Resuming from the latest checkpoint, %s", resume)
    if resume is not None:
        return resume
    checkpoints = sort_checkpoints(str(output_dir)) if output_dir.is_dir() else []
    final = [name for name in _PREVIOUS_RUN_FILES if (output_dir / name).is_file()]
    if not training_args.overwrite_output_dir:
        if checkpoints or final:
            found = [Path(c).name for c in checkpoints] + final
            raise FileExistsError(
                f"output_dir {output_dir} holds a previous run ({', '.join(found)}); resume it with "
                "--resume_from_checkpoint true, replace it with --overwrite_output_dir true, "
                "or choose another output_dir"
            )
        return None
    # Every rank enters (it has a barrier); the saving process removes.
    with training_args.main_process_first(desc="removing the previous run's checkpoints"):
        if training_args.should_save and checkpoints:
            logger.warning("overwrite_output_dir: removing the previous run's %s", [Path(c).name for c in checkpoints])
            for checkpoint in checkpoints:
                shutil.rmtree(checkpoint)
    return None


def check_device_support(args, recipe_path):
    """A recipe that trains in bf16 needs a GPU: say so (and how to run it on CPU) before anything is loaded."""
    import torch

    if (args.bf16 or args.bf16_full_eval) and not args.use_cpu and not torch.cuda.is_available():
        raise SetupError(
            f"{recipe_path} trains in bf16 (`bf16: true`), which needs a GPU, and torch sees none; run it on a GPU, "
            "or on CPU (slow) add `--bf16 false --use_cpu true`"
        )


def require_hub(name_or_path, what, field_name):
    """Fail in seconds, naming `name_or_path` and the two ways out, when it is a Hub id the Hub cannot serve.

    Without this, a missing network shows up as half a minute of retries and a long traceback in which the id
    appears only in warnings. A local directory and a Hub id in the cache under HF_HUB_OFFLINE=1 pass.
    """
    if Path(name_or_path).exists():
        return
    from huggingface_hub import constants, try_to_load_from_cache

    fixes = f"set {field_name} to a local copy (a directory), or run with HF_HUB_OFFLINE=1 with it in the cache"
    if constants.HF_HUB_OFFLINE:
        if what == "model" and not isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
            raise SetupError(f"HF_HUB_OFFLINE is set and the {what} {name_or_path!r} is not in the cache "
                             f"({constants.HF_HUB_CACHE}): {fixes.split(', or ')[0]}")
        return
    try:
        # One request, no retries: any HTTP answer (even an error status) means the Hub is reachable.
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=HUB_PROBE_TIMEOUT_S)
    except urllib.error.HTTPError:
        return
    except OSError as error:  # URLError, refused, timeout
        reason = getattr(error, "reason", error)
        raise SetupError(f"cannot reach {constants.ENDPOINT} ({reason}) to load the {what} {name_or_path!r}: "
                         f"{fixes}") from None


def require_hub_access(model_args, data_args):
    """`require_hub` for every Hub id the run will load (model first, then data), before anything is loaded."""
    if model_args.load_model_path:
        require_hub(model_args.load_model_path, "model", "load_model_path")
    elif model_args.tiny_internvl is None:
        require_hub(model_args.model_name_or_path, "model", "model_name_or_path")
    if data_args.data_source == "aokvqa_hf":
        require_hub(data_args.hf_dataset_id, "dataset", "hf_dataset_id")


def check_distributed_setup(trainer):
    """Refuse the launches that accelerate/transformers would silently run as something else.

    On a machine without GPUs, an FSDP or DeepSpeed accelerate config quietly becomes DDP or independent
    single-process runs that overwrite each other's output.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and trainer.args.world_size == 1:
        raise RuntimeError(
            f"launched as {world_size} processes but the Trainer runs each alone (no distributed backend "
            "for this device); on CPU use ds_configs/accelerate_ddp.yaml with use_cpu: true"
        )
    wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    wants_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if wants_fsdp and not trainer.is_fsdp_enabled:
        raise RuntimeError("the accelerate config asks for FSDP but the Trainer would not use it (FSDP needs GPUs)")
    if wants_deepspeed and not trainer.is_deepspeed_enabled:
        raise RuntimeError(
            "the accelerate config asks for DeepSpeed but the Trainer would not use it: accelerate was told to run on "
            "CPU (`accelerate launch --cpu`, `use_cpu: true` in the accelerate config, or ACCELERATE_USE_CPU=true), "
            "which sets up plain CPU processes without DeepSpeed. DeepSpeed itself runs without GPUs (its CPU "
            "accelerator, gloo): launch with ds_configs/accelerate_zero2.yaml or accelerate_zero3.yaml as they are"
        )


def load_records(data_args, split_name):
    """Canonical records of the training (`split_name="train"`) or validation split."""
    import data_aokvqa

    train = split_name == "train"
    limit = data_args.max_train_samples if train else data_args.max_eval_samples
    if data_args.data_source == "synthetic":
        canonical_dir = ensure_synthetic_data(data_args)
        return data_aokvqa.load_records(
            "canonical", split_name, path=canonical_dir / ("train.jsonl" if train else "val.jsonl"), limit=limit
        )
    if data_args.data_source not in DATA_SOURCES:
        raise ValueError(f"data_source must be one of {DATA_SOURCES}, got {data_args.data_source!r}")
    return data_aokvqa.load_records(
        data_args.data_source,
        data_args.train_split if train else data_args.eval_split,
        dataset_id=data_args.hf_dataset_id,
        aokvqa_dir=data_args.aokvqa_dir,
        coco_dir=data_args.coco_dir,
        path=data_args.train_file if train else data_args.eval_file,
        steps_from=data_args.steps_from,
        limit=limit,
    )


def ensure_synthetic_data(data_args):
    """Generate the synthetic set once (deterministic), recorded by a manifest of its arguments."""
    from synthetic_data import write_synthetic_aokvqa

    out = Path(data_args.synthetic_dir)
    manifest = {"task": data_args.synthetic_task, "n_train": data_args.synthetic_train, "n_val": data_args.synthetic_val}
    manifest_path = out / "manifest.json"
    if manifest_path.is_file() and json.loads(manifest_path.read_text()) == manifest:
        return out / "canonical"
    if manifest_path.is_file():
        raise ValueError(
            f"{out} holds a synthetic set generated with {manifest_path.read_text().strip()}; the recipe asks for "
            f"{manifest}. Point synthetic_dir elsewhere or delete {out}."
        )
    write_synthetic_aokvqa(out, data_args.synthetic_train, data_args.synthetic_val, seed=0, task=data_args.synthetic_task)
    manifest_path.write_text(json.dumps(manifest))
    return out / "canonical"


def build_tiny_model(overrides, text_tokenizer, max_tiles, attn_implementation="sdpa", dtype=None):
    """(model, processor): a randomly initialised tiny InternVL3-shaped MMCoconut model sized to `text_tokenizer`.

    `overrides` are `tiny_internvl_config` keyword arguments. InternVL3's own tokenizer keeps the config's
    default vocabulary (151,674 ids, `<video>` after it, as transformers' conversion has it); a task tokenizer
    sets the vocabulary and the `<IMG_CONTEXT>` id to its own.
    """
    from transformers import InternVLForConditionalGeneration

    from modeling_mmcoconut import MMCoconutForConditionalGeneration
    from processing_mmcoconut import INTERNVL3_VOCAB_SIZE, build_internvl_processor, tiny_internvl_config

    if len(text_tokenizer) > INTERNVL3_VOCAB_SIZE:
        internvl_config = tiny_internvl_config(**overrides)
    else:
        internvl_config = tiny_internvl_config(
            vocab_size=len(text_tokenizer), image_token_id=text_tokenizer.context_image_token_id, **overrides
        )
    internvl_config._attn_implementation = attn_implementation
    processor = build_internvl_processor(internvl_config, text_tokenizer, max_tiles)
    internvl = InternVLForConditionalGeneration(internvl_config)
    model = MMCoconutForConditionalGeneration.from_internvl(internvl, processor.tokenizer, dtype=dtype)
    return model, processor


def build_text_tokenizer(model_args, train_records):
    """The tokenizer of a tiny model: InternVL3's, or one trained on `train_records` (`tokenizer: task`)."""
    from data_curriculum import tokenizer_texts
    from processing_mmcoconut import build_internvl_tokenizer, build_task_tokenizer

    if model_args.tokenizer == "internvl":
        return build_internvl_tokenizer()
    if model_args.tokenizer == "task":
        return build_task_tokenizer(tokenizer_texts(train_records), model_args.task_vocab_size)
    raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {model_args.tokenizer!r}")


def build_model_and_processor(model_args, data_args, curriculum_args, train_records=None):
    """The model to train and its processor. `train_records` feed the task tokenizer (`tokenizer: task`)."""
    import torch

    from modeling_mmcoconut import MMCoconutForConditionalGeneration
    from processing_mmcoconut import load_internvl_processor

    dtype = getattr(torch, model_args.model_dtype)
    if model_args.tokenizer != "internvl" and model_args.tiny_internvl is None:
        raise ValueError(f"tokenizer: {model_args.tokenizer} builds a new vocabulary, so it needs tiny_internvl "
                         "(a model trained from scratch); a loaded model keeps its own tokenizer")
    if model_args.load_model_path:
        model = MMCoconutForConditionalGeneration.from_pretrained(
            model_args.load_model_path, dtype=dtype, attn_implementation=model_args.attn_implementation
        )
        processor = load_internvl_processor(model_args.load_model_path, data_args.max_tiles)
    elif model_args.tiny_internvl is not None:
        overrides = model_args.tiny_internvl
        overrides = json.loads(overrides) if isinstance(overrides, str) else dict(overrides)
        model, processor = build_tiny_model(
            overrides, build_text_tokenizer(model_args, train_records), data_args.max_tiles,
            model_args.attn_implementation, dtype,
        )
    else:
        internvl, processor = load_base_internvl(
            model_args.model_name_or_path, dtype, model_args.attn_implementation, data_args.max_tiles
        )
        model = MMCoconutForConditionalGeneration.from_internvl(internvl, processor.tokenizer)
    model.config.c_thought = curriculum_args.c_thought
    model.config.training_mode = curriculum_args.mode
    model.config.pause_as_thought = curriculum_args.mode == "pause"
    model.config.supervise_end_latent = curriculum_args.supervise_end_latent
    if model_args.freeze_vision_tower:
        model.internvl.model.vision_tower.requires_grad_(False)
    if model_args.use_lora:
        model = apply_lora(model, model_args)
    return model, processor


def apply_lora(model, model_args):
    """Wrap `model` with LoRA adapters; the three latent-token embedding rows stay trainable too."""
    from peft import LoraConfig, get_peft_model

    names = "|".join(model_args.lora_target_modules)
    towers = "language_model|vision_tower" if model_args.lora_vision else "language_model"
    vision_names = "|q_proj|k_proj|v_proj|projection_layer|fc1|fc2" if model_args.lora_vision else ""
    config = LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=rf".*\.({towers})\..*\.({names}{vision_names})$",
        # The latent markers are new tokens: their embeddings must learn even though the rest is frozen;
        # with tied embeddings the lm_head rows must follow them.
        trainable_token_indices={"embed_tokens": list(model.config.latent_ids)},
        ensure_weight_tying=bool(model.config.internvl_config.tie_word_embeddings),
    )
    with warnings.catch_warnings():
        # peft (0.21) reads `PreTrainedModel.is_gradient_checkpointing`, a deprecated alias since transformers 5.23.
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        peft_model = get_peft_model(model, config)
    peft_model.print_trainable_parameters()
    return peft_model


def export_merged(peft_model, processor, directory):
    """A standalone checkpoint with the LoRA adapters merged into the weights (loads without peft).

    Merges a copy: `merge_and_unload` rewrites the model it is given, which would leave the trainer
    with no adapters to save or push.
    """
    merged = copy.deepcopy(peft_model).merge_and_unload()
    merged.save_pretrained(directory)
    processor.save_pretrained(directory)
    logger.info("Merged LoRA model written to %s", directory)
    return merged


def load_base_internvl(name_or_path, dtype, attn_implementation, max_tiles):
    """(InternVL model, processor) of a base checkpoint: `-hf` loads directly, original format is converted."""
    from transformers import InternVLForConditionalGeneration

    from convert_internvl_chat import is_internvl_chat_checkpoint, load_internvl_chat, load_internvl_chat_tokenizer
    from processing_mmcoconut import build_internvl_processor, load_internvl_processor

    if is_internvl_chat_checkpoint(name_or_path):
        internvl = load_internvl_chat(name_or_path, dtype=dtype, attn_implementation=attn_implementation)
        tokenizer = load_internvl_chat_tokenizer(name_or_path)
        return internvl, build_internvl_processor(internvl.config, tokenizer, max_tiles)
    internvl = InternVLForConditionalGeneration.from_pretrained(
        name_or_path, dtype=dtype, attn_implementation=attn_implementation
    )
    return internvl, load_internvl_processor(name_or_path, max_tiles)


def main(argv=None):
    model_args, data_args, curriculum_args, eval_args, training_args = parse_args(
        sys.argv[1:] if argv is None else argv
    )
    check_args(model_args, data_args, curriculum_args, eval_args, training_args)
    import transformers
    from transformers import set_seed

    from data_collator import MMCoconutCollator
    from data_curriculum import CurriculumDataset
    from trainer_curriculum import CurriculumSchedule, CurriculumTrainer

    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if training_args.process_index == 0 else logging.WARNING,
    )
    resume_from_checkpoint = prepare_output_dir(training_args)
    transformers.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)
    require_hub_access(model_args, data_args)

    with training_args.main_process_first(desc="loading data"):  # rank 0 generates/caches, the others read
        train_records = load_records(data_args, "train")
        evaluate = training_args.eval_strategy != "no" or training_args.do_eval
        eval_records = load_records(data_args, "eval") if evaluate else None
    model, processor = build_model_and_processor(model_args, data_args, curriculum_args, train_records)
    dataset_kwargs = dict(
        processor=processor,
        mode=curriculum_args.mode,
        c_thought=curriculum_args.c_thought,
        max_latent_stage=curriculum_args.max_latent_stage,
        pad_latent_to_max=curriculum_args.pad_latent_to_max,
        supervise_end_latent=curriculum_args.supervise_end_latent,
        max_length=data_args.max_length,
        skip_bad_samples=data_args.skip_bad_samples,
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
    return trainer


def final_eval_metrics(trainer):
    """The evaluation of the trained model: the one the last epoch already ran, else a new one (never twice).

    With `load_best_model_at_end` the model is the best checkpoint's, which the last evaluation did not measure.
    """
    last = next((entry for entry in reversed(trainer.state.log_history) if "eval_loss" in entry), None)
    reloaded = trainer.args.load_best_model_at_end and trainer.state.best_model_checkpoint is not None
    if last is not None and last.get("step") == trainer.state.global_step and not reloaded:
        return {k: v for k, v in last.items() if k.startswith("eval_") or k == "epoch"}
    return trainer.evaluate()


def model_card_info(model_args, data_args, curriculum_args, training_args):
    """What the model card says about the run: the real starting point and where the loadable model is."""
    if model_args.tiny_internvl is not None and not model_args.load_model_path:
        base_model, base_description = None, f"random init: tiny config ({model_args.tokenizer} tokenizer)"
    else:
        base_model = model_args.load_model_path or model_args.model_name_or_path
        base_description = f"`{base_model}`"
    output_dir = Path(training_args.output_dir)
    return dict(
        base_model=base_model,
        base_description=base_description,
        mode=curriculum_args.mode,
        recipe=yaml.safe_dump(recipe_as_trained(model_args, data_args, curriculum_args, training_args)),
        hub_model_id=training_args.hub_model_id if training_args.push_to_hub else None,
        load_path=str(output_dir / "merged" if model_args.use_lora else output_dir),
        lora=model_args.use_lora,
    )


def run_summary(trainer, eval_records, model_args, data_args, curriculum_args, eval_args, training_args):
    """The closing lines of a run: MC accuracy and answer length per stage (as evaluated), and what to run next."""
    from trainer_curriculum import format_stage_table

    out = Path(training_args.output_dir)
    loadable = out / "merged" if model_args.use_lora else out
    lines = []
    if eval_records:
        with_choices = [r for r in eval_records if r.get("choices")]
        chance = sum(1 / len(r["choices"]) for r in with_choices) / len(with_choices) if with_choices else None
        table = format_stage_table(trainer.state.log_history, chance)
        if table:
            lines += [f"Evaluated on {len(eval_records)} validation questions; the last evaluation of each stage:",
                      table, ""]
    lines.append(f"Model: {loadable} (from_pretrained loads it; model card: {out / 'README.md'})")
    if model_args.use_lora:
        lines.append(f"LoRA adapters (they need peft and the base model): {out}")
    lines.append("Try next:")
    example = next((r for r in eval_records or () if r.get("image") and r.get("choices")), None)
    if example is not None:
        question = example["question"].split("\n")[0]  # the choices follow on their own lines
        lines.append(f"  python predict.py --model {loadable} --image {example['image']} --question "
                     f"{_shell_quote(question)} --choices {' '.join(map(_shell_quote, example['choices']))}")
    eval_mode = {"cot": "cot", "no_cot": "vanilla"}.get(curriculum_args.mode, "coconut")
    data = {
        "synthetic": f"--data-file {Path(data_args.synthetic_dir) / 'canonical' / 'val.jsonl'}",
        "canonical": f"--data-file {data_args.eval_file}",
        "aokvqa_hf": f"--hf-dataset {data_args.hf_dataset_id}",
        "aokvqa_official": f"--aokvqa-dir {data_args.aokvqa_dir} --coco-dir {data_args.coco_dir}",
    }[data_args.data_source]
    lines.append(f"  python evaluate_aokvqa.py --model {loadable} {data} --split {data_args.eval_split} "
                 f"--mode {eval_mode} --max-tiles {data_args.max_tiles} "
                 f"--max-new-tokens {eval_args.eval_max_new_tokens} --output-dir {out / 'eval'}")
    return "\n".join(lines)


def _shell_quote(text):
    """`text` as one shell word, in double quotes when that reads better than shlex's quoting of a `'`."""
    import shlex

    if "'" in text and not any(c in text for c in '"$`\\!'):
        return f'"{text}"'
    return shlex.quote(text)


def recipe_as_trained(model_args, data_args, curriculum_args, training_args):
    """The recipe values that differ from the defaults, for the model card."""
    values = {}
    for args in (model_args, data_args, curriculum_args):
        default = type(args)()
        values.update({k: v for k, v in vars(args).items() if getattr(default, k) != v})
    keys = ("learning_rate", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
            "lr_scheduler_type", "warmup_steps", "weight_decay", "bf16", "activation_checkpointing", "seed")
    values.update({k: getattr(training_args, k) for k in keys})
    return {k: (v.value if hasattr(v, "value") else v) for k, v in values.items()}


if __name__ == "__main__":
    try:
        main()
    except SetupError as error:  # what to change, in one line, rather than a traceback through the loaders
        sys.exit(f"train.py: {error}")
