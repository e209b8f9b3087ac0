"""Quantized inference against the unquantized model: peak memory, speed and answer agreement, side by side.

    python -m benchmarks.bench_quantization --model outputs/demo \\
        --data-file outputs/demo/data/canonical/val.jsonl --limit 16 --out outputs/bench_quantization.json

Every variant (`--quantizations`, default `none` and `torchao-int8`, plus `bnb-8bit` and `bnb-4bit` where CUDA is
present) loads the checkpoint with `load` and answers the same questions with `predict` (greedy,
the checkpoint's latent span), each in its own process so that one variant's memory is not another's. Reported per
variant: weight bytes (parameters + buffers as stored), memory after loading, the peak while loading and the peak
while answering (`MEMORY_NOTE`), time per question, and agreement with `none` — the share of questions with the same
generated text and with the same `Answer:` line.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import _proc_status_bytes, format_table, peak_memory_bytes, write_json
from mmcoconut.cli.help import DefaultsHelpFormatter

MEMORY_NOTE = {
    "cpu": "RSS after loading and the peak RSS (VmHWM) while loading, both above the RSS before loading; the peak "
           "while answering is above the RSS of the loaded model (glibc's mmap threshold pinned, benchmarks.common)",
    "cuda": "torch.cuda.memory_allocated after loading; max_memory_allocated while loading (above the allocation "
            "before) and while answering (above the loaded model)",
}
DEFAULT_QUANTIZATIONS = ("none", "torchao-int8") + (("bnb-8bit", "bnb-4bit") if torch.cuda.is_available() else ())


def _weight_bytes(model):
    tensors = list(model.parameters()) + list(model.buffers())
    total = 0
    for tensor in tensors:
        # torchao's quantized weights are tensor subclasses; their inner tensors hold the stored bytes.
        inner = [getattr(tensor, name) for name in getattr(tensor, "__tensor_flatten__", lambda: ([], None))()[0]]
        total += sum(t.numel() * t.element_size() for t in inner) if inner else tensor.numel() * tensor.element_size()
    return total


def _resident_bytes(device):
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _proc_status_bytes("VmRSS")


def run_variant(args, quantization):
    """Load + answer every question under `quantization`, in this process: a JSON-serialisable dict."""
    from mmcoconut.data.aokvqa import load_canonical
    from mmcoconut.inference.loading import load as load_checkpoint
    from mmcoconut.inference.loading import quantization_config
    from mmcoconut.inference.prediction import predict

    records = load_canonical(args.data_file)[: args.limit]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    state = {}

    def load():
        state["model"], state["processor"] = load_checkpoint(args.model, quantization, args.dtype, str(device))

    def answer():
        start = time.perf_counter()
        state["answers"] = [
            # The canonical question already holds its rendered choices; the answer is the `Answer:` line.
            predict(state["model"], state["processor"], record.get("image"), record["question"],
                            max_new_tokens=args.max_new_tokens)
            for record in records
        ]
        state["seconds"] = time.perf_counter() - start

    # The quantization library is imported before the baseline: its code is not the model's memory.
    quantization_config(quantization)
    before = _resident_bytes(device)
    load_peak = peak_memory_bytes(load, device)
    resident = _resident_bytes(device) - before
    answer_peak = peak_memory_bytes(answer, device)  # above the loaded model
    return {
        "quantization": quantization,
        "weight_bytes": _weight_bytes(state["model"]),
        "resident_after_load_bytes": resident,
        "load_peak_bytes": load_peak,
        "answer_peak_bytes": answer_peak,
        "seconds_per_question": state["seconds"] / len(records),
        "generated_texts": [answer.generated_text for answer in state["answers"]],
        "answers": [answer.answer for answer in state["answers"]],
    }


def compare(results):
    """Table rows, agreement measured against the first variant (`none`)."""
    reference = results[0]
    rows = []
    for result in results:
        pairs = list(zip(result["generated_texts"], reference["generated_texts"]))
        same_text = sum(a == b for a, b in pairs) / len(pairs)
        same_answer = sum(a == b for a, b in zip(result["answers"], reference["answers"])) / len(pairs)
        result["agreement_text"], result["agreement_answer"] = same_text, same_answer
        rows.append([
            result["quantization"], *(f"{result[key] / 2**20:.1f}" for key in (
                "weight_bytes", "resident_after_load_bytes", "load_peak_bytes", "answer_peak_bytes")),
            f"{result['seconds_per_question']:.3f}", f"{100 * same_text:.1f}%", f"{100 * same_answer:.1f}%",
        ])
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--model", default="outputs/demo", help="checkpoint directory")
    parser.add_argument("--data-file", default="outputs/demo/data/canonical/val.jsonl",
                        help="canonical records to answer")
    parser.add_argument("--limit", type=int, default=16, help="questions per variant")
    parser.add_argument("--quantizations", nargs="+", default=list(DEFAULT_QUANTIZATIONS), help="variants to compare")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="(default: the checkpoint's)")
    parser.add_argument("--dtype", default="auto", help="load dtype")
    parser.add_argument("--device", default=None, help="(default: cuda when available, else cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per variant process "
                        "(default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one variant, in a child process
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print("RESULT " + json.dumps(run_variant(args, args.worker)))
        return None
    if args.quantizations[0] != "none":
        parser.error("the first of --quantizations is the reference and must be none")

    results = []
    for quantization in args.quantizations:
        child = argv if argv is not None else sys.argv[1:]  # a worker writes no --out
        command = [sys.executable, "-m", "benchmarks.bench_quantization", *child, "--worker", quantization]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"variant {quantization} failed:\n{done.stderr[-3000:]}")
        line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
        results.append(json.loads(line[len("RESULT "):]))
    rows = compare(results)
    device = "cuda" if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda") else "cpu"
    print(f"{args.model}: {len(results[0]['answers'])} questions from {args.data_file}, greedy, {device}; memory: "
          f"{MEMORY_NOTE[device]}")
    print(format_table(["quantization", "weights (MiB)", "after load (MiB)", "load peak (MiB)",
                        "answering peak (MiB)", "s / question",
                        "same text as none", "same answer as none"], rows))
    write_json(args.out, {"model": args.model, "data_file": args.data_file, "results": results})
    return results


if __name__ == "__main__":
    main()
