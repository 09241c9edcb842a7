"""Record the learning curves of many configurations once, so that searches can replay them.

    uv run python benchmarks/curves.py [--configs 1000] [--epochs 30] [--workers 1]
        [--out benchmarks/data/curves-dense-digits.jsonl.gz]
    uv run python benchmarks/curves.py --check [--out TABLE]

As HPO research does with tabular benchmarks (LCBench, HPOBench): configurations of the dense
subspace of mnist_variants.yaml on digits (the space benchmarks/search_efficiency.py searches), drawn
as a random search draws them (configuration i from Optuna's random sampler seeded with i), each
trained once for --epochs by the one trainer, every epoch's metrics kept. A search whose space has
`simulate: {replay: FILE}` then runs against the table at no training cost (aesearch.training.simulated):
many seeds of many search settings, where real training affords five.

The file is gzipped JSON lines: a header (the searched fields, their ranges, the command, the versions),
then a record per configuration: its index, the config values of the searched fields, its outcome
(completed, diverged or invalid) and its epochs' metrics. Recording resumes: a record already in the file
is not trained again, and a record cut short by a kill is dropped and trained again.

--check measures the surrogate the replay uses on held-out records (5-fold): how well its final
val/recon_mse ranks configurations it was not fitted on, beside the nearest record's.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import multiprocessing
import platform
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

DEFAULT_OUT = HERE / "data" / "curves-dense-digits.jsonl.gz"


def searched_space(epochs: int):
    """The space benchmarks/search_efficiency.py searches on digits, --epochs per trial."""
    from search_efficiency import space_document

    from aesearch.search.space import parse_space

    settings = argparse.Namespace(data="digits", concurrent=1, trials=1, epochs=epochs, grace=1, reduction=3.0,
                                  brackets=1, multi_objective=False)
    return parse_space(space_document(settings, "curves", ("random", "none", "values_at_stop", None), 0))


def field_ranges(space) -> dict[str, dict[str, Any]]:
    """Each searched config field's range (the union, where parameters share a field)."""
    fields: dict[str, dict[str, Any]] = {}
    for name, parameter in space.space.items():
        path = parameter.path or name
        if parameter.type == "categorical":
            known = fields.setdefault(path, {"type": "categorical", "choices": []})
            known["choices"] += [c for c in parameter.choices if c not in known["choices"]]
        else:
            known = fields.setdefault(path, {"type": "number", "low": parameter.low, "high": parameter.high,
                                             "log": parameter.log})
            known.update(low=min(known["low"], parameter.low), high=max(known["high"], parameter.high))
    return fields


def rounded(value: float) -> float | None:
    """6 significant digits; a non-finite value as null (JSON has none)."""
    return float(f"{value:.6g}") if math.isfinite(value) else None


def record(index: int, epochs: int) -> dict[str, Any]:
    """Configuration `index`, drawn and trained: its record."""
    import optuna

    from aesearch.errors import ConfigError, DivergedError
    from aesearch.schema import flatten
    from aesearch.search.space import DefineByRun, decode_params, trial_config
    from aesearch.training.trainer import train

    space, data = _worker["space"], _worker["data"]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=index))
    trial = study.ask()
    DefineByRun(space)(trial)
    params = decode_params(space, trial.params)
    try:
        config = trial_config(space, params)
    except ConfigError as error:
        return {"index": index, "params": params, "outcome": "invalid", "detail": str(error), "epochs": []}
    values = flatten(config.model_dump(mode="json"))
    reported: list[dict[str, float | None]] = []
    started = time.perf_counter()
    outcome, detail = "completed", ""
    try:
        train(config, data, reporter=lambda end: reported.append(
            {k: rounded(v) for k, v in end.metrics.items()}), run_evaluation=False)
    except DivergedError as error:
        outcome, detail = "diverged", f"epoch {error.epoch}"
    return {"index": index, "params": params, "values": {path: values[path] for path in _worker["fields"]},
            "outcome": outcome, "detail": detail, "seconds": round(time.perf_counter() - started, 2),
            "epochs": reported}


_worker: dict[str, Any] = {}  # what each worker process loads once: the space, its fields, the data


def start_worker(epochs: int) -> None:
    import torch

    from aesearch.parts.data import load_data

    torch.set_num_threads(1)  # one core per worker: --workers sets how many
    space = searched_space(epochs)
    _worker.update(space=space, fields=field_ranges(space), data=load_data(space.data))


def read_records(path: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The header and every whole record of a table (a record cut short by a kill is left out)."""
    if not path.is_file():
        return None, []
    lines = []
    try:
        with gzip.open(path, "rt", encoding="utf-8") as stream:
            for line in stream:
                lines.append(line)
    except (EOFError, gzip.BadGzipFile):
        pass
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return (parsed[0], parsed[1:]) if parsed else (None, [])


def header(epochs: int, command: list[str]) -> dict[str, Any]:
    import torch

    return {"table": "learning curves", "space": "the dense subspace of mnist_variants.yaml on digits",
            "epochs": epochs, "fields": field_ranges(searched_space(epochs)),
            "command": "uv run python benchmarks/" + " ".join([Path(command[0]).name, *command[1:]]),
            "machine": f"{platform.machine()}, torch {torch.__version__}, 1 thread per configuration"}


def check(path: Path, folds: int = 5) -> None:
    """The surrogate's held-out fidelity: Spearman's rank correlation of the predicted and the recorded
    final val/recon_mse, and how many of the best tenth it puts in its own best tenth."""
    import numpy as np
    from scipy.stats import spearmanr

    from aesearch.search.space import trial_config
    from aesearch.training.simulated import CurveTable

    top, records = read_records(path)
    records = [r for r in records if r["outcome"] == "completed"]
    space = searched_space(top["epochs"])
    order = np.random.default_rng(0).permutation(len(records))
    recorded = np.array([records[i]["epochs"][-1]["val/recon_mse"] for i in order])
    predicted = {"surrogate": np.zeros(len(order)), "nearest record": np.zeros(len(order))}
    for fold in np.array_split(np.arange(len(order)), folds):
        held = set(fold.tolist())
        table = CurveTable(top, [records[i] for place, i in enumerate(order) if place not in held])
        for place in fold:
            config = trial_config(space, records[order[place]]["params"])
            predicted["surrogate"][place] = table.curves(config, ["val/recon_mse"])[-1]["val/recon_mse"]
            predicted["nearest record"][place] = table.nearest(config, ["val/recon_mse"])["epochs"][-1]["val/recon_mse"]
    tenth = len(order) // 10
    best = set(np.argsort(recorded)[:tenth].tolist())
    print(f"{len(order)} completed configurations of {path.name}, {folds}-fold, final val/recon_mse held out:")
    for name, values in predicted.items():
        overlap = len(best & set(np.argsort(values)[:tenth].tolist())) / tenth
        print(f"  {name:15s} Spearman {spearmanr(values, recorded).statistic:.3f}, "
              f"of the best tenth {overlap:.0%} in its own best tenth")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--check", action="store_true", help="measure the replay's surrogate on held-out records")
    args = parser.parse_args()
    if args.check:
        return check(args.out)
    top, records = read_records(args.out)
    if top is not None and top["epochs"] != args.epochs:
        sys.exit(f"curves.py: error: --epochs {args.epochs}: {args.out} holds curves of {top['epochs']} epochs")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(args.out, "wt", encoding="utf-8") as stream:  # rewritten whole: a cut record goes
        for line in [top or header(args.epochs, sys.argv), *records]:
            stream.write(json.dumps(line) + "\n")
    done = {r["index"] for r in records}
    todo = [i for i in range(args.configs) if i not in done]
    print(f"{len(done)} configurations recorded in {args.out}; {len(todo)} to train, {args.workers} at a time",
          flush=True)
    started = time.perf_counter()
    context = multiprocessing.get_context("spawn")  # torch and fork do not mix
    with context.Pool(args.workers, initializer=start_worker, initargs=(args.epochs,)) as pool:
        for count, line in enumerate(pool.imap_unordered(_record, [(i, args.epochs) for i in todo]), 1):
            with gzip.open(args.out, "at", encoding="utf-8") as stream:  # a gzip member per record
                stream.write(json.dumps(line) + "\n")
            if count % 10 == 0 or count == len(todo):
                rate = (time.perf_counter() - started) / count
                print(f"  {len(done) + count} of {args.configs} ({rate:.1f} s each)", flush=True)


def _record(job: tuple[int, int]) -> dict[str, Any]:
    return record(*job)


if __name__ == "__main__":
    main()
