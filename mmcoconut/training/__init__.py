"""The training run around `CurriculumTrainer`: arguments, recipes, checks before loading, building, reporting."""
