"""A training run on this machine, written to a folder: the local face of the one trainer.

    OUT/config.yaml       the resolved config (every default filled in)
    OUT/metrics.jsonl     one line of metrics per epoch
    OUT/last.pt           checkpoint after the latest epoch (resume with --resume OUT/last.pt)
    OUT/best.pt           checkpoint of the epoch with the lowest val/recon_mse
    OUT/*.png             reconstructions, prior samples, attention maps (what applies)
    OUT/result.json       final test metrics, summary and fingerprint
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from aesearch.config import TrainConfig, variant_family
from aesearch.data import Data
from aesearch.images import save_images
from aesearch.train import EpochEnd, TrainResult, train


@dataclass
class FolderReporter:
    """Writes metrics and checkpoints into a run folder and draws a progress bar."""

    folder: Path
    epochs: int
    stream: TextIO = field(default_factory=lambda: sys.stderr)

    def __call__(self, end: EpochEnd) -> None:
        with open(self.folder / "metrics.jsonl", "a", encoding="utf-8") as log:
            log.write(json.dumps(end.metrics) + "\n")
        end.save_checkpoint(self.folder / "last.pt")
        if end.is_best:
            end.save_checkpoint(self.folder / "best.pt")
        self._draw(end)

    def _draw(self, end: EpochEnd) -> None:
        width = 20
        filled = round(width * end.epoch / self.epochs)
        m = end.metrics
        line = (
            f"epoch {end.epoch:>{len(str(self.epochs))}}/{self.epochs} [{'#' * filled}{'.' * (width - filled)}] "
            f"train/loss {m['train/loss']:.4g}  val/recon_mse {m['val/recon_mse']:.4g}  "
            f"{m['time/epoch_seconds']:.2f}s/epoch{'  *' if end.is_best else ''}"
        )
        if self.stream.isatty():
            self.stream.write("\r" + line + ("\n" if end.epoch == self.epochs else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def run_in_folder(
    config: TrainConfig, data: Data, folder: Path | str, resume_state: dict[str, Any] | None = None
) -> tuple[TrainResult, dict[str, Any]]:
    """Train, evaluate and write everything into `folder`; returns the result and its summary."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(
        yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), encoding="utf-8"
    )
    if resume_state is None:
        (folder / "metrics.jsonl").unlink(missing_ok=True)
    result = train(config, data, FolderReporter(folder, config.epochs), resume_from=resume_state)
    save_images(result.model, data.test_x.to(next(result.model.parameters()).device), config, folder)
    summary = {
        "name": config.name,
        "variant": variant_family(config),
        "dataset": config.data.name,
        "fingerprint": result.fingerprint,
        "epochs": len(result.history),
        **result.metrics,
    }
    (folder / "result.json").write_text(json.dumps({**summary, "history": result.history}, indent=1), encoding="utf-8")
    return result, summary
