"""mmcoconut: Chain of Continuous Thought (Coconut) for InternVL3 vision-language models.

The model and its config live in the flat modules `modeling_mmcoconut` and `configuration_mmcoconut` (they travel
to the Hub as remote code); this package holds everything around them, one layer per module or folder (see
docs/architecture.md). Importing the package imports nothing heavy.
"""

__version__ = "0.1.0"
