"""The errors aesearch raises on purpose.

`UserError` and its subclasses are mistakes a user can fix (a bad config value, missing data
files): the CLI prints their message as one line and exits with status 2. `DivergedError`
is a training outcome, not a mistake: callers record it (a search marks the trial diverged).
"""


class UserError(Exception):
    """A problem with the user's input; the message names the field, the value and the rule."""


class ConfigError(UserError):
    """A configuration value breaks a rule of the schema."""


class DataError(UserError):
    """A dataset cannot be loaded as asked (missing files, no download allowed, ...)."""


class CheckpointError(UserError):
    """A checkpoint file is missing, corrupt or not one of ours."""


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite; training stopped at `epoch`."""

    def __init__(self, epoch: int, metrics: dict[str, float]):
        self.epoch = epoch
        self.metrics = metrics
        bad = ", ".join(f"{k}={v}" for k, v in metrics.items())
        super().__init__(f"training diverged in epoch {epoch}: non-finite loss ({bad})")
