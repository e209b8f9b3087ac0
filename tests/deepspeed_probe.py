"""`train.py`, watched from inside every rank: what the DeepSpeed tests (tests/test_deepspeed.py) cannot see from outside.

    accelerate launch --config_file ds_configs/accelerate_zero3.yaml --num_processes 2 \
        tests/deepspeed_probe.py recipes/tiny.yaml --max_steps 6 ...   (the same arguments as train.py)

Runs `train.main(argv)` unchanged, with one more callback on the `CurriculumTrainer` that writes
`$MMCOCONUT_PROBE_DIR/rank{R}.json` on every rank at the end of training:
- `optimizer_chain`: the class names from `trainer.optimizer` down through each `.optimizer` attribute;
- `epochs`: at each epoch start (after the curriculum callback has run), the innermost torch optimizer's state:
  how many parameter states it holds and the largest |exp_avg| and |exp_avg_sq| in them;
- `steps`: after each optimizer step, the learning rate and the Adam step counts held in that state;
- `partition` (ZeRO-3): after each step, summed over parameters, the full size (`ds_numel`), the size of this
  rank's shards (`ds_tensor`) and what is materialised in `param.data` outside a forward; the parameters held
  whole on this rank (persistent or gathered); a checksum of this rank's shards;
- `evaluations`: per evaluation, the language-model forward calls this rank ran (loss pass and generation);
- `initial_weights`: per parameter, the sum and standard deviation of the whole tensor when training starts;
- `log_history`: the Trainer's logs at full precision.
The observation reads DeepSpeed's and torch's objects directly, not the project's helpers, so a helper that
silently does nothing is caught.
"""

import json
import os
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

import trainer_curriculum
from mmcoconut.cli import train as train_command


def _torch_optimizers(optimizer):
    """Every object in the `.optimizer` chain; the innermost torch optimizer (DeepSpeed's base optimizer)."""
    chain, inner = [], None
    while optimizer is not None and len(chain) < 8:
        chain.append(type(optimizer).__module__ + "." + type(optimizer).__qualname__)
        if isinstance(optimizer, torch.optim.Optimizer) and type(optimizer).__module__.startswith("torch.optim"):
            inner = optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return chain, inner


def _moments(inner):
    states = [s for s in inner.state.values() if s]
    max_of = lambda key: max((float(s[key].abs().max()) for s in states if key in s), default=0.0)  # noqa: E731
    return {
        "num_states": len(states),
        "max_abs_exp_avg": max_of("exp_avg"),
        "max_abs_exp_avg_sq": max_of("exp_avg_sq"),
        "adam_steps": sorted({float(s["step"]) for s in states if "step" in s}),
    }


def _partition(module):
    params = list(module.named_parameters())
    if not all(hasattr(p, "ds_tensor") for _, p in params):
        return None
    return {
        "num_params": len(params),
        "full_numel": sum(int(p.ds_numel) for _, p in params),
        "local_numel": sum(int(p.ds_tensor.numel()) for _, p in params),
        "materialised_numel": sum(int(p.data.numel()) for _, p in params),
        # Whole on this rank between steps: persistent (below stage3_param_persistence_threshold) or gathered.
        "params_whole_here": [n for n, p in params if getattr(p, "ds_persist", False) or p.data.numel() >= p.ds_numel],
        "largest": max(((n, int(p.ds_numel), int(p.ds_tensor.numel())) for n, p in params), key=lambda x: x[1]),
        "shard_checksum": float(sum(p.ds_tensor.detach().double().sum() for _, p in params)),
    }


def _weight_sums(model):
    """{name: [sum, std] of the whole parameter} (gathered from the ranks' shards under ZeRO-3), in float64."""
    params = list(model.named_parameters())
    gather = None
    if any(hasattr(p, "ds_tensor") for _, p in params):
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([p for _, p in params])
    with gather if gather is not None else torch.no_grad():
        return {n: [float(p.detach().double().sum()), float(p.detach().double().std())] for n, p in params}


class ProbeCallback(TrainerCallback):
    def __init__(self, trainer, out_dir):
        self.trainer = trainer
        self.out_dir = Path(out_dir)
        self.record = {"epochs": [], "steps": [], "partition": [], "evaluations": []}
        self._lm_calls = 0
        self._hooked = False

    def _hook_language_model(self, model):
        # Forward calls outside training: the evaluation loss pass and generation (prefill passes + decoding).
        model = getattr(model, "module", model)
        while not hasattr(model, "internvl") and hasattr(model, "base_model"):  # PEFT
            model = model.base_model.model if hasattr(model.base_model, "model") else model.base_model
        language_model = model.internvl.model.language_model

        def count(module, *_):
            if not module.training:
                self._lm_calls += 1

        language_model.register_forward_pre_hook(count)
        self._hooked = True

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._hook_language_model(model)
        self.record["rank"] = args.process_index
        self.record["world_size"] = args.world_size
        self.record["deepspeed"] = bool(self.trainer.is_deepspeed_enabled)
        self.record["initial_weights"] = _weight_sums(model)

    def on_epoch_begin(self, args, state, control, **kwargs):
        chain, inner = _torch_optimizers(self.trainer.optimizer)
        self.record["optimizer_chain"] = chain
        self.record["epochs"].append({
            "global_step": state.global_step,
            "stage": self.trainer.curriculum_stage,
            **(_moments(inner) if inner is not None else {"num_states": None}),
        })

    def on_step_end(self, args, state, control, model=None, **kwargs):
        _, inner = _torch_optimizers(self.trainer.optimizer)
        self.record["steps"].append({
            "global_step": state.global_step,
            "lr": float(self.trainer.lr_scheduler.get_last_lr()[0]),
            **(_moments(inner) if inner is not None else {}),
        })
        module = getattr(self.trainer.model_wrapped, "module", self.trainer.model)
        partition = _partition(module)
        if partition is not None:
            self.record["partition"].append({"global_step": state.global_step, **partition})

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.record["evaluations"].append({"global_step": state.global_step, "lm_calls": self._lm_calls,
                                           "metrics": {k: v for k, v in (metrics or {}).items()
                                                       if isinstance(v, (int, float))}})
        self._lm_calls = 0

    def on_train_end(self, args, state, control, **kwargs):
        self.record["log_history"] = state.log_history
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{args.process_index}.json").write_text(json.dumps(self.record, indent=1))


class ProbedCurriculumTrainer(trainer_curriculum.CurriculumTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(ProbeCallback(self, os.environ["MMCOCONUT_PROBE_DIR"]))


if __name__ == "__main__":
    # train.main imports CurriculumTrainer from trainer_curriculum when it runs: it gets this subclass.
    trainer_curriculum.CurriculumTrainer = ProbedCurriculumTrainer
    train_command.main(sys.argv[1:])
