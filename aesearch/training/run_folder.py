"""A training run on this machine, written to a folder: the local face of the one trainer.

    OUT/config.yaml       the resolved config (every default filled in)
    OUT/metrics.jsonl     one line of metrics per epoch
    OUT/last.pt           checkpoint after the latest epoch (resume with --resume OUT/last.pt)
    OUT/best.pt           checkpoint of the best epoch (evaluation.select_by: val/loss by default; ties: lower val/loss)
    OUT/*.png             reconstructions, prior samples, attention maps, latent plot (what applies)
    OUT/result.json       final test metrics, summary and fingerprint

The folder is created when the first epoch ends, so a run that fails before it trains (a bad
checkpoint, a model that does not fit) leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml
from tqdm.auto import tqdm

from aesearch.config import TrainConfig, variant_family
from aesearch.errors import UserError
from aesearch.parts.data import Data
from aesearch.training.checkpoints import BEST_FILE
from aesearch.training.images import save_pictures
from aesearch.training.trainer import EpochEnd, Reporter, TrainResult, train


@dataclass
class FolderReporter:
    """Writes metrics and checkpoints into a run folder and shows the progress (call `close`
    when training ends)."""

    folder: Path
    config: TrainConfig
    earlier_epochs: list[dict[str, float]] = field(default_factory=list)  # from a resumed checkpoint
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    opened: bool = False
    last_epoch: int | None = None  # where training ends when before config.epochs (see `train`'s stop_after)
    progress: tqdm = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # A terminal gets a bar redrawn each epoch. A pipe or log file gets it too (the final
        # line says how the run ended), but at most every 30 s, so a fast run does not fill the
        # log with a line per epoch; the metrics of every epoch are in metrics.jsonl.
        terminal = self.stream.isatty()
        self.progress = tqdm(
            total=self.last_epoch or self.config.epochs,
            initial=len(self.earlier_epochs),
            file=self.stream,
            unit="epoch",
            bar_format="epoch {n_fmt}/{total_fmt} |{bar}| [{elapsed}<{remaining}, {rate_fmt}{postfix}]",
            dynamic_ncols=True,
            mininterval=0.1 if terminal else 30.0,
            miniters=1,  # fixed: tqdm would otherwise force a redraw every 10 s in a log too
        )

    def open(self) -> None:
        """Create the folder with the config and the metrics of epochs already trained."""
        if self.opened:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        config_yaml = yaml.safe_dump(self.config.model_dump(mode="json"), sort_keys=False)
        (self.folder / "config.yaml").write_text(config_yaml, encoding="utf-8")
        lines = "".join(json.dumps(metrics) + "\n" for metrics in self.earlier_epochs)
        (self.folder / "metrics.jsonl").write_text(lines, encoding="utf-8")
        self.opened = True

    def __call__(self, end: EpochEnd) -> None:
        self.open()
        with open(self.folder / "metrics.jsonl", "a", encoding="utf-8") as log:
            log.write(json.dumps(end.metrics) + "\n")
        end.save_checkpoint(self.folder / "last.pt")
        if end.is_best:
            end.save_checkpoint(self.folder / BEST_FILE)
        m = end.metrics
        self.progress.set_postfix_str(
            f"train/loss {m['train/loss']:.4g}  val/loss {m['val/loss']:.4g}  "
            f"val/recon_mse {m['val/recon_mse']:.4g}{'  *' if end.is_best else ''}",  # *: the best epoch so far
            refresh=False,
        )
        self.progress.update()
        if self.progress.n == self.progress.total:
            self.close()  # now: the evaluation that follows is no part of the epochs' time

    def close(self) -> None:
        """End the progress line as it stands (training may have ended early, or failed)."""
        self.progress.close()


def run_in_folder(
    config: TrainConfig,
    data: Data,
    folder: Path | str,
    resume_state: dict[str, Any] | None = None,
    stop_after: int | None = None,
    also: Reporter | None = None,
) -> tuple[TrainResult, dict[str, Any]]:
    """Train, evaluate and write everything into `folder`; returns the result and its summary.

    `stop_after` ends training early (see `train`); `also` receives every epoch after the folder
    has it (a reproduction logs it to MLflow).
    """
    earlier = list(resume_state["history"]) if resume_state else []
    last_epoch = config.epochs if stop_after is None else min(stop_after, config.epochs)
    folder_reporter = FolderReporter(Path(folder), config, earlier, last_epoch=last_epoch)

    def reporter(end: EpochEnd) -> None:
        folder_reporter(end)
        if also is not None:
            also(end)

    with closing(folder_reporter):
        result = train(config, data, reporter, resume_from=resume_state, stop_after=stop_after)
    folder_reporter.open()  # in case no epoch was left to train
    save_pictures(result.model, data, config, folder_reporter.folder)
    summary = {
        "name": config.name,
        "variant": variant_family(config),
        "dataset": config.data.dataset,
        "fingerprint": result.fingerprint,
        "epochs": len(result.history),
        **result.metrics,
    }
    result_json = json.dumps({**summary, "history": result.history}, indent=1)
    (folder_reporter.folder / "result.json").write_text(result_json, encoding="utf-8")
    return result, summary


def check_run_folder(folder: Path, resuming_from: Path | None) -> None:
    """A run folder must be new or empty, or the folder of the checkpoint being resumed."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--out {folder}: exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()):
        if resuming_from is None or resuming_from.resolve().parent != folder.resolve():
            raise UserError(
                f"--out {folder}: folder already holds files; choose a new folder (or resume a "
                "checkpoint from this folder with --resume)"
            )
        return
    existing = next(parent for parent in folder.absolute().parents if parent.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UserError(f"--out {folder}: cannot create it: {existing} is not a writable folder")
