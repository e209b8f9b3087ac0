"""One command for a GPU: InternVL3-1B-sized training and evaluation speed, memory, ZeRO-3 and FSDP2, in minutes.

    make gpu-check                      # = python -m benchmarks.gpu_check --out outputs/gpu_check.json
    python -m benchmarks.gpu_check --size toy --device cpu --parts train,eval,fsdp2   # what the fast suite runs

On one GPU (`--size auto` = `real` there) it builds a random InternVL3-1B-shaped model from config, the real sizes
(InternVL3-1B's published config: Qwen2 0.5B text model, 24 x 896; InternViT-300M, 24 x 1024; vocabulary 151,674 +
the three latent tokens; 256 tokens per 448-px tile), in bf16 with SDPA (flash-attention 2 when `flash_attn` is
installed), and prints side by side:
- train: a training step (forward + backward) of ours against the floor (one pass of the plain InternVL with the
  latents as ordinary token embeddings), time and peak memory, at 8 tiles + 6 latents, batch 4
  (`benchmarks.bench_train_step`'s two sides on `benchmarks.common`'s batches);
- eval: batched greedy generation of 64 A-OKVQA-shaped questions (ours and the floor): tokens/s and questions/s;
- zero3: one DeepSpeed ZeRO-3 engine step (forward, backward, AdamW step) with ds_configs/zero3.json on the one
  device (needs the `deepspeed` extra);
- fsdp2: one FSDP2 (`fully_shard` per decoder / vision layer, as ds_configs/accelerate_fsdp.yaml) step.
and writes everything as JSON (`--out`). On CPU (`--size auto` = `toy` there) the same code runs at toy size, so
the fast test suite keeps it working; toy numbers say nothing about speed.
"""

import argparse
import importlib.util
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.bench_generate import generate_functions
from benchmarks.bench_train_step import loss_functions
from benchmarks.cli import add_common_args
from benchmarks.common import (
    END_LATENT_ID,
    LATENT_ID,
    MEMORY_METHOD,
    PAD_ID,
    START_LATENT_ID,
    VOCAB_SIZE,
    Setup,
    build_setup,
    collate_prompts,
    collate_train,
    describe,
    format_table,
    make_samples,
    median,
    peak_memory_bytes,
    resolve_device,
    shape_summary,
    time_runs,
    write_json,
)
from mmcoconut.cli.help import DefaultsHelpFormatter

PARTS = ("train", "eval", "zero3", "fsdp2")
REPO = Path(__file__).resolve().parents[1]

# InternVL3-1B-Pretrained's published config.json, the fields that shape the model (tests/test_conversion.py
# checks the full published config maps to 938,193,024 parameters, as this one does).
INTERNVL3_1B = {
    "model_type": "internvl_chat", "downsample_ratio": 0.5, "force_image_size": 448, "ps_version": "v2",
    "select_layer": -1, "template": "internvl2_5", "tie_word_embeddings": False,
    "llm_config": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151674,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "bos_token_id": 151643,
        "eos_token_id": 151643, "tie_word_embeddings": False,
    },
    "vision_config": {
        "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": 1024,
        "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24, "image_size": 448,
        "patch_size": 14, "qkv_bias": True, "qk_normalization": False, "norm_type": "layer_norm",
        "layer_norm_eps": 1e-06, "drop_path_rate": 0.0, "initializer_factor": 0.1,
    },
}  # fmt: skip

# --size toy: the fast test's shape (tests/test_benchmarks.py's TINY): the real vocabulary, 56-px tiles.
TOY = dict(layers=1, hidden_size=32, heads=2, kv_heads=1, intermediate_size=64, vision_hidden_size=32,
           vision_layers=1, image_size=56)


def build_parser():
    """The check's flags."""
    parser = add_common_args(
        argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=DefaultsHelpFormatter)
    )
    parser.add_argument("--size", choices=("auto", "real", "toy"), default="auto",
                        help="real: InternVL3-1B's shape (the model-shape flags are ignored); toy: a tiny model; "
                             "auto: real on CUDA, toy on CPU")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--attn", choices=("auto", "sdpa", "flash_attention_2"), default="auto",
                        help="auto: flash_attention_2 on CUDA when flash_attn is installed, else sdpa")
    parser.add_argument("--eval-questions", type=int, default=64, help="questions generated in the eval part")
    parser.add_argument("--eval-batch-size", type=int, default=16, help="questions per generate call")
    parser.add_argument("--new-tokens", type=int, default=32, help="new tokens per question (EOS off)")
    parser.add_argument("--zero3-config", type=Path, default=REPO / "ds_configs" / "zero3.json",
                        help="DeepSpeed config of the zero3 part ('auto' values are filled in)")
    # The shape: 8 tiles + 6 latents, batch 4; A-OKVQA-sized question (with its 4 choices) and rationale.
    parser.set_defaults(tiles=8, latents=6, batch_size=4, question_tokens=40, answer_tokens=60, repeats=3,
                        warmup=1)
    return parser


def real_internvl_config():
    """InternVL3-1B's `InternVLConfig` (native format), with the three latent tokens' rows in the vocabulary."""
    from mmcoconut.conversion import internvl_chat_config_to_hf

    config = internvl_chat_config_to_hf(INTERNVL3_1B)
    config.text_config.vocab_size = VOCAB_SIZE
    return config


def build_real_setup(args, attn_implementation, build_device=None) -> Setup:
    """`benchmarks.common.build_setup` for InternVL3-1B's real configuration (which `tiny_internvl_config` cannot
    express: InternViT's 16 heads and 4096-wide MLP), built directly in the device's dtype on the device
    (`build_device="meta"` builds it without memory, to count parameters)."""
    from configuration_mmcoconut import MMCoconutConfig
    from modeling_mmcoconut import MMCoconutForConditionalGeneration

    device, dtype = resolve_device(args.device)
    mm_config = MMCoconutConfig(real_internvl_config(), latent_token_id=LATENT_ID, start_latent_id=START_LATENT_ID,
                                end_latent_id=END_LATENT_ID)
    torch.manual_seed(args.seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(build_device or device):
            model = MMCoconutForConditionalGeneration(mm_config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.set_attn_implementation(attn_implementation)
    for generation_config in (model.generation_config, model.internvl.generation_config):
        generation_config.eos_token_id = None
        generation_config.pad_token_id = PAD_ID
    return Setup(model=model, device=device, dtype=dtype)


def make_setup(args):
    if args.size == "real":
        return build_real_setup(args, args.attn)
    for name, value in TOY.items():
        setattr(args, name, value)
    setup = build_setup(args)
    if args.attn != "sdpa":
        setup.model.set_attn_implementation(args.attn)
    return setup


def resolve_args(args):
    device, _ = resolve_device(args.device)
    args.device = device.type
    if args.size == "auto":
        args.size = "real" if device.type == "cuda" else "toy"
    if args.attn == "auto":
        has_flash = importlib.util.find_spec("flash_attn") is not None
        args.attn = "flash_attention_2" if device.type == "cuda" and has_flash else "sdpa"
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"--parts: unknown {sorted(unknown)}; choose from {', '.join(PARTS)}")
    return args


def _step_fn(loss_fn, optimizer_step=None):
    def step():
        loss = loss_fn()
        loss.backward()
        if optimizer_step is not None:
            optimizer_step()
        return loss
    return step


def train_part(args, setup, batch):
    """Ours and the floor, forward + backward, as bench_train_step times them."""
    setup.model.train()
    functions = loss_functions(setup, batch)
    zero_grad = lambda: setup.model.zero_grad(set_to_none=True)  # noqa: E731
    results = {}
    for name in ("ours", "floor"):
        losses = []
        times = time_runs(lambda: losses.append(_step_fn(functions[name])().item()), args.repeats, args.warmup,
                          setup.device, before=zero_grad)
        results[name] = dict(time_s=median(times), times_s=times, loss=losses[-1])
    for name in ("ours", "floor"):  # memory after all timing (on CPU it changes malloc's behaviour)
        zero_grad()
        results[name]["peak_memory_bytes"] = peak_memory_bytes(_step_fn(functions[name]), setup.device)
    zero_grad()
    return results


def eval_part(args, setup):
    """Greedy generation of `--eval-questions` questions in batches of `--eval-batch-size`, ours and the floor."""
    setup.model.eval()
    question_args = argparse.Namespace(**{**vars(args), "batch_size": args.eval_questions})
    samples = make_samples(question_args, setup, seed=args.seed + 1)
    batches = [collate_prompts(samples[i:i + args.eval_batch_size], setup)
               for i in range(0, len(samples), args.eval_batch_size)]
    results = {}
    with torch.no_grad():
        for name in ("ours", "floor"):
            counts = []

            def run_all():
                counts.clear()
                for prompts in batches:
                    counts.append(generate_functions(setup, prompts, args.new_tokens)[name]().numel())

            times = time_runs(run_all, max(1, args.repeats - 1), min(args.warmup, 1), setup.device)
            seconds, tokens = median(times), sum(counts)
            if tokens != args.eval_questions * args.new_tokens:
                raise RuntimeError(f"eval {name}: generated {tokens} tokens, expected "
                                   f"{args.eval_questions} x {args.new_tokens}")
            results[name] = dict(time_s=seconds, times_s=times, new_tokens=tokens, tokens_per_s=tokens / seconds,
                                 questions_per_s=args.eval_questions / seconds)
    return results


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single_process_group(device):
    """A process group of one (nccl on CUDA, gloo on CPU), as a launcher's environment would describe it."""
    if dist.is_initialized():
        return
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": os.environ.get("MASTER_PORT") or str(_free_port())})
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def zero3_part(args, make, batch_size):
    """One DeepSpeed ZeRO-3 engine step: the project's zero3.json with its "auto" values filled as the Trainer does."""
    import deepspeed

    setup = make()
    config = json.loads(Path(args.zero3_config).read_text())
    bf16 = setup.dtype == torch.bfloat16
    config.update(train_micro_batch_size_per_gpu=batch_size, gradient_accumulation_steps=1,
                  train_batch_size=batch_size, gradient_clipping=1.0, zero_allow_untested_optimizer=True)
    config["bf16"], config["fp16"] = {"enabled": bf16}, {"enabled": False}
    init_single_process_group(setup.device)
    optimizer = torch.optim.AdamW(setup.model.parameters(), lr=1e-5)
    engine, *_ = deepspeed.initialize(model=setup.model, optimizer=optimizer, config=config)
    batch = collate_train(make_samples(args, setup), setup)

    def step():
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        return loss

    losses = []
    times = time_runs(lambda: losses.append(step().item()), args.repeats, args.warmup, setup.device)
    memory = peak_memory_bytes(step, setup.device)
    result = dict(time_s=median(times), times_s=times, loss=losses[-1], peak_memory_bytes=memory,
                  zero_stage=engine.zero_optimization_stage())
    engine.destroy()
    return result


def fsdp2_part(args, make):
    """One FSDP2 step: `fully_shard` on every `_no_split_modules` layer and the root, AdamW."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    setup = make()
    init_single_process_group(setup.device)
    mesh = init_device_mesh(setup.device.type, (1,))
    model = setup.model
    units = [module for module in model.modules() if type(module).__name__ in model._no_split_modules]
    for module in units:
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batch = collate_train(make_samples(args, setup), setup)

    def optimizer_step():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step = _step_fn(lambda: model(**batch).loss, optimizer_step)
    losses = []
    times = time_runs(lambda: losses.append(step().item()), args.repeats, args.warmup, setup.device)
    memory = peak_memory_bytes(step, setup.device)
    return dict(time_s=median(times), times_s=times, loss=losses[-1], peak_memory_bytes=memory,
                sharded_modules=len(units))


def _free(setup):
    del setup
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(args) -> dict:
    args = resolve_args(args)
    started = time.perf_counter()
    setup = make_setup(args)
    shape = shape_summary(args, setup)
    shape.update(size=args.size, attn_implementation=args.attn)
    payload = dict(benchmark="gpu_check", shape=shape, parts=args.parts, memory_method=MEMORY_METHOD[setup.device.type],
                   results={})
    results = payload["results"]
    if "train" in args.parts:
        batch = collate_train(make_samples(args, setup), setup)
        payload["sequence"] = dict(width=batch["input_ids"].shape[1], real_tokens=int(batch["attention_mask"].sum()))
        results["train"] = train_part(args, setup, batch)
        del batch
    if "eval" in args.parts:
        results["eval"] = eval_part(args, setup)
    _free(setup)
    setup = None
    make = lambda: make_setup(args)  # noqa: E731  (a fresh model: the engines take over their parameters)
    if "zero3" in args.parts:
        results["zero3"] = zero3_part(args, make, args.batch_size)
    if "fsdp2" in args.parts:
        results["fsdp2"] = fsdp2_part(args, make)
    if dist.is_initialized():
        dist.destroy_process_group()
    if "train" in results:
        ours, floor = results["train"]["ours"], results["train"]["floor"]
        payload["ratios"] = dict(time_ours_over_floor=ours["time_s"] / floor["time_s"],
                                 memory_ours_over_floor=ours["peak_memory_bytes"] / floor["peak_memory_bytes"])
    payload["wall_s"] = time.perf_counter() - started
    return payload


def _mib(value):
    return f"{value / 2**20:,.0f}"


def report(payload: dict) -> str:
    results, shape = payload["results"], payload["shape"]
    # describe() also names the original Coconut algorithm's repeats, which this check does not run.
    header = describe(shape).replace(f" (original: {shape['baseline_repeats']} run)", "")
    lines = [f"gpu_check ({shape['size']} size) — {header}.", f"Peak memory: {payload['memory_method']}.", ""]
    rows = []
    train = results.get("train", {})
    for name in ("ours", "floor"):
        if name in train:
            r = train[name]
            rows.append([f"training step, {name}" + (" (one pass, latents as embeddings)" if name == "floor" else ""),
                         f"{r['time_s']:.3f}", _mib(r["peak_memory_bytes"]), f"{r['loss']:.4f}"])
    for name in ("zero3", "fsdp2"):
        if name in results:
            r = results[name]
            label = "ZeRO-3 engine step (+AdamW)" if name == "zero3" else "FSDP2 step (+AdamW)"
            rows.append([label, f"{r['time_s']:.3f}", _mib(r["peak_memory_bytes"]), f"{r['loss']:.4f}"])
    if rows:
        lines += [format_table(["step", "time (s)", "peak memory (MiB)", "loss"], rows), ""]
    if "ratios" in payload:
        ratios = payload["ratios"]
        lines.append(f"ours / floor: time {ratios['time_ours_over_floor']:.2f}x, memory "
                     f"{ratios['memory_ours_over_floor']:.2f}x")
    if "eval" in results:
        rows = [[name, r["new_tokens"], f"{r['time_s']:.2f}", f"{r['tokens_per_s']:.1f}", f"{r['questions_per_s']:.2f}"]
                for name, r in results["eval"].items()]
        lines += ["", format_table(["batched evaluation", "new tokens", "time (s)", "tokens/s", "questions/s"], rows)]
    lines.append(f"wall time {payload['wall_s']:.0f} s")
    return "\n".join(lines)


def main(argv=None) -> dict:
    """Parse flags, run the parts, print the tables, write the JSON (`--out`); returns the payload."""
    args = build_parser().parse_args(argv)
    payload = run(args)
    print(report(payload))
    write_json(args.out, payload)
    return payload


__all__ = ["INTERNVL3_1B", "PARTS", "build_real_setup", "main", "real_internvl_config", "report", "run"]

if __name__ == "__main__":
    main(sys.argv[1:])
