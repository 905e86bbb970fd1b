"""RLOO training of steering vectors (``python -m trainer.rloo``), rewards, data, learner and rollout."""
