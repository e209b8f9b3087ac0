"""Checks that run before anything heavy is imported or loaded: local paths, checkpoint directories, the Hub, optional
extras. Standard library only at the top (huggingface_hub and PIL inside the two checks that need them), so a command
fails in a fraction of a second, in one line (`mmcoconut.errors`), instead of after torch's import or a model's load.

A model or dataset name is either a local path or a Hub id. `looks_local` tells them apart without the network: a
name that cannot be a Hub id (`owner/name`), or whose parent directory exists, is a path, and a missing path is an
error at once; a Hub id is probed once, with a short timeout, instead of transformers' minute of retries.
"""

import difflib
import importlib.util
import json
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

from mmcoconut.constants import MAX_IMAGE_PIXELS, MAX_QUESTION_CHARS, THOUGHTS_FACTOR
from mmcoconut.errors import (
    MissingExtraError,
    SetupError,
    UserError,
    UserFileNotFoundError,
    UserNotADirectoryError,
    UserValueError,
)

HUB_PROBE_TIMEOUT_S = 5
CHECKPOINT_PARTS = ("config", "weights", "tokenizer", "processor")
# The module an option needs → the pip extra that installs it (setup.cfg [options.extras_require]; None: no extra).
EXTRAS = {"torchao": "quantization", "gradio": "app", "wandb": "wandb", "deepspeed": "deepspeed", "bitsandbytes": None}
# `--quantization` choice → the module it needs (mmcoconut.constants.QUANTIZATIONS; "none" needs nothing).
QUANTIZATION_MODULES = {"torchao-int8": "torchao", "bnb-8bit": "bitsandbytes", "bnb-4bit": "bitsandbytes"}


def looks_local(name):
    """Whether `name` is meant as a local path rather than a Hub id (`owner/name`).

    A path: an absolute one, one starting with `.` or `~`, one with a backslash or with no or several `/`, or one
    whose parent directory exists (`outputs/demo` when `outputs/` is there).
    """
    text = os.fspath(name)
    if os.path.isabs(text) or text.startswith((".", "~")) or "\\" in text or text.count("/") != 1:
        return True
    return text.endswith("/") or Path(text).parent.is_dir()


def _did_you_mean(path):
    """` (did you mean X?)` for a near miss among `path`'s siblings, else ``."""
    try:
        siblings = os.listdir(path.parent)
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, siblings, n=1)
    return f" (did you mean {path.parent / close[0]}?)" if close else ""


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


def estimate_parameters(config):
    """(parameters, [(dotted path, block dict)]) a model config (`config.json` as a dict) describes, roughly: every
    nested transformer (a dict with `hidden_size` and `num_hidden_layers`) counts `L·(4h² + 3h·i)` plus its
    embeddings (and an untied output head), `i` its `intermediate_size` (4h when absent). Close enough to tell a
    1B model from one that cannot be built, which is all it is for."""
    blocks = []

    def walk(node, path):
        if not isinstance(node, dict):
            return
        sizes = [node.get(key) for key in ("hidden_size", "num_hidden_layers")]
        if all(isinstance(size, int) and not isinstance(size, bool) and size > 0 for size in sizes):
            blocks.append((path, node))
        for key, value in node.items():
            walk(value, f"{path}.{key}" if path else key)

    walk(config, "")
    total = 0
    for _, block in blocks:
        hidden, layers = block["hidden_size"], block["num_hidden_layers"]
        intermediate = block.get("intermediate_size")
        intermediate = intermediate if isinstance(intermediate, int) and intermediate > 0 else 4 * hidden
        vocab = block.get("vocab_size") if isinstance(block.get("vocab_size"), int) else 0
        heads = 1 if block.get("tie_word_embeddings", True) else 2
        total += layers * (4 * hidden * hidden + 3 * hidden * intermediate) + heads * max(vocab, 0) * hidden
    return total, blocks


def machine_memory_bytes():
    """Physical memory of this machine (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


# A config with more than this is absurd whatever the machine (the largest InternVL3 has 78 billion parameters).
MAX_PARAMETERS = 10**12


def check_model_size(config, where, dtype=None):
    """Refuse, before anything is built, a model config whose weights could not fit in this machine's memory (at
    2 bytes a parameter, the lightest unquantized dtype; 4 for `dtype` float32) or that is absurd (more than
    `MAX_PARAMETERS`), naming the fields that make it so. Without this, `hidden_size: 10000000` tries to allocate
    tens of gigabytes, or builds for minutes, before failing with an unrelated message."""
    parameters, blocks = estimate_parameters(config)
    if not blocks:
        return
    per_parameter = 4 if str(dtype).endswith("float32") else 2
    memory = machine_memory_bytes()
    too_big = parameters > MAX_PARAMETERS or (memory is not None and parameters * per_parameter > memory)
    if not too_big:
        return
    path, block = max(blocks, key=lambda item: item[1]["hidden_size"] * item[1]["num_hidden_layers"])
    prefix = f"{path}." if path else ""
    fields = ", ".join(
        f"{prefix}{key}: {block[key]}" for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
        if key in block
    )
    room = f"this machine has {memory / 2**30:.0f} GiB of memory" if memory else "the limit"
    raise UserValueError(
        f"{where}: the config describes a model of about {parameters:.3g} parameters ({fields}), about "
        f"{parameters * per_parameter / 2**30:,.0f} GiB of weights; {room} (at most {MAX_PARAMETERS:.0e} parameters "
        "in any case): check these sizes"
    )


def _missing_weights(directory):
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [shard for shard in shards if not (directory / shard).is_file()]
    if (directory / "model.safetensors").is_file():
        return []
    return ["model.safetensors (or model.safetensors.index.json)"]


def _missing_tokenizer(directory):
    missing = [] if (directory / "tokenizer_config.json").is_file() else ["tokenizer_config.json"]
    # A fast tokenizer file, or Qwen2's slow vocabulary + merges (OpenGVLab's original checkpoints ship those).
    if not (directory / "tokenizer.json").is_file() and not (
        (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file()
    ):
        missing.append("tokenizer.json (or vocab.json + merges.txt)")
    return missing


def read_config(directory):
    """`directory/config.json` as a dict; one line naming the file when it is not a JSON object."""
    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserValueError(f"{path}: cannot read it as JSON ({error})") from None
    if not isinstance(config, dict):
        raise UserValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def check_checkpoint_dir(name_or_path, parts=CHECKPOINT_PARTS):
    """Fail at once, naming the missing files, when a local checkpoint directory is incomplete.

    Without `config.json`, `from_pretrained` builds a default full-size InternVL (a 32×4096 language model) before
    it notices the weights do not fit; without the tokenizer files it asks for sentencepiece. `parts` are among
    `CHECKPOINT_PARTS`: `config` (config.json), `weights` (model.safetensors or an index and all its shards),
    `tokenizer` and `processor` (processor_config.json or preprocessor_config.json). A missing name that
    `looks_local` is an error; any other is taken for a Hub id and left to `from_pretrained`.
    """
    unknown = set(parts) - set(CHECKPOINT_PARTS)
    if unknown:
        raise ValueError(f"unknown checkpoint parts {sorted(unknown)}; expected some of {CHECKPOINT_PARTS}")
    directory = Path(name_or_path)
    if not directory.exists():
        if looks_local(name_or_path):
            raise UserFileNotFoundError(f"no such checkpoint directory: {name_or_path}{_did_you_mean(directory)}")
        return
    if not directory.is_dir():
        raise UserNotADirectoryError(f"{name_or_path} is a file; expected a checkpoint directory")
    missing = []
    if "config" in parts and not (directory / "config.json").is_file():
        missing.append("config.json")
    if "weights" in parts:
        missing += _missing_weights(directory)
    if "tokenizer" in parts:
        missing += _missing_tokenizer(directory)
    if "processor" in parts and not any(
        (directory / name).is_file() for name in ("processor_config.json", "preprocessor_config.json")
    ):
        missing.append("processor_config.json (or preprocessor_config.json)")
    if "config" in parts and not missing:
        check_model_size(read_config(directory), f"{name_or_path}/config.json")
    if missing:
        hint = ""
        if (directory / "adapter_config.json").is_file():
            hint = "; it holds LoRA adapters: load the merged model in its merged/ folder"
        raise UserFileNotFoundError(
            f"{name_or_path} is not a complete checkpoint: missing {', '.join(missing)}{hint}"
        )


def require_model(name_or_path, flag="--model"):
    """A checkpoint the loader can take, checked without loading it: a complete local directory (for a LoRA adapter
    directory, its tokenizer and processor: the loader finds the base), or a Hub id the Hub answers for."""
    path = Path(name_or_path)
    if path.exists():
        lora = (path / "adapter_config.json").is_file()
        check_checkpoint_dir(name_or_path, ("tokenizer", "processor") if lora else CHECKPOINT_PARTS)
    elif looks_local(name_or_path):
        raise UserFileNotFoundError(f"{flag} {name_or_path}: no such checkpoint directory{_did_you_mean(path)} "
                                    "(a Hub id is written owner/name)")
    else:
        require_hub(name_or_path, "model", flag)


def require_file(path, flag, image=False):
    """`path` exists, is a file and can be read (with `image`, PIL recognises it): else one line naming `flag`."""
    path_ = Path(path)
    if not path_.exists():
        raise UserFileNotFoundError(f"{flag} {path}: no such file{_did_you_mean(path_)}")
    if path_.is_dir():
        raise UserError(f"{flag} {path} is a directory; expected a file")
    try:
        with open(path_, "rb") as handle:
            handle.read(1)
    except OSError as error:
        raise UserError(f"{flag} {path}: cannot read it ({error.strerror or error})") from None
    if image:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path_) as opened:
                width, height = opened.size
        except Image.DecompressionBombError as error:
            raise UserValueError(f"{flag} {path}: {error}; at most {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels are "
                                 "taken: scale it down") from None
        except (UnidentifiedImageError, OSError) as error:
            raise UserError(f"{flag} {path}: not an image ({error})") from None
        check_image_pixels(width, height, f"{flag} {path}")


def check_image_pixels(width, height, what):
    """Refuse an image over `MAX_IMAGE_PIXELS` (from its header, before its pixels are decoded)."""
    if width * height > MAX_IMAGE_PIXELS:
        raise UserValueError(f"{what}: the image is {width}x{height} = {width * height / 1e6:,.0f} megapixels; at most "
                             f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixels are taken: scale it down")


def check_question(question, what="the question"):
    """A question is non-empty text of at most `MAX_QUESTION_CHARS` characters (what the model's positions leave
    for it is checked once it is tokenized: `mmcoconut.inference.prediction`)."""
    if not isinstance(question, str) or not question.strip():
        raise UserValueError(f"{what} is empty: type a question")
    if len(question) > MAX_QUESTION_CHARS:
        raise UserValueError(f"{what} is {len(question):,} characters long; at most {MAX_QUESTION_CHARS:,} are taken")


def thought_limit(config):
    """The most thoughts a request may ask of a checkpoint: `THOUGHTS_FACTOR` x what it was trained with
    (`latent_stage` x `c_thought`, at least `c_thought`). `config` is the checkpoint's config or its `config.json`
    as a dict."""
    get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
    c_thought = get("c_thought", 1)
    c_thought = c_thought if isinstance(c_thought, int) and c_thought > 0 else 1
    stage = get("latent_stage", 0)
    stage = stage if isinstance(stage, int) and stage > 0 else 1
    return THOUGHTS_FACTOR * stage * c_thought


def check_thought_count(count, config, what, limit=None):
    """Refuse `count` thoughts (`--num-latents`, `--max-thoughts`, the app's field) over `limit` (default:
    `thought_limit(config)`): each thought is a forward pass, so an unbounded count holds the machine for minutes."""
    if count is None:
        return
    if limit is None:
        limit = thought_limit(config)
        why = f"{THOUGHTS_FACTOR} x the {limit // THOUGHTS_FACTOR} this checkpoint was trained with"
    else:
        why = "the limit set"
    if count > limit:
        raise UserValueError(f"{what} {count}: at most {limit} thoughts are taken ({why})")


def require_dir(path, flag):
    """`path` exists and is a directory: else one line naming `flag`."""
    path_ = Path(path)
    if not path_.exists():
        raise UserFileNotFoundError(f"{flag} {path}: no such directory{_did_you_mean(path_)}")
    if not path_.is_dir():
        raise UserNotADirectoryError(f"{flag} {path} is a file; expected a directory")


def require_extra(module, what, note=""):
    """`module` is installed, else one line: what needs it and the pip command (`EXTRAS`) that installs it."""
    if importlib.util.find_spec(module) is None:
        extra = EXTRAS.get(module)
        install = f"pip install 'mmcoconut[{extra}]'" if extra else f"pip install {module}"
        raise MissingExtraError(f"{what} needs {module}, which is not installed: {install}{note}", name=module)


def require_quantization(name):
    """The package a `--quantization` choice needs is installed (that bitsandbytes also needs a CUDA GPU is checked
    where torch is imported: `mmcoconut.inference.loading.quantization_config`)."""
    if name in QUANTIZATION_MODULES:
        note = " (CUDA only; on CPU use --quantization torchao-int8)" if name.startswith("bnb") else ""
        require_extra(QUANTIZATION_MODULES[name], f"--quantization {name}", note)


def chromium_binary():
    """The path of a headless-capable Chromium (Debian's `chromium`), or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


__all__ = [
    "HUB_PROBE_TIMEOUT_S", "CHECKPOINT_PARTS", "EXTRAS", "QUANTIZATION_MODULES", "MAX_PARAMETERS", "looks_local",
    "require_hub", "estimate_parameters", "machine_memory_bytes", "check_model_size", "read_config",
    "check_checkpoint_dir", "require_model", "require_file", "check_image_pixels", "check_question", "thought_limit",
    "check_thought_count", "require_dir", "require_extra", "require_quantization",
    "chromium_binary",
]
