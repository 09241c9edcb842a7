"""The `aesearch` command.

    aesearch train CONFIG [--set key=value]... [--epochs N] [--device D] [--data-dir DIR]
                   [--download] [--out DIR] [--resume CHECKPOINT]
    aesearch search SPACE [--name N] [--address ADDR] [--storage PATH|URI] [--num-samples N]
                   [--max-epochs N] [--max-concurrent N] [--cpus-per-trial F] [--gpus-per-trial F]
                   [--data-dir DIR] [--download] [--seed S] [--resume] [--tracking-uri URI]
    aesearch ui [--tracking-uri URI] [--port P]      (MLflow's UI on 127.0.0.1)
    aesearch report EXPERIMENT [--tracking-uri URI] [--out DIR]
    aesearch relocate EXPERIMENT [--tracking-uri URI]   (artifacts an earlier aesearch misplaced)
    aesearch reproduce EXPERIMENT [--rank K | --run-id ID] [--tracking-uri URI] [--device D]
                   [--epochs N] [--from-checkpoint] [--data-dir DIR] [--download] [--out DIR]
    aesearch encode MODEL --input FILE --out FILE [--rank K | --run-id ID] [--tracking-uri URI] [--device D]
    aesearch score MODEL --input FILE --out FILE [...as encode] [--threshold X | --contamination Q] [--data-dir DIR]
                   (MODEL: a search's name or a checkpoint; OUT.json states the is_anomaly threshold)
    aesearch example NAME [--out DIR] | --list   (offline example datasets as user files; a shipped file's text)
    aesearch validate FILE...            (training configs and search spaces)
    aesearch evaluate CHECKPOINT [--data-dir DIR] [--download] [--device D]

CONFIG, SPACE and validate's FILEs are files, or the names of the configs and spaces that ship with
aesearch (`aesearch search quickstart`, `aesearch train vae`; `aesearch example --list` lists them).

Mistakes in the input (a bad config value, missing data, a bad checkpoint) print one line that
names the field, the value and the rule, exit with status 2 and write nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from datetime import datetime
from pathlib import Path

from aesearch import settings
from aesearch.errors import DivergedError, UserError
from aesearch.locations import DEFAULT_STORAGE

STARTED = time.time()  # the command's start, for `aesearch: time: ...` (torch, Ray and MLflow load later)

EXIT_DIVERGED = 1
EXIT_NOTHING_RAN = 1  # a search whose every trial errored or never started
EXIT_NOT_REPRODUCED = 1
EXIT_USER_ERROR = 2
TRACKING_HELP = "MLflow tracking store (default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)"


def one_line(message: object) -> str:
    """A message on one line whatever it quotes: control characters (a newline in a value) escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(message))


def say_error(error: object) -> None:
    print(f"aesearch: error: {one_line(error)}", file=sys.stderr)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (and exit status 2) like every other mistake, and an
    option is only its whole name: `--data data.csv` is refused, not taken for `--data-dir`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})

    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, help="dataset folder (default: $AESEARCH_DATA_DIR or ~/.cache/aesearch/datasets)")
    parser.add_argument("--download", action="store_true", help="allow downloading missing dataset files")
    parser.add_argument("--device", help="auto | cpu | cuda[:N] (default: the config's runtime.device)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="aesearch", description="Hyperparameter search for autoencoders.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    train = commands.add_parser("train", help="train one config locally")
    train.add_argument("config", help="a config file, or a shipped config's name (aesearch example --list)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. --set model.latent_dim=32 (repeatable)")
    train.add_argument("--epochs", type=int, help="override the config's epochs")
    train.add_argument("--out", type=Path, help="run folder (default: runs/NAME-TIMESTAMP)")
    train.add_argument("--resume", type=Path, metavar="CHECKPOINT", help="continue from a checkpoint (e.g. OUT/last.pt)")
    _add_data_options(train)
    train.set_defaults(handler=cmd_train)

    search = commands.add_parser("search", help="run a search space on Ray Tune (Optuna TPE + ASHA)")
    search.add_argument("space", help="a search space file, or a shipped space's name (aesearch example --list)")
    search.add_argument("--name", help="the search's name (default: the space's name)")
    search.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                        help="a running Ray cluster (default: $RAY_ADDRESS, else a local Ray instance)")
    search.add_argument("--storage", default=DEFAULT_STORAGE,
                        help="folder or URI for results and checkpoints (shared by all nodes on a cluster)")
    search.add_argument("--num-samples", type=int, help="trials to run (budget.num_samples)")
    search.add_argument("--max-epochs", type=int, help="epochs of a trial that is never stopped (budget.max_epochs)")
    search.add_argument("--max-concurrent", type=int, help="trials at once (max_concurrent)")
    search.add_argument("--cpus-per-trial", type=float, help="resources.cpu")
    search.add_argument("--gpus-per-trial", type=float, help="resources.gpu (a fraction shares one GPU)")
    search.add_argument("--pack", type=int,
                        help="resources.pack: train up to N trials of one model shape together, in one fused step")
    search.add_argument("--seed", type=int, help="seed of the TPE sampler and of every trial")
    search.add_argument("--resume", action="store_true", help="continue an interrupted search of this name")
    search.add_argument("--tracking-uri", help=TRACKING_HELP)
    search.add_argument("--data-dir", type=Path, help="dataset folder (default: $AESEARCH_DATA_DIR or ~/.cache/aesearch/datasets)")
    search.add_argument("--download", action="store_true", help="allow downloading missing dataset files")
    search.set_defaults(handler=cmd_search)

    ui = commands.add_parser("ui", help="serve MLflow's UI for the tracking store on 127.0.0.1")
    ui.add_argument("--tracking-uri", help=TRACKING_HELP)
    ui.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default: 5000)")
    ui.set_defaults(handler=cmd_ui)

    relocate = commands.add_parser("relocate", help="move a search's artifacts that an earlier aesearch "
                                   "misplaced (under /) back beside its embedded store")
    relocate.add_argument("experiment", help="the search's name (its MLflow experiment)")
    relocate.add_argument("--tracking-uri", help=TRACKING_HELP)
    relocate.set_defaults(handler=cmd_relocate)

    report = commands.add_parser("report", help="a leaderboard report of a search (HTML, Markdown, CSV)")
    report.add_argument("experiment", help="the search's name (its MLflow experiment)")
    report.add_argument("--tracking-uri", help=TRACKING_HELP)
    report.add_argument("--out", type=Path, help="report folder (default: reports/EXPERIMENT)")
    report.set_defaults(handler=cmd_report)

    reproduce = commands.add_parser("reproduce", help="train a trial of a search again here and compare")
    reproduce.add_argument("experiment", help="the search's name (its MLflow experiment)")
    which = reproduce.add_mutually_exclusive_group()
    which.add_argument("--rank", type=int, help="the trial at this rank of the report's leaderboard (default: 1)")
    which.add_argument("--run-id", help="the trial's MLflow run id")
    reproduce.add_argument("--tracking-uri", help=TRACKING_HELP)
    reproduce.add_argument("--epochs", type=int, help="reproduce only the first N epochs of the trial")
    reproduce.add_argument("--from-checkpoint", action="store_true",
                           help="evaluate the trial's stored best checkpoint instead of training again")
    reproduce.add_argument("--out", type=Path, help="local run folder (default: runs/reproduce-TRIAL-TIMESTAMP)")
    _add_data_options(reproduce)
    reproduce.set_defaults(handler=cmd_reproduce)

    for name, what in (("encode", "the codes"), ("score", "anomaly scores (and each column's error, for tables)")):
        use = commands.add_parser(name, help=f"write {what} of new data under a found model")
        use.add_argument("model", help="a search's name (its MLflow experiment), or a checkpoint file")
        use.add_argument("--input", required=True, help="a table (.csv, .parquet), an array (.npy, .npz) or an image folder")
        use.add_argument("--out", required=True, type=Path, help="the output file: .csv, .parquet or .npy")
        which = use.add_mutually_exclusive_group()
        which.add_argument("--rank", type=int, help="the trial at this rank of the search's leaderboard (default: 1)")
        which.add_argument("--run-id", help="the trial's MLflow run id")
        use.add_argument("--tracking-uri", help=TRACKING_HELP)
        use.add_argument("--device", help="auto | cpu | cuda[:N] (default: cpu)")
        use.set_defaults(handler=cmd_use, use=name)
        if name == "score":  # is_anomaly's threshold, chosen on the model's validation split unless given
            cut = use.add_mutually_exclusive_group()
            cut.add_argument("--threshold", type=float, help="is_anomaly: the score above this (default: the cut "
                             "that maximises F1 on labelled validation anomalies, else by --contamination)")
            cut.add_argument("--contamination", type=float, help="the expected share of anomalies: the threshold "
                             "flags this share of the validation rows")
            use.add_argument("--data-dir", type=Path, help="a built-in dataset's folder, to read its validation split")

    example = commands.add_parser("example", help="write an offline example dataset, or print a shipped space or config")
    example.add_argument("example", nargs="?", help="an example dataset (written into --out) or a shipped space or "
                                                    "config (its text printed: redirect it to a file to edit it)")
    example.add_argument("--list", action="store_true", help="list the shipped spaces, configs and example datasets")
    example.add_argument("--out", type=Path, default=Path("data"), help="folder to write a dataset into (default: data)")
    example.set_defaults(handler=cmd_example)

    validate = commands.add_parser("validate", help="check training configs and search spaces")
    validate.add_argument("files", nargs="+", help="config or search space files, or shipped names")
    validate.set_defaults(handler=cmd_validate)

    evaluate = commands.add_parser("evaluate", help="run the evaluation suite on a checkpoint")
    evaluate.add_argument("checkpoint", type=Path)
    _add_data_options(evaluate)
    evaluate.set_defaults(handler=cmd_evaluate)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from aesearch.config import check_data, load_config, resolve_device
    from aesearch.parts.data import load_data
    from aesearch.training.checkpoints import load_checkpoint
    from aesearch.training.run_folder import check_run_folder, run_in_folder
    from aesearch.training.trainer import check_resumable

    overrides = list(args.overrides)
    if args.epochs is not None:
        overrides.append(f"epochs={args.epochs}")
    if args.device is not None:
        overrides.append(f"runtime.device={args.device}")
    config = load_config(args.config, overrides)
    resolve_device(config.runtime.device)
    data = load_data(config.data, args.data_dir, args.download)
    check_data(config, data.spec)
    resume_state = None
    if args.resume is not None:
        resume_state = load_checkpoint(args.resume)
        check_resumable(resume_state, config, data)
    folder = args.out or Path("runs") / f"{config.name}-{datetime.now():%Y%m%d-%H%M%S}"
    check_run_folder(folder, resuming_from=args.resume)

    print(f"training {config.name} on {config.data.dataset} ({data.spec.describe()}; {len(data.train_x)} train / "
          f"{len(data.val_x)} val / {len(data.test_x)} test) -> {folder}", file=sys.stderr)
    _, summary = run_in_folder(config, data, folder, resume_state)
    print(json.dumps(summary))
    return 0


SEARCH_FLAGS = {  # command-line flag -> search space field
    "num_samples": "budget.num_samples",
    "max_epochs": "budget.max_epochs",
    "max_concurrent": "max_concurrent",
    "cpus_per_trial": "resources.cpu",
    "gpus_per_trial": "resources.gpu",
    "pack": "resources.pack",
    "seed": "seed",
}


def cmd_search(args: argparse.Namespace) -> int:
    from aesearch.schema import NAME_PATTERN, NAME_RULE
    from aesearch.search.space import load_space

    overrides = {field: getattr(args, flag) for flag, field in SEARCH_FLAGS.items() if getattr(args, flag) is not None}
    space = load_space(args.space, overrides)
    if args.name is not None and not re.fullmatch(NAME_PATTERN, args.name):
        raise UserError(f"--name {args.name!r}: {NAME_RULE}")
    from aesearch.api import run_search
    from aesearch.locations import local_or_uri
    from aesearch.search.driver import SearchInterrupted, SearchOptions
    from aesearch.search.leaderboard import NothingRan, format_leaderboard
    from aesearch.search.phases import Phases
    from aesearch.tracking.store import resolve_tracking_uri

    name, uri = args.name or space.name, resolve_tracking_uri(args.tracking_uri)
    storage = local_or_uri(args.storage)
    where = SearchOptions(name, storage).experiment_folder  # the search's folder: its leaderboard, Tune's state
    phases = Phases(started=STARTED)
    try:
        board = run_search(space, name=name, storage=storage, tracking_uri=uri, address=args.address,
                           data_dir=args.data_dir, download=args.download, resume=args.resume, phases=phases)
    except SearchInterrupted:
        print(f"aesearch: search {name!r} interrupted; continue it with: aesearch search "
              f"{args.space} --name {name} --storage {storage} --resume"
              + (f" --tracking-uri {uri}" if args.tracking_uri else ""), file=sys.stderr)
        return 130
    except NothingRan as failure:
        print(format_leaderboard(failure.board, space, where=where))
        say_error(failure)
        return EXIT_NOTHING_RAN
    print(format_leaderboard(board, space, where=where))
    ui = "aesearch ui" + (f" --tracking-uri {uri}" if args.tracking_uri else "")
    print(f"mlflow:  experiment {name!r} in {uri} (browse it: {ui})")
    print(f"aesearch: time: {phases.line()}", file=sys.stderr)
    return 0


def cmd_use(args: argparse.Namespace) -> int:
    """`aesearch encode` and `aesearch score`: one output row per input row, in the input's order."""
    from aesearch import api

    options = ({"threshold": args.threshold, "contamination": args.contamination, "data_dir": args.data_dir}
               if args.use == "score" else {})
    table = getattr(api, args.use)(args.model, args.input, args.out, rank=args.rank, run_id=args.run_id,
                                   tracking_uri=args.tracking_uri, device=args.device, **options)
    print(f"aesearch: {args.use}: {len(table)} rows -> {args.out}", file=sys.stderr)
    if "threshold" in table.attrs:
        stated = table.attrs
        print(f"aesearch: score: {int(table['is_anomaly'].sum())} of {len(table)} rows above the threshold "
              f"{stated['threshold']:.6g} ({stated['rule']}; stated in {args.out}.json)", file=sys.stderr)
    print(args.out)
    return 0


def cmd_example(args: argparse.Namespace) -> int:
    from aesearch.examples import EXAMPLES
    from aesearch.shipped import CONFIGS, SPACES, description

    if args.list:
        sections = {"search spaces (aesearch search NAME)": {n: description(SPACES[n]) for n in SPACES.names()},
                    "configs (aesearch train NAME)": {n: description(CONFIGS[n]) for n in CONFIGS.names()},
                    "example datasets (aesearch example NAME)": {n: EXAMPLES[n].description for n in EXAMPLES.names()}}
        for title, lines in sections.items():
            print(f"{title}:", *(f"  {name:<24} {line}" for name, line in lines.items()), sep="\n")
        return 0
    if args.example is None:
        raise UserError("aesearch example: name an example, or --list to see them")
    for registry in (SPACES, CONFIGS):
        if args.example in registry:
            print(registry[args.example].read_text(encoding="utf-8"), end="")
            return 0
    if args.example not in EXAMPLES:
        raise UserError(f"aesearch example {args.example}: not an example dataset, shipped space or config "
                        "(aesearch example --list names them)")
    args.out.mkdir(parents=True, exist_ok=True)
    print(EXAMPLES[args.example].write(args.out))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    """MLflow's own UI, bound to 127.0.0.1; for the embedded store it serves the artifacts too."""
    from aesearch.tracking.store import serve_ui, ui_command

    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port}: must be between 1 and 65535")
    command, uri = ui_command(args.tracking_uri, args.port)
    print(f"aesearch: MLflow UI for {uri} on http://127.0.0.1:{args.port} (Ctrl-C stops it)", file=sys.stderr)
    return serve_ui(command)


def cmd_relocate(args: argparse.Namespace) -> int:
    from aesearch.tracking.relocate import relocate
    from aesearch.tracking.store import resolve_tracking_uri

    done = relocate(resolve_tracking_uri(args.tracking_uri), args.experiment)
    moved = f"moved {done.source} to {done.target}" if done.moved else (
        f"found nothing at {done.source}; its artifacts will be written to {done.target}")
    print(f"aesearch: relocate {done.experiment!r}: {moved} ({done.rows} records of the store updated)",
          file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from aesearch.api import make_report
    from aesearch.results.report import is_partial, status_line

    out = args.out or Path("reports") / args.experiment
    report = make_report(args.experiment, args.tracking_uri, out)
    partial = " (partial: the search is still running)" if is_partial(report) else ""
    print(f"report of {args.experiment!r}{partial}: {status_line(report)}", file=sys.stderr)
    print(out / "index.html")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from aesearch.api import reproduce
    from aesearch.results.reproduce import print_reproduction

    reproduction = reproduce(
        args.experiment, rank=args.rank, run_id=args.run_id, tracking_uri=args.tracking_uri, device=args.device,
        epochs=args.epochs, from_checkpoint=args.from_checkpoint, data_dir=args.data_dir, download=args.download,
        out=args.out,
    )
    print_reproduction(reproduction)
    return 0 if reproduction.reproduced else EXIT_NOT_REPRODUCED


def cmd_validate(args: argparse.Namespace) -> int:
    from aesearch.config import load_config, variant_family
    from aesearch.schema import load_yaml
    from aesearch.search.space import is_search_space, load_space
    from aesearch.shipped import CONFIGS, SPACES, resolve

    failed = 0
    for path in args.files:
        try:
            if is_search_space(load_yaml(resolve(path, SPACES, CONFIGS))):
                space = load_space(path)
                goals = ", ".join(f"{o.metric} {o.mode}" for o in space.objective)
                use = f"use {space.use}: " if space.use else ""
                print(f"{path}: ok (search space {space.name}: {use}{len(space.space)} parameters, "
                      f"{space.budget.num_samples} trials on {space.data.dataset}, objective {goals})")
            else:
                config = load_config(path)
                print(f"{path}: ok ({variant_family(config)}, {config.model.architecture}, {config.data.dataset})")
        except UserError as error:
            say_error(error)
            failed += 1
    return EXIT_USER_ERROR if failed else 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from aesearch.config import on_device, parse_config, resolve_device
    from aesearch.parts.data import load_data
    from aesearch.training.checkpoints import load_checkpoint, load_trained_model
    from aesearch.training.evaluate import evaluate

    state = load_checkpoint(args.checkpoint)
    config = on_device(parse_config(state["config"], source=f"{args.checkpoint} (config)"), args.device)
    device = resolve_device(config.runtime.device)  # before the data: a device that is not here fails at once
    data = load_data(config.data, args.data_dir, args.download)
    trained = load_trained_model(state, data, device=config.runtime.device, where=str(args.checkpoint))
    print(json.dumps({"checkpoint": str(args.checkpoint), "epoch": state["epoch"],
                      **evaluate(trained.model, data.to(device), config.evaluation, config.clustering,
                                 trained.centres)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command; `argv` None means this process's own command line, which it then ends (see `leave`)."""
    settings.apply()  # before Ray or MLflow is imported: their worker processes inherit it
    try:
        args = build_parser().parse_args(argv)
        status = args.handler(args)
    except UserError as error:
        say_error(error)
        status = EXIT_USER_ERROR
    except DivergedError as error:
        print(f"aesearch: {one_line(error)}", file=sys.stderr)
        status = EXIT_DIVERGED
    except KeyboardInterrupt:
        print("aesearch: interrupted", file=sys.stderr)
        status = 130
    if argv is None:
        leave(status)
    return status


def leave(status: int) -> None:
    """End the process now. Python's own ending tears down every module and collects a heap that holds
    torch, Ray and MLflow: seconds after the work is done. The exit handlers (Ray's, MLflow's,
    logging's) still run first; only that teardown is skipped."""
    import atexit
    import logging

    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    main()
