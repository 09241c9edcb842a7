"""Rendering a report: HTML (one self-contained page) and Markdown (pictures in files beside it).
"""

from __future__ import annotations

import base64
import html
import math
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from aesearch.errors import UserError
from aesearch.results.read import TOP, read_search
from aesearch.results.report import Report, build_report, headline, is_partial, status_line
from aesearch.results.tables import RANKED_STATES, reproduce_command
from aesearch.tracking.runs import REPRODUCES_TAG

BOARD_COLUMNS = ["rank", "name", "family", "outcome", "epochs", "objective", "test/recon_mse", "test/psnr",
                 "test/probe_accuracy", "test/nll", "model/parameters"]


def board_view(report: Report, rows: pd.DataFrame, extra: tuple[str, ...] = ()) -> pd.DataFrame:
    """Leaderboard rows as shown: the objective under its own name, the reproduce command last."""
    metric, _ = report.record.objective
    columns = [c for c in BOARD_COLUMNS + list(extra) if c in rows]
    view = rows[columns].rename(columns={"objective": metric, "name": "trial"}).copy()
    view["reproduce"] = [reproduce_command(report.record.experiment, r, report.record.uri) for r in rows["run_id"]]
    return view


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
        families["vs winner"] = [("winner" if i == 0 else f"{100 * g:+.1f}%") for i, g in enumerate(families["vs winner"])]
    best = report.best_metrics.copy()
    best["reproduce"] = [reproduce_command(report.record.experiment, r, report.record.uri) for r in best["run_id"]]
    broken = report.trials[~report.trials["state"].isin(RANKED_STATES)][["name", "family", "state", "outcome", "epochs",
                                                                          "run_id"]]
    tables = [
        ("families", f"Best trial per variant family (on {metric}, {mode})", families),
        ("overall", f"Top {min(10, len(report.board))} trials overall", board_view(report, report.board.head(10))),
        ("metrics", "Best trial on each evaluation metric", best.drop(columns=["run_id"])),
    ]
    if len(report.seeds):
        tables.append(("seeds", "Mean ± std over seeds (configurations trained with several seeds)", report.seeds))
    if len(broken):
        tables.append(("unranked", "Trials not ranked (running, diverged, errored, invalid)", broken))
    if len(report.importance):
        tables.append(("importance", f"Hyperparameter importance for {metric} (Optuna)", report.importance))
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
    return (f"ASHA (grace period {asha['grace_period']}, reduction factor {asha['reduction_factor']}, "
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
    rows = [("reconstructions", "Reconstructions of the top trials (rows: original, model input, reconstruction)", recon)]
    if prior:
        rows.append(("prior", "VAE prior samples: decodes of z ~ N(0, I)", prior))
    return rows


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1400px;color:#1b1b1b;
padding:0 1rem}h1{margin-bottom:.2rem}.meta{color:#555;font-size:.9rem}.banner{background:#fff3cd;border:1px solid
#e0c36c;padding:.6rem 1rem;border-radius:6px}.headline{background:#eef5ff;border-left:4px solid #3b6fd8;padding:.6rem
1rem}table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0 1.5rem}th,td{border:1px solid #ccc;padding:.25rem
.5rem;text-align:left;vertical-align:top;white-space:nowrap}th{background:#f3f3f3}td code{font-size:.75rem;white-space:nowrap}
.scroll{overflow-x:auto}.figures{display:grid;
grid-template-columns:repeat(auto-fill,minmax(480px,1fr));gap:1rem}figure{margin:0}figure img{max-width:100%;
border:1px solid #ddd}.pictures{display:flex;flex-wrap:wrap;gap:1rem}.pictures img{image-rendering:pixelated;
width:260px;border:1px solid #ddd}
""".replace("\n", "")


def render_html(report: Report) -> str:
    """The report as one self-contained page: figures and pictures embedded as data URIs."""
    record = report.record
    esc = html.escape

    def data_uri(png: bytes) -> str:
        return "data:image/png;base64," + base64.b64encode(png).decode("ascii")

    def table(frame: pd.DataFrame) -> str:
        head = "".join(f"<th>{esc(str(c))}</th>" for c in frame.columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{_cell(c, v)}</td>" for c, v in row.items()) + "</tr>" for _, row in frame.iterrows()
        )
        return f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"

    def _cell(column: str, value: Any) -> str:
        text = esc(_format(value))
        return f"<code>{text}</code>" if column in ("reproduce", "run_id") else text

    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>aesearch report: {esc(record.experiment)}"
             f"</title><style>{STYLE}</style></head><body>",
             f"<h1>Search <code>{esc(record.experiment)}</code></h1>",
             f"<p class='meta'>{esc(_meta(report))}</p>"]
    if is_partial(report):
        parts.append(f"<p class='banner'>Partial report: the search is still running ({esc(status_line(report))}). "
                     "Run <code>aesearch report</code> again for the rest (if its driver was killed, "
                     "<code>aesearch search ... --resume</code> finishes it).</p>")
    parts.append("<div class='headline'>" + "".join(f"<p>{_bold(esc(line))}</p>" for line in headline(report)) + "</div>")
    if len(report.board):
        command = reproduce_command(record.experiment, report.board.iloc[0]["run_id"], record.uri)
        parts.append(f"<p>Reproduce the winner on this machine: <code>{esc(command)}</code></p>")
    for anchor, title, frame in _tables(report):
        parts.append(f"<h2 id='{anchor}'>{esc(title)}</h2>{table(frame)}")
    parts.append(f"<h2 id='asha'>Early stopping</h2><p>{esc(asha_text(report.asha))}</p>")
    parts.append("<h2 id='figures'>Figures</h2><div class='figures'>")
    for stem, (caption, png) in report.figures.items():
        parts.append(f"<figure id='fig-{stem}'><img alt='{esc(caption)}' src='{data_uri(png)}'>"
                     f"<figcaption>{esc(caption)}</figcaption></figure>")
    parts.append("</div>")
    if report.not_drawn:
        parts.append("<p class='meta'>Not drawn: " + "; ".join(f"{esc(c)} ({esc(w)})" for c, w in report.not_drawn.items())
                     + "</p>")
    for _, title, pictures in _picture_rows(report):
        parts.append(f"<h2>{esc(title)}</h2><div class='pictures'>")
        parts += [f"<figure><img alt='{esc(c)}' src='{data_uri(png)}'><figcaption>{esc(c)}</figcaption></figure>"
                  for c, png in pictures]
        parts.append("</div>")
    parts.append(f"<p class='meta'>Generated by aesearch report on {esc(report.generated)}.</p></body></html>")
    return "\n".join(parts)


def _bold(escaped: str) -> str:
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escaped)


def _meta(report: Report) -> str:
    record = report.record
    params, tags = record.search.get("params", {}), record.search.get("tags", {})
    dataset = params.get("dataset", "?")
    return (f"{dataset} (fingerprint {params.get('dataset_fingerprint', '?')}) · {status_line(report)} · objective "
            f"{record.objective[0]} ({record.objective[1]}) · code {tags.get('git_commit', '?')[:12]} · tracking "
            f"{record.uri}")


def render_markdown(report: Report, pictures: dict[Any, str]) -> str:
    """The report in Markdown; `pictures` maps each figure stem, and each (kind, caption) of a
    picture, to its file."""
    record = report.record

    def table(frame: pd.DataFrame) -> str:
        def cell(column: str, value: Any) -> str:
            text = _format(value).replace("|", "\\|")
            return f"`{text}`" if column in ("reproduce", "run_id") else text

        lines = ["| " + " | ".join(str(c) for c in frame.columns) + " |", "|" + "---|" * len(frame.columns)]
        lines += ["| " + " | ".join(cell(c, v) for c, v in row.items()) + " |" for _, row in frame.iterrows()]
        return "\n".join(lines)

    out = [f"# Search `{record.experiment}`", "", _meta(report), ""]
    if is_partial(report):
        out += [f"> **Partial report**: the search is still running ({status_line(report)}).", ""]
    out += [line + "\n" for line in headline(report)]
    if len(report.board):
        out += [f"Reproduce the winner: `{reproduce_command(record.experiment, report.board.iloc[0]['run_id'], record.uri)}`",
                ""]
    for _, title, frame in _tables(report):
        out += [f"## {title}", "", table(frame), ""]
    out += ["## Early stopping", "", asha_text(report.asha), "", "## Figures", ""]
    for stem, (caption, _) in report.figures.items():
        out += [f"![{caption}]({pictures[stem]})", "", f"*{caption}*", ""]
    if report.not_drawn:
        out += ["Not drawn: " + "; ".join(f"{c} ({w})" for c, w in report.not_drawn.items()), ""]
    for kind, title, shown in _picture_rows(report):
        out += [f"## {title}", "", " ".join(f"![{c}]({pictures[kind, c]})" for c, _ in shown), "",
                " · ".join(c for c, _ in shown), ""]
    return "\n".join(out)


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
