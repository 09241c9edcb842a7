"""What an Optuna ask costs as a search grows, and what TPE's window does to the search's quality.

    uv run python benchmarks/tpe_cost.py [--quick] [--window N] [--space NAME ...] [--asks 20] [--concurrency 16]
    uv run python benchmarks/tpe_cost.py --quality [--trials 1000] [--seeds 5] [--windows 100,250] [--space NAME]

In this process, with no Ray runtime: the searcher a search builds (`driver.optuna_searcher`: Ray's
OptunaSearch as aesearch's MarkingOptunaSearch, over the space's define-by-run function, with the sampler
`driver.tpe` builds), driven as Tune drives it: `--concurrency` trials pending; each in turn reports its
epochs (`on_trial_result`), ends (`on_trial_complete`) and a new trial is asked for (`suggest`: Optuna's
ask and the define-by-run function, the time measured). Each epoch's val/recon_mse is the simulated
trial's curve (aesearch.training.simulated; its optimum below), the second objective of a two-objective
search model/latent_dim. Stopped trials: `none` (every trial runs max_epochs), or ASHA's rule on the
space's budget (at each rung a trial goes on if it is in the best 1/reduction_factor of the values
reported at that rung so far) with the stopped trials told as the space's `stopped_trials` says
(`values_at_stop`, `pruned`).

Latency (default): per shipped space, one and two objectives, each way of telling stopped trials, the
ask's median and 95th percentile over --asks asks at 100, 1,000 and 10,000 finished trials (--quick: 100,
1,000, 2,000), and its median CPU time (this process's: on a shared machine, what an idle core would take). To get there in minutes, the trials up to each mark are drawn by a random sampler (an
ask's cost depends on how many trials there are, not on who drew them), then TPE asks (two asks not
timed first). --window sets the space's tpe_window (1000000: Optuna's TPE on every trial, as before).

--quality: whole searches of --trials trials drawn by TPE from the first, per seed, with the space's
tpe_window and with each of --windows; printed: the distance to the optimum of the best trial's config
(the one the search would pick; 0 at the optimum: see aesearch.training.simulated).
"""

from __future__ import annotations

import argparse
import bisect
import platform
import statistics
import time
import warnings
from dataclasses import dataclass, field

import optuna

from aesearch.search.driver import optuna_searcher
from aesearch.search.space import SearchSpace, decode_params, load_space, trial_config
from aesearch.tracking.outcomes import REPORTED
from aesearch.training.simulated import curve, distance

OPTIMUM = {"optimizer.lr": 0.001, "model.latent_dim": 16, "model.architecture": "conv",
           "corruption.kind": "gaussian", "corruption.level": 0.2}  # in every shipped space below
NOISE = 0.02
SECOND = "model/latent_dim"
FULL = 1_000_000  # a window no search reaches: Optuna's TPE on every trial
warnings.filterwarnings("ignore", message="Define-by-run function")  # Ray's, past 1 s: the asks are timed here


def space_for(name: str, objectives: int, stopped: str, window: int, seed: int = 0) -> SearchSpace:
    """The shipped space, with one or two objectives, ASHA or not, and TPE's window."""
    space = load_space(name)
    document = space.model_dump(mode="json") | {
        "objective": [{"metric": "val/recon_mse"}] + ([{"metric": SECOND}] if objectives == 2 else []),
        "early_stopping": "none" if stopped == "none" else "asha" if objectives == 1 else "asha_first_objective",
        "stopped_trials": "values_at_stop" if stopped == "none" else stopped,
        "tpe_window": window, "seed": seed}
    return SearchSpace.model_validate(document)


@dataclass
class Drive:
    """A search's searcher driven as Tune drives it, trials simulated (see the module's docstring)."""

    space: SearchSpace
    concurrency: int
    searcher: object = None
    pending: list[tuple[str, dict]] = field(default_factory=list)
    rungs: dict[int, list[float]] = field(default_factory=dict)  # ASHA: values reported at each rung (sorted)
    finished: int = 0
    best: tuple[float, float] | None = None  # (value, distance) of the best trial that ran to the end
    count: int = 0

    def __post_init__(self):
        self.searcher = optuna_searcher(self.space)
        budget = self.space.budget
        if self.space.early_stopping != "none":
            epoch = budget.grace_period
            while epoch < budget.max_epochs:
                self.rungs[epoch] = []
                epoch = max(epoch + 1, round(epoch * budget.reduction_factor))
        for _ in range(self.concurrency):
            self.ask()

    def ask(self) -> tuple[float, float]:
        """Ask for a new trial; the seconds it took, and the CPU seconds."""
        self.count += 1
        trial_id = f"trial_{self.count}"
        started, cpu = time.perf_counter(), time.process_time()
        params = self.searcher.suggest(trial_id)
        took = time.perf_counter() - started, time.process_time() - cpu
        self.pending.append((trial_id, params))
        return took

    def finish_one(self) -> None:
        """The oldest pending trial runs: reports each epoch until it completes or ASHA stops it."""
        trial_id, params = self.pending.pop(0)
        config = trial_config(self.space, decode_params(self.space, params), measured=False)
        metrics, budget = self.space.metrics, self.space.budget
        for epoch in range(1, budget.max_epochs + 1):
            value = curve(config, OPTIMUM, NOISE, epoch)
            result = {"epoch": epoch, "training_iteration": epoch, metrics[0]: value}
            if len(metrics) == 2:
                result[SECOND] = float(config.model.latent_dim)
            if epoch == budget.max_epochs:
                result[REPORTED["completed"]] = True
                if self.best is None or value < self.best[0]:
                    self.best = (value, distance(config, OPTIMUM))
                break
            if epoch in self.rungs:
                seen = self.rungs[epoch]
                bisect.insort(seen, value)
                if value > seen[int(len(seen) / budget.reduction_factor)]:
                    break  # ASHA stops it: not in the best 1/reduction_factor at this rung
            self.searcher.on_trial_result(trial_id, result)  # as Tune: a result that does not stop the trial
        self.searcher.on_trial_complete(trial_id, result)
        self.finished += 1

    def step(self) -> tuple[float, float]:
        self.finish_one()
        return self.ask()

    def run_to(self, finished: int, sampler: optuna.samplers.BaseSampler | None = None) -> list[tuple[float, float]]:
        """Finish trials until `finished` have, asking with `sampler` (None: the search's); the asks' times."""
        study = self.searcher._ot_study
        own, study.sampler = study.sampler, sampler or study.sampler
        try:
            return [self.step() for _ in range(finished - self.finished)]
        finally:
            study.sampler = own


def latency(names: list[str], marks: list[int], window: int, asks: int, concurrency: int) -> None:
    print(f"{'space':<16}{'objectives':>11}  {'stopped trials':<16}{'finished':>9}{'ask p50':>10}{'ask p95':>10}"
          f"{'CPU p50':>10}")
    for name in names:
        for objectives in (1, 2):
            for stopped in ("none", "values_at_stop", "pruned"):
                drive = Drive(space_for(name, objectives, stopped, window), concurrency)
                for mark in marks:
                    drive.run_to(mark, optuna.samplers.RandomSampler(seed=mark))
                    drive.run_to(mark + 2)  # not timed: the sampler catches up with the random trials
                    walls, cpus = zip(*drive.run_to(mark + 2 + asks))
                    p95 = sorted(walls)[round(0.95 * (len(walls) - 1))]
                    print(f"{name:<16}{objectives:>11}  {stopped:<16}{mark:>9,}{statistics.median(walls) * 1e3:>7.1f} ms"
                          f"{p95 * 1e3:>7.1f} ms{statistics.median(cpus) * 1e3:>7.1f} ms", flush=True)


def quality(name: str, trials: int, seeds: int, windows: list[int], concurrency: int) -> None:
    space = load_space(name)
    print(f"{name}: the best trial's distance to the optimum after {trials:,} trials, TPE + ASHA (values at stop), "
          f"{concurrency} pending; optimum {OPTIMUM}")
    print(f"{'seed':>4} " + "".join(f"{f'window {w:,}':>16}" for w in windows) + f"{'random':>16}")
    table = {w: [] for w in windows} | {"random": []}
    for seed in range(seeds):
        row = []
        for window in [*windows, "random"]:
            drive = Drive(space_for(name, 1, "values_at_stop", window if window != "random" else FULL, seed),
                          concurrency)
            started = time.perf_counter()
            drive.run_to(trials, optuna.samplers.RandomSampler(seed=seed) if window == "random" else None)
            table[window].append(drive.best[1])
            row.append(f"{drive.best[1]:>9.3f} {time.perf_counter() - started:>4.0f} s")
        print(f"{seed:>4}" + "".join(f"{cell:>16}" for cell in row), flush=True)
    print(f"{'med':>4}" + "".join(f"{statistics.median(table[w]):>16.3f}" for w in [*windows, "random"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="stop at 2,000 finished trials")
    parser.add_argument("--window", type=int, default=None, help="tpe_window (default: the schema's)")
    parser.add_argument("--space", action="append", help="a shipped space (default: mnist_variants, quickstart)")
    parser.add_argument("--asks", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--windows", default=f"{FULL},100,250")
    args = parser.parse_args()
    window = args.window or SearchSpace.model_fields["tpe_window"].default
    print(f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores, Optuna {optuna.__version__}; "
          f"tpe_window {window:,}{' (Optuna TPE on every trial)' if window >= FULL else ''}")
    if args.quality:
        quality((args.space or ["mnist_variants"])[0], args.trials, args.seeds,
                [int(w) for w in args.windows.split(",")], args.concurrency)
        return
    marks = [100, 1000, 2000] if args.quick else [100, 1000, 10_000]
    latency(args.space or ["mnist_variants", "quickstart"], marks, window, args.asks, args.concurrency)


if __name__ == "__main__":
    main()
