"""Side-by-side benchmarks: `python -m benchmarks.bench_train_step`, `python -m benchmarks.bench_generate`."""
