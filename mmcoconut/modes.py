"""The curriculum `mode` table: the one place that says what each mode means (torch-free).

    mode         latent span   advances stages   fills thoughts   evaluated as
    cot          no            no                -                cot
    coconut      yes           yes               yes              coconut
    no_cot       no            no                -                vanilla
    no_thoughts  yes (empty)   yes               -                coconut
    pause        yes           yes               no (pause tokens) coconut

`pause` is laid out exactly like `coconut`; its latents keep their learned embedding and the sequence runs in one
pass (`MMCoconutConfig.pause_as_thought`, derived from the checkpoint's `training_mode`).
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Mode:
    name: str
    latent_span: bool  # sequences carry <|start-latent|> ... <|end-latent|>
    advances_stages: bool  # the curriculum replaces steps stage by stage (else it stays at stage 0)
    fills_thoughts: bool  # <|latent|> positions get continuous thoughts (hidden states fed back)
    eval_mode: str  # the evaluation mode (`evaluate_aokvqa.py --mode`) that prompts as this mode trained


MODE_TABLE = {
    mode.name: mode
    for mode in (
        Mode("cot", latent_span=False, advances_stages=False, fills_thoughts=False, eval_mode="cot"),
        Mode("coconut", latent_span=True, advances_stages=True, fills_thoughts=True, eval_mode="coconut"),
        Mode("no_cot", latent_span=False, advances_stages=False, fills_thoughts=False, eval_mode="vanilla"),
        Mode("no_thoughts", latent_span=True, advances_stages=True, fills_thoughts=False, eval_mode="coconut"),
        Mode("pause", latent_span=True, advances_stages=True, fills_thoughts=False, eval_mode="coconut"),
    )
}
MODES = tuple(MODE_TABLE)
LATENT_MODES = tuple(name for name, mode in MODE_TABLE.items() if mode.latent_span)


def mode(name):
    """The `Mode` called `name`; a ValueError listing the modes for anything else."""
    if name not in MODE_TABLE:
        raise ValueError(f"mode {name!r} is not one of {list(MODES)}")
    return MODE_TABLE[name]


__all__ = ["Mode", "MODE_TABLE", "MODES", "LATENT_MODES", "mode"]
