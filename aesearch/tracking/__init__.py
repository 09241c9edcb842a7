"""MLflow tracking: the store, the outbox, trial runs, the search run, the model registry, and how a
trial ended (`Outcome`).
"""
