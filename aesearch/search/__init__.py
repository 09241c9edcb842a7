"""The search: a search space becomes Optuna + ASHA trials on Ray Tune.

space (what is searched) -> trial (one config trained and logged) -> driver (Tune, its callbacks,
the storage) -> leaderboard (the one ranking).
"""
