"""Names and defaults the command-line tools offer, in one torch-free module, so `--help` answers at once.

The modules that act on these values import them from here; nothing keeps a copy.
"""

# Evaluation modes (`evaluate_aokvqa.py --mode`) and their default generation budgets.
EVAL_MODES = ("vanilla", "cot", "coconut")
DEFAULT_MAX_NEW_TOKENS = {"vanilla": 32, "cot": 256, "coconut": 256}

# Where records come from (`data_source`, `evaluate_aokvqa.py`'s data flags).
HF_AOKVQA_ID = "HuggingFaceM4/A-OKVQA"
RECORD_SOURCES = ("aokvqa_hf", "aokvqa_official", "canonical")
DATA_SOURCES = (*RECORD_SOURCES, "synthetic")  # train.py also generates the synthetic demo task
STEPS_FROM = ("rationales", "first_rationale_sentences")
CHOICE_LETTERS = "ABCD"

# <IMG_CONTEXT> in the Qwen2.5 vocabulary InternVL3 uses (original-format checkpoints without a tokenizer).
QWEN_IMAGE_CONTEXT_TOKEN_ID = 151667

# Tokenizers train.py can build for a tiny model.
TOKENIZERS = ("internvl", "task")

# `from_pretrained(dtype=...)` takes these names as strings; "auto" keeps the checkpoint's dtype.
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
# `torchao-int8`: int8 weight-only (torchao through transformers' TorchAoConfig), runs on CPU and GPU.
# `bnb-8bit` / `bnb-4bit`: bitsandbytes LLM.int8() / NF4, CUDA only.
QUANTIZATIONS = ("none", "torchao-int8", "bnb-8bit", "bnb-4bit")

# `generate(thinking=...)`. modeling_mmcoconut.THINKING_MODES is the model's own copy: that file travels to the Hub
# as remote code and may import nothing of this package (tests/test_cli.py keeps the two equal).
THINKING_MODES = ("fixed", "adaptive")

# Bounds on one request (predict, the app, evaluation's flags): every request ends in bounded time and memory.
# Thoughts: at most THOUGHTS_FACTOR times what the checkpoint was trained with (latent_stage x c_thought, at least
# c_thought). A question: at most MAX_QUESTION_CHARS characters (and what the model's positions leave, checked
# once tokenized). An image: at most MAX_IMAGE_PIXELS pixels (50 megapixels; phones take 12-50 by default).
THOUGHTS_FACTOR = 4
MAX_QUESTION_CHARS = 10_000
MAX_IMAGE_PIXELS = 50_000_000
# The web demo answers one request at a time, with at most APP_QUEUE_SIZE waiting, each at most APP_TIME_LIMIT_S.
APP_QUEUE_SIZE = 20
APP_TIME_LIMIT_S = 60.0

# The recipe's `thought_supervision`: none, or each continuous thought decodes the written step it replaced.
THOUGHT_SUPERVISION = ("none", "step")

__all__ = [
    "THOUGHTS_FACTOR", "MAX_QUESTION_CHARS", "MAX_IMAGE_PIXELS", "APP_QUEUE_SIZE", "APP_TIME_LIMIT_S", "EVAL_MODES", "DEFAULT_MAX_NEW_TOKENS", "HF_AOKVQA_ID", "RECORD_SOURCES", "DATA_SOURCES", "STEPS_FROM",
    "CHOICE_LETTERS", "QWEN_IMAGE_CONTEXT_TOKEN_ID", "TOKENIZERS", "DTYPE_NAMES", "QUANTIZATIONS", "THINKING_MODES",
    "THOUGHT_SUPERVISION",
]
