"""Plug-ins that let other tools drive an MMCoconut checkpoint: `lmms_eval` (the `lmms-eval` extra)."""
