"""What a search may spend: its budget (trials, epochs, early stopping's rungs, retries, patience,
how often trials write) and each trial's resources."""

from __future__ import annotations

import math

from pydantic import Field, model_validator

from aesearch.schema import Float, Int, PositiveInt, Section


class Budget(Section):
    num_samples: PositiveInt = 16
    max_epochs: PositiveInt = Field(10, le=100_000)
    grace_period: PositiveInt = 1  # ASHA: epochs every trial gets before it can be stopped (<= max_epochs)
    reduction_factor: Float = Field(3.0, gt=1.0)  # ASHA: keep the best 1/reduction_factor per rung
    # ASHA's brackets (Hyperband's hedge): bracket s first judges its trials at grace_period * reduction_factor**s
    # epochs; each new trial is dealt to one (3 brackets of 4, 3, 2 rungs: 67%, 24%, 9% of the trials). At most one
    # per rung: more are cut to that. One, as in Ray: more cost epochs and searched no better in
    # benchmarks/README.md ("Search efficiency").
    brackets: PositiveInt = Field(1, le=10)
    time_budget_s: Float | None = Field(None, gt=0)
    max_failures: Int = Field(1, ge=0)  # retries of a trial that raised, from its last checkpoint
    # Checkpoints (in trial storage and in MLflow) of the best K finished trials only: the others'
    # are removed as better trials end, so that a 1,000-trial search does not fill a disk.
    keep_checkpoints: PositiveInt = Field(10, le=100_000)
    # How long a trial (at its start and end) and the driver (closing runs) wait for a tracking server
    # that does not answer; in between, trials train on and their records wait. What never arrives is
    # named on the run (tag `tracking`) and in the search's output. storage_patience_s: how long a trial's
    # report waits for storage that does not answer (an S3 server restarting) before the trial fails.
    tracking_patience_s: Float = Field(600.0, gt=0, le=86_400)
    storage_patience_s: Float = Field(600.0, gt=0, le=86_400)
    # A trial sends its epochs' metrics to MLflow at most this often, several epochs in one request
    # (0: each epoch as it ends). Short epochs by the thousand: fewer requests for the tracking server.
    tracking_batch_s: Float = Field(0.0, ge=0, le=3600)
    # A trial stores a checkpoint with a report at most this often, always with its last (0: every epoch). A
    # retried trial retrains from its last stored one; a stopped trial keeps the best epoch stored in it.
    checkpoint_every_s: Float = Field(0.0, ge=0, le=3600)

    @model_validator(mode="after")
    def _grace_within_budget(self) -> Budget:
        self.grace_period = min(self.grace_period, self.max_epochs)  # e.g. after --max-epochs 3
        rungs = int(math.log(self.max_epochs / self.grace_period) / math.log(self.reduction_factor) + 1)
        self.brackets = min(self.brackets, rungs)
        return self


class Resources(Section):
    cpu: Float = Field(1.0, gt=0, le=256)
    gpu: Float = Field(0.0, ge=0, le=1)  # a fraction of one GPU: several trials may share it
    # > 1: trials train in pack servers, each holding `cpu` and `gpu` and training up to `pack`
    # trials of one model shape in one fused step (see aesearch.packing.server).
    pack: PositiveInt = Field(1, le=256)
