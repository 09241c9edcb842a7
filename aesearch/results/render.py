"""Rendering a report: HTML (one self-contained page) and Markdown (pictures in files beside it).

This module decides what the report says: which tables, under which captions, in which order, and
how a value is shown. How that is spelled lives elsewhere, so the two stay apart: the page skeleton,
its styling and the Markdown layout are Jinja templates in templates/ (report.html, report.css,
report.md), and HTML tables are pandas' own (Styler, which escapes cells and headers).
"""

from __future__ import annotations

import base64
import math
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd
from markupsafe import Markup
from pandas.io.formats.style import Styler

from aesearch.errors import UserError
from aesearch.metrics import resolved
from aesearch.results.read import TOP, read_search
from aesearch.results.report import BOLD, Report, board_view, build_report, headline, is_partial, status_line
from aesearch.results.tables import reproduce_command
from aesearch.tracking.outcomes import RANKED
from aesearch.tracking.runs import REPRODUCES_TAG

CODE_COLUMNS = ("reproduce", "run_id")  # shown as code: commands to paste, ids to look up


def leaderboard_csv(report: Report) -> str:
    """Every trial, ranked ones first: identity, outcome, objective, every metric, the command."""
    metric, _ = report.record.objective
    ranks = dict(zip(report.board["run_id"], report.board["rank"]))
    table = report.trials.drop(columns=["config", "started"]).assign(rank=report.trials["run_id"].map(ranks))
    table = table.sort_values(["rank", "number"], na_position="last", kind="stable")
    table["reproduce"] = [reproduce_command(report.record.experiment, r, report.record.uri) for r in table["run_id"]]
    first = ["rank", "name", "family", "state", "outcome", "epochs", "objective"]
    table = table[first + [c for c in table.columns if c not in first and c != metric]]  # the metric once
    return table.rename(columns={"objective": metric}).to_csv(index=False)


def _format(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "-"
        return f"{value:.0f}" if value.is_integer() and abs(value) >= 1000 else f"{value:.4g}"
    if value is None:
        return "-"
    return str(value)


def _tables(report: Report) -> list[tuple[str, str, pd.DataFrame]]:
    """(anchor, title, table) in the order the report shows them."""
    metric, mode = report.record.objective
    families = board_view(report, report.families, ("vs winner",))
    if "vs winner" in families:
        winner = report.families["objective"].iloc[0]
        gaps = zip(families["vs winner"], report.families["objective"])
        families["vs winner"] = [("winner" if i == 0 else "tie" if resolved(metric, value) == resolved(metric, winner)
                                  else f"{100 * gap:+.1f}%") for i, (gap, value) in enumerate(gaps)]
    best = report.best_metrics.copy()
    best["reproduce"] = [reproduce_command(report.record.experiment, r, report.record.uri) for r in best["run_id"]]
    broken = report.trials[~report.trials["state"].isin(RANKED)][["name", "family", "state", "outcome", "epochs",
                                                                          "run_id"]]
    tables = []
    objectives = report.record.objectives
    if len(report.front):
        goals = ", ".join(f"{m} ({'lower' if d == 'min' else 'higher'} is better)" for m, d in objectives)
        front = board_view(report, report.front, tuple(m for m, _ in objectives))
        first = ["rank", "trial", "family", "outcome", "epochs", *(m for m, _ in objectives)]
        front = front[first + [c for c in front.columns if c not in first]]
        tables += [("front", f"Pareto front on {goals}: completed trials no other beats on every objective", front),
                   ("per_objective", "Best trial on each objective", report.best_objectives.drop(columns=["run_id"]))]
    tables += [
        ("families", f"Best trial per variant family (on {metric}, {mode})", families),
        ("overall", f"Top {min(10, len(report.board))} trials overall", board_view(report, report.board.head(10))),
        ("metrics", "Best trial on each evaluation metric", best.drop(columns=["run_id"])),
    ]
    if len(report.seeds):
        tables.append(("seeds", "Mean ± std over seeds (configurations trained with several seeds)", report.seeds))
    if len(broken):
        tables.append(("unranked", "Trials not ranked (running, diverged, errored, invalid)", broken))
    if len(report.importance):
        over = report.importance.attrs.get("over")
        tables.append(("importance", f"Hyperparameter importance for {metric} (Optuna{', over ' + over if over else ''})",
                       report.importance))
    reproductions = reproduction_table(report)
    if len(reproductions):
        tables.append(("reproductions", "Reproductions of trials (aesearch reproduce)", reproductions))
    return tables


def reproduction_table(report: Report) -> pd.DataFrame:
    runs = report.record.reproductions
    if runs.empty:
        return pd.DataFrame()
    names = dict(zip(report.trials["run_id"], report.trials["name"]))
    tag = lambda name: runs.get(f"tags.{name}", pd.Series([""] * len(runs)))  # noqa: E731
    return pd.DataFrame({
        "of trial": [names.get(r, r) for r in tag(REPRODUCES_TAG)],
        "how": tag("mode"), "device": tag("device"), "verdict": tag("verdict"),
        "largest difference": tag("largest_difference"), "run_id": runs["run_id"],
    })


def asha_text(asha: dict[str, Any]) -> str:
    stops = ", ".join(f"{n} at epoch {e}" for e, n in asha["stopped_at"].items()) or "none"
    brackets = "1 bracket" if str(asha["brackets"]) == "1" else f"{asha['brackets']} brackets"
    return (f"ASHA (grace period {asha['grace_period']}, reduction factor {asha['reduction_factor']}, {brackets}, "
            f"at most {asha['max_epochs']} epochs) stopped trials early: {stops}; {asha['completed']} ran to the "
            f"end, {asha['diverged']} diverged. Epochs trained: {asha['epochs_trained']} of "
            f"{asha['epochs_full_budget']} for training every trial fully ({100 * asha['saved']:.0f}% saved).")


def _picture_rows(report: Report) -> list[tuple[str, str, list[tuple[str, bytes]]]]:
    """(kind, title, [(caption, PNG)]) for reconstructions of the top trials and VAE prior samples."""
    images, board = report.record.images, report.board
    recon = [(f"#{r.rank} {r.name}", images[r.run_id]["reconstructions.png"])
             for r in board.head(TOP).itertuples() if "reconstructions.png" in images.get(r.run_id, {})]
    prior = [(f"#{r.rank} {r.name}", images[r.run_id]["prior_samples.png"])
             for r in board.itertuples() if "prior_samples.png" in images.get(r.run_id, {})][:TOP]
    top = [(f"#{r.rank} {r.name}", images.get(r.run_id, {})) for r in board.head(TOP).itertuples()]
    scored = [(f"#{r.rank} {r.name} ({r.anomaly_score})", images.get(r.run_id, {})) for r in board.head(TOP).itertuples()]
    rows = [
        ("reconstructions", "Reconstructions of the top trials (rows: original, model input, reconstruction)", recon),
        ("prior", "VAE prior samples: decodes of z ~ N(0, I)", prior),
        ("anomalies", "Anomaly scores of normal and anomalous test inputs (top trials)",
         [(caption, drawn["anomaly_scores.png"]) for caption, drawn in scored if "anomaly_scores.png" in drawn]),
        ("features", "Reconstruction error per column (top trials)",
         [(caption, drawn["feature_errors.png"]) for caption, drawn in top if "feature_errors.png" in drawn]),
    ]
    return [row for row in rows if row[2]]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def _meta(report: Report) -> str:
    record = report.record
    params, tags = record.search.get("params", {}), record.search.get("tags", {})
    dataset = params.get("dataset", "?")
    if params.get("data.binarize", "none") != "none":  # the protocol the NLL figures were trained under
        dataset += f", binarised {params['data.binarize']}"
    return (f"{dataset} (fingerprint {params.get('dataset_fingerprint', '?')}) · {status_line(report)} · objective "
            f"{', '.join(f'{m} ({d})' for m, d in record.objectives)} · code {tags.get('git_commit', '?')[:12]} · tracking "
            f"{record.uri}")


def _contents(report: Report) -> dict[str, Any]:
    """What both renderings say, in their order; table cells as shown (`_format`ed strings)."""
    record = report.record
    winner = (reproduce_command(record.experiment, report.board.iloc[0]["run_id"], record.uri)
              if len(report.board) else None)
    return {
        "experiment": record.experiment, "meta": _meta(report),
        "partial": status_line(report) if is_partial(report) else None,
        "headline": headline(report), "winner": winner,
        "tables": [(anchor, title, frame.map(_format)) for anchor, title, frame in _tables(report)],
        "code_columns": CODE_COLUMNS, "asha": asha_text(report.asha),
        "not_drawn": list(report.not_drawn.items()), "generated": report.generated,
    }


# --- rendering: the page skeleton, styling and table markup are in templates/ ----------------------

_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("aesearch.results", "templates"),
    autoescape=jinja2.select_autoescape(["html"]),  # report.html; never report.md
    undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
)
_TEMPLATES.filters["data_uri"] = lambda png: "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _html_table(shown: pd.DataFrame, anchor: str) -> Markup:
    """A table by pandas' Styler: cells and headers escaped, commands and run ids in class `code`."""
    shown = shown.reset_index(drop=True)
    code = pd.DataFrame([["code" if c in CODE_COLUMNS else "" for c in shown.columns]] * len(shown),
                        columns=shown.columns)
    styler = Styler(shown, uuid=anchor, cell_ids=False).hide(axis="index").set_td_classes(code)
    return Markup(styler.format(escape="html").format_index(escape="html", axis="columns").to_html())


def _emphasis(line: str) -> list[tuple[str, bool]]:
    """A headline's **bold** spans as (text, bold) pieces."""
    return [(text, i % 2 == 1) for i, text in enumerate(BOLD.split(line)) if text]


def render_html(report: Report) -> str:
    """The report as one self-contained page: figures and pictures embedded as data URIs."""
    contents = _contents(report)
    return _TEMPLATES.get_template("report.html").render(
        contents,
        headline=[_emphasis(line) for line in contents["headline"]],
        tables=[(anchor, title, _html_table(shown, anchor)) for anchor, title, shown in contents["tables"]],
        figures=[(stem, caption, png) for stem, (caption, png) in report.figures.items()],
        pictures=_picture_rows(report),
    )


def render_markdown(report: Report, pictures: dict[Any, str]) -> str:
    """The report in Markdown; `pictures` maps each figure stem, and each (kind, caption) of a
    picture, to its file."""
    contents = _contents(report)
    return _TEMPLATES.get_template("report.md").render(
        contents,
        tables=[(title, shown) for _, title, shown in contents["tables"]],
        figures=[(caption, pictures[stem]) for stem, (caption, _) in report.figures.items()],
        pictures=[(title, [(c, pictures[kind, c]) for c, _ in shown]) for kind, title, shown in _picture_rows(report)],
    )


def write_report(report: Report, out: Path) -> Path:
    """Write index.html, report.md, leaderboard.csv, figures/ and images/ into `out`, replacing an
    earlier report there. Written beside it first and swapped in, so a failure leaves the old one."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "index.html").is_file())):
        raise UserError(f"--out {out}: exists and is not an aesearch report folder; choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staging.chmod(0o755)
    try:
        pictures: dict[Any, str] = {}
        (staging / "figures").mkdir()
        for stem, (_, png) in report.figures.items():
            (staging / "figures" / f"{stem}.png").write_bytes(png)
            pictures[stem] = f"figures/{stem}.png"
        (staging / "images").mkdir()
        for kind, _, shown in _picture_rows(report):
            for caption, png in shown:
                name = f"images/{_slug(caption)}-{kind}.png"
                (staging / name).write_bytes(png)
                pictures[kind, caption] = name
        (staging / "index.html").write_text(render_html(report), encoding="utf-8")
        (staging / "report.md").write_text(render_markdown(report, pictures), encoding="utf-8")
        (staging / "leaderboard.csv").write_text(leaderboard_csv(report), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def make_report(experiment: str, uri: str, out: Path) -> Report:
    """Read the search from MLflow and write its report into `out`."""
    report = build_report(read_search(uri, experiment))
    write_report(report, out)
    return report
