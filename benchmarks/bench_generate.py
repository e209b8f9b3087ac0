"""Greedy generation of MMCoconut against its floor and the original Coconut decoding.

    python -m benchmarks.bench_generate --out outputs/bench_generate.json

Same prompts (`<img>…</img> question <|start-latent|> <|latent|>×n <|end-latent|>`), greedy, EOS off so
every side generates exactly `--new-tokens` tokens per prompt:
- ours: `MMCoconutForConditionalGeneration.generate`, batched, latents filled during prefill, KV cache;
- floor: `InternVLForConditionalGeneration.generate` on the same left-padded batch, latents as ordinary
  tokens, KV cache — plain generation with no thoughts;
- original: the original Coconut decoding (`benchmarks/original_coconut.py`), one prompt at a time, the
  whole sequence recomputed (full logits, no cache) for every new token.
The original is slow, so `--baseline-new-tokens k` times its first k tokens and extrapolates to
`--new-tokens`: time = prefill (first token) + (new_tokens - 1) × mean time of its later tokens. Its
per-token cost grows with the sequence, so the extrapolation slightly flatters the original.
"""

import argparse
import time

import torch

from benchmarks.cli import add_common_args
from benchmarks.common import (
    LATENT_ID,
    build_setup,
    collate_prompts,
    describe,
    format_table,
    make_samples,
    median,
    shape_summary,
    synchronize,
    time_runs,
    write_json,
)
from benchmarks.original_coconut import original_coconut_generate
from mmcoconut.cli.help import DefaultsHelpFormatter


def build_parser():
    """The benchmark's flags."""
    parser = add_common_args(
        argparse.ArgumentParser(
            description=__doc__.split("\n")[0], formatter_class=DefaultsHelpFormatter
        )
    )
    parser.add_argument("--new-tokens", type=int, default=64, help="new tokens per prompt")
    parser.add_argument("--baseline-new-tokens", type=int, default=8,
                        help="tokens per prompt timed for the original decoding (extrapolated to --new-tokens)")
    return parser


TARGETS = {
    "tokens_per_s_ours_over_original": (">=", 20.0),
    "time_ours_over_floor": ("<=", 1.2),
}


def generate_functions(setup, prompts, max_new_tokens):
    """Ours and the floor: functions returning the `(batch, new_tokens)` generated ids."""
    model, internvl = setup.model, setup.internvl
    width = prompts["input_ids"].shape[1]
    common = dict(input_ids=prompts["input_ids"], attention_mask=prompts["attention_mask"],
                  pixel_values=prompts["pixel_values"], max_new_tokens=max_new_tokens, do_sample=False)
    return {
        "ours": lambda: model.generate(**common, num_tiles=prompts["num_tiles"])[:, width:],
        "floor": lambda: internvl.generate(**common)[:, width:],
    }


def original_generate_all(setup, samples, new_tokens):
    """The original decoding of each prompt in turn: `(tokens per prompt, prefill s, later-token s, count)`.

    Each `.item()` in the loop synchronises the device, so the timestamps are exact.
    """
    all_tokens, prefill, later, later_count = [], 0.0, 0.0, 0
    for sample in samples:
        input_ids = torch.tensor([sample.prompt], device=setup.device)
        pixels = None if sample.pixel_values is None else sample.pixel_values.to(setup.device, setup.dtype)
        stamps = []
        synchronize(setup.device)
        start = time.perf_counter()
        tokens = original_coconut_generate(setup.internvl, input_ids, LATENT_ID, new_tokens, pixel_values=pixels,
                                           timestamps=stamps)
        prefill += stamps[0] - start
        later += stamps[-1] - stamps[0]
        later_count += len(stamps) - 1
        all_tokens.append(tokens)
    return all_tokens, prefill, later, later_count


def run(args) -> dict:
    lowest = 1 if args.new_tokens == 1 else 2  # extrapolating needs at least one later token
    if not lowest <= args.baseline_new_tokens <= args.new_tokens:
        raise ValueError(f"--baseline-new-tokens must be in [{lowest}, --new-tokens={args.new_tokens}], "
                         f"got {args.baseline_new_tokens}")
    setup = build_setup(args)
    setup.model.eval()
    samples = make_samples(args, setup)
    prompts = collate_prompts(samples, setup)
    batch, n = len(samples), args.new_tokens

    results, generated = {}, {}
    with torch.no_grad():
        for name, fn in generate_functions(setup, prompts, n).items():
            outputs = []
            times = time_runs(lambda: outputs.append(fn()), args.repeats, args.warmup, setup.device)
            tokens = outputs[-1]
            if tokens.shape != (batch, n):
                raise RuntimeError(f"{name} generated {tuple(tokens.shape)} tokens, expected {(batch, n)}")
            generated[name] = tokens.tolist()
            t = median(times)
            results[name] = dict(time_s=t, times_s=times, new_tokens=batch * n, tokens_per_s=batch * n / t)

        k = args.baseline_new_tokens
        runs = [original_generate_all(setup, samples, k) for _ in range(args.baseline_repeats)]
    extrapolated = []
    for tokens, prefill, later, later_count in runs:
        if any(len(t) != k for t in tokens):
            raise RuntimeError(f"the original decoding stopped early: {[len(t) for t in tokens]} tokens, expected {k}")
        per_token = later / later_count if later_count else 0.0  # no later tokens only when n == k == 1
        extrapolated.append(prefill + batch * (n - 1) * per_token)
    t = median(extrapolated)
    original_tokens = runs[-1][0]
    results["original"] = dict(
        time_s=t, times_s=extrapolated, new_tokens=batch * n, tokens_per_s=batch * n / t,
        timed_new_tokens=k, extrapolated=k < n,
        prefill_s=median([r[1] for r in runs]),
        later_token_s=median([r[2] / r[3] for r in runs]) if k > 1 else None,
    )
    agree = sum(ours[:k] == orig for ours, orig in zip(generated["ours"], original_tokens))
    ratios = {
        "tokens_per_s_ours_over_original": results["ours"]["tokens_per_s"] / results["original"]["tokens_per_s"],
        "time_ours_over_floor": results["ours"]["time_s"] / results["floor"]["time_s"],
        "tokens_per_s_floor_over_original": results["floor"]["tokens_per_s"] / results["original"]["tokens_per_s"],
    }
    return dict(
        benchmark="generate",
        shape=shape_summary(args, setup),
        new_tokens=n,
        prompt_width=prompts["input_ids"].shape[1],
        results=results,
        prompts_where_ours_equals_original=agree,
        tokens=dict(ours=generated["ours"], original=original_tokens, floor=generated["floor"]),
        ratios=ratios,
        targets={key: dict(op=op, value=v, met=v <= ratios[key] if op == ">=" else ratios[key] <= v)
                 for key, (op, v) in TARGETS.items()},
    )


def report(payload: dict) -> str:
    results, ratios = payload["results"], payload["ratios"]
    ours = results["ours"]
    rows = []
    for name, r in results.items():
        label = name
        if r.get("extrapolated"):
            label += f" (timed {r['timed_new_tokens']} tokens/prompt, extrapolated)"
        rows.append([label, r["new_tokens"], f"{r['time_s']:.2f}", f"{r['tokens_per_s']:.1f}",
                     f"{r['tokens_per_s'] / ours['tokens_per_s']:.3f}×"])
    table = format_table(["generation", "new tokens", "time (s)", "tokens/s", "tokens/s vs ours"], rows)
    original = results["original"]
    batch = payload["shape"]["batch_size"]
    lines = [
        f"Greedy generation, {payload['new_tokens']} new tokens per prompt, EOS off — {describe(payload['shape'])}.",
        f"Prompt width {payload['prompt_width']} columns (left-padded batch; the original runs each prompt alone).",
        "",
        table,
        "",
    ]
    if original["extrapolated"]:
        lines.append(
            f"original: timed {original['timed_new_tokens']} of {payload['new_tokens']} tokens per prompt; "
            f"time = prefill ({original['prefill_s']:.2f} s for {batch} prompts) + {payload['new_tokens'] - 1} × "
            f"{original['later_token_s']:.3f} s per later token × {batch} prompts. Later tokens cost more as the "
            "sequence grows, so this overstates the original's tokens/s."
        )
    lines.append(f"greedy tokens of ours equal the original's (first {original['timed_new_tokens']}) for "
                 f"{payload['prompts_where_ours_equals_original']}/{batch} prompts")
    for key, target in payload["targets"].items():
        mark = "met" if target["met"] else "MISSED"
        lines.append(f"{key} = {ratios[key]:.2f} (target {target['op']} {target['value']}: {mark})")
    return "\n".join(lines)


def main(argv=None) -> dict:
    """Parse flags, run the benchmark, print the table, write the JSON (`--out`); returns the payload."""
    args = build_parser().parse_args(argv)
    payload = run(args)
    print(report(payload))
    write_json(args.out, payload)
    return payload


__all__ = ["generate_functions", "main", "original_generate_all", "report", "run"]

if __name__ == "__main__":
    main()
