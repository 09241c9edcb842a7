"""The report: pure functions from a runs DataFrame (in `mlflow.search_runs`' own layout) to tables,
figures and files, tested here without Ray; then a report of the shared real search, read from its
MLflow store and opened in headless Chromium."""

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from mlflow import MlflowClient

from aesearch.errors import UserError
from aesearch.locations import sqlite_uri
from aesearch.metrics import lookup
from aesearch.results import plots
from aesearch.results.read import SearchRecord
from aesearch.results.render import write_report
from aesearch.results.report import board_view, build_report, headline
from aesearch.results.tables import (
    asha_summary,
    best_per_family,
    best_per_metric,
    importances,
    leaderboard,
    parse_param,
    seed_summary,
    trial_table,
)
from aesearch.search.space import SearchSpace
from aesearch.tracking.outcomes import Outcome
from aesearch.tracking.runs import as_param
from tests.browser import open_page
from tests.searching import run_at_once

# --- a search's runs, as mlflow.search_runs returns them ----------------------------------------


def run_row(number: int, family: str, outcome: Outcome | None, objective: float | None, epochs: int, *, latent="deterministic",
            status="FINISHED", seed=0, lr=0.001, latent_dim=16, beta=None, noise="none", level=None, **metrics):
    row = {
        "run_id": f"run{number:03d}", "status": status, "start_time": pd.Timestamp(2026, 1, 1) + pd.Timedelta(minutes=number),
        "tags.mlflow.runName": f"{family}-#{number}", "tags.aesearch.trial_number": str(number),
        "tags.family": family, "tags.architecture": "dense", "tags.latent": latent, "tags.objective": "mse",
        "params.seed": as_param(seed), "params.name": "search", "params.optimizer.lr": as_param(lr),
        "params.model.latent_dim": as_param(latent_dim), "params.model.latent": latent,
        "params.objective.kl.beta": as_param(beta if beta is not None else 1.0),
        "params.objective.kl.schedule": "linear", "params.corruption.kind": noise, "params.corruption.level": as_param(level),
        "metrics.epoch": float(epochs),
    }
    if outcome is not None:
        row |= {f"tags.{name}": value for name, value in outcome.tags().items()}
    if objective is not None:
        row["metrics.val/recon_mse"] = objective
    row.update({f"metrics.{name.replace('__', '/')}": value for name, value in metrics.items()})
    return row


def runs_frame(*rows) -> pd.DataFrame:
    return pd.DataFrame(list(rows))


SEARCH = {"run_id": "parent", "status": "FINISHED",
          "params": {"objective.metric": "val/recon_mse", "objective.mode": "min", "budget.max_epochs": "8",
                     "budget.grace_period": "2", "budget.reduction_factor": "2", "dataset": "digits"},
          "tags": {"git_commit": "abc"}}


def a_search() -> pd.DataFrame:
    return runs_frame(
        run_row(1, "conv", Outcome("completed"), 0.010, 8, test__recon_mse=0.011, test__psnr=20.0, test__nll=np.nan,
                test__denoise_psnr_gaussian=15.0, model__parameters=5000.0),
        run_row(2, "dense", Outcome("completed"), 0.020, 8, latent_dim=32, test__recon_mse=0.021, test__psnr=22.0,
                test__denoise_psnr_gaussian=17.0, model__parameters=2000.0),
        run_row(3, "dense", Outcome("stopped", 2), 0.050, 2),
        run_row(4, "vae", Outcome("diverged", 3), 0.001, 3, latent="gaussian", beta=4.0),  # broke: never ranked
        run_row(5, "vae", Outcome("stopped", 4), 0.030, 4, latent="gaussian", beta=2.0, val__kl=3.0),
        run_row(6, "denoising", None, 0.005, 5, status="RUNNING", noise="gaussian", level=0.3),
    )


# --- tables -------------------------------------------------------------------------------------------


def test_params_read_back_as_the_config_values_they_were_logged_from():
    for value in (16, 0.001, 1e-05, [256, 128], True, False, None, "dense", 0.0, "sigmoid"):
        assert parse_param(as_param(value)) == value


def test_the_leaderboard_ranks_finished_trials_on_the_objective_and_leaves_broken_and_running_ones_out():
    trials = trial_table(a_search(), "val/recon_mse")
    board = leaderboard(trials, [("val/recon_mse", "min")])
    assert list(board["name"]) == ["conv-#1", "dense-#2", "vae-#5", "dense-#3"]
    assert list(board["rank"]) == [1, 2, 3, 4]
    states = dict(zip(trials["name"], trials["state"]))
    assert states["vae-#4"] == "diverged" and states["denoising-#6"] == "running" and states["dense-#3"] == "stopped"
    assert list(leaderboard(trials, [("val/recon_mse", "max")])["name"]) == ["dense-#3", "vae-#5", "dense-#2", "conv-#1"]


def test_the_best_of_each_family_is_measured_against_the_winner():
    families = best_per_family(leaderboard(trial_table(a_search(), "val/recon_mse"), [("val/recon_mse", "min")]))
    assert list(families["family"]) == ["conv", "dense", "vae"]
    assert list(families["vs winner"]) == pytest.approx([0.0, 1.0, 2.0])  # 0.02 is 100% above 0.01


def saturated_record() -> SearchRecord:
    """An anomaly search whose every trial reached val/anomaly_auroc = 1: ranked by their kept val/loss."""
    search = {**SEARCH, "params": {**SEARCH["params"], "objective.metric": "val/anomaly_auroc", "objective.mode": "max"}}
    runs = runs_frame(*(run_row(number, family, Outcome("completed"), None, 8, val__anomaly_auroc=auroc,
                                val__loss=loss, best__val__loss=loss, best__epoch=kept)
                        for number, family, auroc, loss, kept in [(1, "conv", 1.0, 5.3, 1), (2, "dense", 1.0, 1.5, 8),
                                                                   (3, "vae", 0.9998, 1.9, 7), (4, "dense", 0.97, 1.0, 8)]))
    return SearchRecord("demo", "sqlite:////nowhere/mlflow.db", search, None, runs)


def test_the_headline_says_when_the_leaders_tie_and_how_they_were_ranked(tmp_path):
    report = build_report(saturated_record())
    assert list(report.board["name"]) == ["dense-#2", "vae-#3", "conv-#1", "dense-#4"]
    lines = headline(report)
    assert lines[0].startswith("**dense** wins: trial dense-#2 reaches val/anomaly_auroc = 1 (higher is better) "
                               "after 8 epochs (weights of epoch 8 kept).")
    assert ("3 trials tie at val/anomaly_auroc = 1.000, the best it can be; ranked by val/loss at their kept epoch "
            "(lower is better): the winner's 1.5.") in lines
    assert ("The best other family, vae (vae-#3), ties with the winner at val/anomaly_auroc = 1.000 and is ranked "
            "below it by val/loss (1.9 against 1.5).") in lines
    assert not any("than the winner" in line for line in lines)
    families = (write_report(report, tmp_path / "demo") / "report.md").read_text()
    assert "| tie |" in families and "+0.0%" not in families


def test_a_detection_board_names_each_trials_anomaly_score_and_others_do_not(tmp_path):
    record = saturated_record()
    scorers = ["knn", None, "combined", "mahalanobis"]  # None: a trial of an aesearch without scorers
    record.runs["params.evaluation.anomaly_score"] = scorers
    report = build_report(record)
    board = report.board.set_index("name")["anomaly_score"]
    assert board.to_dict() == {"conv-#1": "knn", "dense-#2": "reconstruction", "vae-#3": "combined",
                               "dense-#4": "mahalanobis"}
    markdown = (write_report(report, tmp_path / "demo") / "report.md").read_text()
    overall = markdown[markdown.index("Top 4 trials overall"):]
    assert "| anomaly_score |" in overall.splitlines()[2] and "| combined |" in overall
    plain = build_report(SearchRecord("demo", "sqlite:////nowhere/mlflow.db", SEARCH, None, a_search()))
    assert "anomaly_score" not in board_view(plain, plain.board)


def test_a_clustering_board_names_each_trials_clustering_stage(tmp_path):
    search = {**SEARCH, "params": {**SEARCH["params"], "objective.metric": "val/cluster_ari", "objective.mode": "max"}}
    runs = runs_frame(*(run_row(number, "dense", Outcome("completed"), None, 8, val__cluster_ari=ari,
                                test__cluster_ari=ari, val__loss=1.0)
                        for number, ari in [(1, 0.5), (2, 0.7), (3, 0.6)]))
    runs["params.clustering.clusterer"] = ["gmm", "umap_gmm", None]  # None: a trial of an aesearch without the stage
    runs["params.clustering.refinement"] = ["none", "idec", None]
    report = build_report(SearchRecord("demo", "sqlite:////nowhere/mlflow.db", search, None, runs))
    view = board_view(report, report.board)
    assert view.set_index("trial")["clustering"].to_dict() == {"dense-#2": "umap_gmm + idec", "dense-#3": "kmeans",
                                                               "dense-#1": "gmm"}
    assert "clustering" not in board_view(build_report(saturated_record()), build_report(saturated_record()).board)


def test_a_report_shows_itself_in_a_notebook_as_its_headline_and_top_trials_not_its_figures():
    report = build_report(saturated_record())
    assert report.figures  # PNG bytes a dataclass's repr would print whole
    assert repr(report) == ("<Report of demo: 4 trials (4 completed); search run FINISHED. dense wins: trial dense-#2 "
                            "reaches val/anomaly_auroc = 1 (higher is better) after 8 epochs (weights of epoch 8 kept).>")
    page = report._repr_html_()
    assert "<b>dense</b> wins" in page and page.count("<tr") == 1 + 4 and "base64" not in page
    assert page.index("dense-#2") < page.index("vae-#3") < page.index("conv-#1")  # ranked as the board


def test_the_reports_leaderboards_show_the_test_counterpart_of_the_objective(tmp_path):
    search = {**SEARCH, "params": {**SEARCH["params"], "objective.metric": "val/cluster_ari", "objective.mode": "max"}}
    runs = runs_frame(*(run_row(number, "dense", Outcome("completed"), None, 8, val__cluster_ari=ari,
                                test__cluster_ari=ari - 0.1, test__recon_mse=0.02, test__cluster_nmi=0.4)
                        for number, ari in [(1, 0.5), (2, 0.7)]))
    page = (write_report(build_report(SearchRecord("demo", "sqlite:////nowhere/mlflow.db", search, None, runs)),
                         tmp_path / "demo") / "report.md").read_text()
    overall = page[page.index("Top 2 trials overall"):].splitlines()
    header = next(line for line in overall if line.startswith("| rank"))
    cells = [cell.strip() for cell in header.strip("|").split("|")]
    assert cells[cells.index("val/cluster_ari") + 1] == "test/cluster_ari" and "test/recon_mse" in cells
    assert "test/cluster_nmi" not in cells  # in the table of each metric's best, not on the board


def test_the_best_trial_on_each_metric_follows_that_metrics_direction():
    best = best_per_metric(trial_table(a_search(), "val/recon_mse")).set_index("metric")
    assert best.loc["test/recon_mse", "trial"] == "conv-#1"  # lower is better
    assert best.loc["test/psnr", "trial"] == "dense-#2"  # higher is better
    assert best.loc["test/denoise_psnr_gaussian", "trial"] == "dense-#2"  # found by its prefix
    assert best.loc["model/parameters", "trial"] == "dense-#2"
    assert "test/nll" not in best.index  # no trial has a value


def test_configurations_trained_with_several_seeds_get_mean_and_std():
    runs = runs_frame(
        run_row(1, "dense", Outcome("completed"), 1.0, 8, seed=0),
        run_row(2, "dense", Outcome("completed"), 3.0, 8, seed=1),
        run_row(3, "dense", Outcome("completed"), 9.0, 8, seed=0, lr=0.01),  # another configuration, one seed
    )
    table = seed_summary(trial_table(runs, "val/recon_mse"), ["objective"])
    assert len(table) == 1
    row = table.iloc[0]
    assert row["seeds"] == "0, 1" and row["trials"] == 2
    assert row["objective"] == f"2 ± {np.std([1.0, 3.0], ddof=1):.2g}"


def test_the_asha_summary_counts_stops_per_rung_and_the_epochs_saved():
    asha = asha_summary(trial_table(a_search(), "val/recon_mse"), SEARCH["params"])
    assert asha["stopped_at"] == {2: 1, 4: 1}
    assert asha["completed"] == 2 and asha["diverged"] == 1
    assert asha["epochs_trained"] == 8 + 8 + 2 + 3 + 4 + 5
    assert asha["epochs_full_budget"] == 6 * 8
    assert asha["saved"] == pytest.approx(1 - 30 / 48)


def test_the_pareto_front_keeps_exactly_the_points_nothing_beats_on_both_axes():
    points = pd.DataFrame({"x": [8, 16, 16, 32, 64, 64], "y": [0.5, 0.3, 0.4, 0.35, 0.1, 0.2]})
    front = plots.pareto_front(points, "x", "y")
    assert list(zip(front["x"], front["y"])) == [(8, 0.5), (16, 0.3), (64, 0.1)]


def test_importance_replays_the_trials_through_the_spaces_define_by_run_function():
    space = SearchSpace.model_validate({
        "name": "s",
        "space": {"optimizer.lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
                  "model.latent_dim": {"type": "categorical", "choices": [8, 16]},
                  "model.hidden_dims": {"type": "categorical", "choices": [[32], [64, 32]]},
                  "objective.kl.beta": {"type": "float", "low": 0.5, "high": 4, "when": {"model.latent_dim": 16}}},
    })
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        lr = float(10 ** rng.uniform(-4, -1))
        row = run_row(i + 1, "dense", Outcome("completed"), objective=-np.log10(lr) + 0.01 * rng.normal(), epochs=4, lr=lr,
                      latent_dim=int(rng.choice([8, 16])))
        row["params.model.hidden_dims"] = as_param([32] if i % 2 else [64, 32])
        rows.append(row)
    table = importances(leaderboard(trial_table(runs_frame(*rows), "val/recon_mse"), [("val/recon_mse", "min")]), space, "min")
    assert table.iloc[0]["parameter"] == "optimizer.lr"  # the objective depends on lr alone
    assert table.iloc[0]["fanova"] > 0.8
    assert set(table["parameter"]) == {"optimizer.lr", "model.latent_dim", "model.hidden_dims"}  # beta is conditional


def test_importance_over_a_large_search_is_computed_on_a_seeded_sample_and_says_so(monkeypatch):
    """fANOVA's forests grow with the trials (71 s at 2,000 here): beyond IMPORTANCE_TRIALS, a sample."""
    from aesearch.results import tables

    space = SearchSpace.model_validate({
        "name": "s", "space": {"optimizer.lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
                               "model.latent_dim": {"type": "categorical", "choices": [8, 16]}}})
    rng = np.random.default_rng(1)
    rows = []
    for i in range(40):
        lr = float(10 ** rng.uniform(-4, -1))
        rows.append(run_row(i + 1, "dense", Outcome("completed"), objective=-np.log10(lr) + 0.01 * rng.normal(), epochs=4,
                            lr=lr, latent_dim=int(rng.choice([8, 16]))))
    board = leaderboard(trial_table(runs_frame(*rows), "val/recon_mse"), [("val/recon_mse", "min")])
    monkeypatch.setattr(tables, "IMPORTANCE_TRIALS", 25)
    sampled = importances(board, space, "min")
    assert sampled.attrs["over"] == "a random 25 of the 40 trials"
    assert sampled.iloc[0]["parameter"] == "optimizer.lr" and sampled.iloc[0]["fanova"] > 0.8
    assert importances(board, space, "min")["fanova"].tolist() == sampled["fanova"].tolist()  # the same sample each time
    monkeypatch.setattr(tables, "IMPORTANCE_TRIALS", 40)
    assert importances(board, space, "min").attrs["over"] == ""  # every trial: nothing to say
    report = build_report(SearchRecord("demo", "sqlite:////nowhere/mlflow.db", SEARCH, space, runs_frame(*rows)))
    monkeypatch.setattr(tables, "IMPORTANCE_TRIALS", 25)
    sampled_report = build_report(SearchRecord("demo", "sqlite:////nowhere/mlflow.db", SEARCH, space, runs_frame(*rows)))
    assert not any("over a random" in line for line in headline(report))
    assert any("(fANOVA importance, over a random 25 of the 40 trials)" in line for line in headline(sampled_report))


def test_an_objective_that_did_not_vary_has_no_importance_and_the_report_says_so():
    space = SearchSpace.model_validate({
        "name": "s",
        "space": {"optimizer.lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
                  "model.latent_dim": {"type": "categorical", "choices": [8, 16]}},
    })
    rng = np.random.default_rng(0)
    runs = runs_frame(*(run_row(i + 1, "dense", Outcome("completed"), 1.0, 4, lr=float(10 ** rng.uniform(-4, -1)),
                                latent_dim=int(rng.choice([8, 16]))) for i in range(8)))
    report = build_report(SearchRecord("demo", "sqlite:////nowhere/mlflow.db", SEARCH, space, runs))
    assert report.importance.empty  # Optuna would give each of the two parameters 0.5
    assert report.not_drawn["Hyperparameter importance (Optuna)"] == "the objective did not vary; no importance"
    assert not any("What mattered most" in line for line in headline(report))


def test_bounded_metrics_are_drawn_on_a_linear_axis_and_the_others_on_a_log_one_where_positive():
    board = leaderboard(trial_table(a_search(), "val/recon_mse"), [("val/recon_mse", "min")])
    curves = a_record().curves
    for metric, scale in (("val/anomaly_auroc", "linear"), ("val/knn_accuracy", "linear"), ("val/recon_mse", "log")):
        assert plots.search_progress(board, metric=metric, mode="min").axes[0].get_yscale() == scale, metric
        assert plots.learning_curves(board, curves, metric=metric).axes[0].get_yscale() == scale, metric
    assert lookup("val/anomaly_auroc").bounded and lookup("test/cluster_accuracy").bounded
    assert not lookup("val/recon_mse").bounded and not lookup("test/psnr").bounded


def test_the_latent_size_front_is_titled_and_drawn_by_the_metric_it_plots():
    board = pd.DataFrame({"latent_dim": [4, 8, 16, 32], "objective": [0.7, 0.9, 0.8, 0.95], "family": "dense",
                          "state": "completed"})
    axes = plots.latent_size_front(board, metric="val/anomaly_auroc", mode="max").axes[0]
    assert axes.get_title() == "Pareto front: val/anomaly_auroc vs latent size"
    assert axes.get_ylabel() == "val/anomaly_auroc (higher is better)"
    front = next(line for line in axes.get_lines() if line.get_label() == "Pareto front")
    assert list(front.get_ydata()) == [0.7, 0.9, 0.95]  # the best score for each size of code, in its direction
    axes = plots.latent_size_front(board.assign(objective=[0.5, 0.3, 0.4, 0.1]), metric="val/recon_mse", mode="min").axes[0]
    assert axes.get_title() == "Pareto front: val/recon_mse vs latent size"
    assert axes.get_ylabel() == "val/recon_mse (lower is better)"


def test_the_headline_of_a_multi_objective_search_counts_its_front_in_plain_words():
    search = {**SEARCH, "params": {**SEARCH["params"], "objectives": "val/recon_mse min, model/latent_dim min"}}
    trials = [run_row(1, "dense", Outcome("completed"), 0.01, 8, model__latent_dim=4.0),
              run_row(2, "dense", Outcome("completed"), 0.02, 8, model__latent_dim=8.0),  # beaten by #1 on both
              run_row(3, "dense", Outcome("stopped", 1), 0.05, 1, model__latent_dim=2.0)]  # stopped: never ranked
    lines = headline(build_report(SearchRecord("demo", "sqlite:////nowhere/mlflow.db", search, None, runs_frame(*trials))))
    assert lines[0].startswith("1 trial is on the Pareto front of val/recon_mse (lower is better), model/latent_dim "
                               "(lower is better): no other trial beats it on every objective at once.")
    assert "Trials stopped early are left out." in lines[0]
    trials.append(run_row(4, "dense", Outcome("completed"), 0.005, 8, model__latent_dim=16.0))
    lines = headline(build_report(SearchRecord("demo", "sqlite:////nowhere/mlflow.db", search, None, runs_frame(*trials))))
    assert lines[0].startswith("2 trials are on the Pareto front of")
    assert "none of them is beaten on every objective at once" in lines[0]


# --- figures and files -------------------------------------------------------------------------------


def png(width: int = 24, height: int = 8) -> bytes:
    figure = Figure(figsize=(width / 10, height / 10))
    figure.subplots().imshow(np.random.default_rng(0).random((height, width)))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=10)
    return buffer.getvalue()


def a_record() -> SearchRecord:
    curves = pd.DataFrame({"run_id": ["run001"] * 3 + ["run002"] * 3, "step": [1, 2, 3] * 2,
                           "value": [0.3, 0.1, 0.01, 0.4, 0.2, 0.02]})
    images = {"run001": {"reconstructions.png": png()}, "run005": {"prior_samples.png": png(16, 16)}}
    return SearchRecord("demo", "sqlite:////nowhere/mlflow.db", SEARCH, None, a_search(), curves, images)


def test_each_figure_is_drawn_when_the_search_has_its_data_and_says_why_not_otherwise():
    report = build_report(a_record())
    assert {"learning_curves", "search_progress", "latent_size", "asha"} <= set(report.figures)
    assert "rate_distortion" in report.figures  # the stopped VAE has val/kl
    assert report.not_drawn["Hyperparameter importance (Optuna)"].startswith("fewer than three")
    for caption, png_bytes in report.figures.values():
        assert png_bytes[:8] == b"\x89PNG\r\n\x1a\n", caption
    no_vaes = a_search()
    no_vaes = trial_table(no_vaes[no_vaes["tags.latent"] != "gaussian"], "val/recon_mse")
    figures, not_drawn = plots.all_figures(leaderboard(no_vaes, [("val/recon_mse", "min")]), pd.DataFrame(), pd.DataFrame(),
                                           asha_summary(no_vaes, {}), "val/recon_mse", "min")
    assert "rate_distortion" not in figures and "no finished VAE" in not_drawn["VAE rate / distortion (reconstruction against KL)"]


def test_a_report_folder_holds_a_self_contained_page_markdown_whose_pictures_exist_and_the_ranked_csv(tmp_path):
    report = build_report(a_record())
    out = write_report(report, tmp_path / "demo")
    page = (out / "index.html").read_text()
    sources = re.findall(r"<img [^>]*src='([^']+)'", page)
    assert sources and all(src.startswith("data:image/png;base64,") for src in sources)
    assert "Partial report" in page  # trial 6 is still running
    assert "<strong>conv</strong> wins" in page
    markdown = (out / "report.md").read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert len(linked) == len(report.figures) + 2  # every figure, one reconstruction grid, one prior sample grid
    for path in linked:
        assert (out / path).is_file(), path
        assert matplotlib.image.imread(out / path).ndim == 3
    header = (out / "leaderboard.csv").read_text().splitlines()[0].split(",")
    assert len(header) == len(set(header)) and "val/recon_mse" in header  # the objective's metric once
    board = pd.read_csv(out / "leaderboard.csv")
    assert list(board["name"][:4]) == ["conv-#1", "dense-#2", "vae-#5", "dense-#3"]
    assert list(board["rank"][:4]) == [1, 2, 3, 4] and board["rank"][4:].isna().all()
    assert board["reproduce"][0] == "aesearch reproduce demo --run-id run001 --tracking-uri sqlite:////nowhere/mlflow.db"


def test_the_report_names_the_binarisation_its_likelihoods_were_trained_under(tmp_path):
    grey = (write_report(build_report(a_record()), tmp_path / "grey") / "report.md").read_text()
    assert "digits (fingerprint" in grey and "binarised" not in grey
    record = a_record()
    record.search = SEARCH | {"params": SEARCH["params"] | {"data.binarize": "dynamic"}}  # SEARCH itself unchanged
    bits = (write_report(build_report(record), tmp_path / "bits") / "report.md").read_text()
    assert "digits, binarised dynamic (fingerprint" in bits


def test_a_report_replaces_an_earlier_report_but_never_a_folder_of_other_files(tmp_path):
    report = build_report(a_record())
    write_report(report, tmp_path / "demo")
    (tmp_path / "demo" / "figures" / "stale.png").write_bytes(b"old")
    write_report(report, tmp_path / "demo")
    assert not (tmp_path / "demo" / "figures" / "stale.png").exists()
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not an aesearch report folder"):
        write_report(report, other)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left behind


# --- a real search, read from its MLflow store ---------------------------------------------------------


def report_command(store: str, out: Path, experiment: str = "small") -> list[str]:
    return [sys.executable, "-m", "aesearch.cli", "report", experiment, "--tracking-uri", store, "--out", str(out)]


@pytest.fixture(scope="module")
def real_report(small_search, tmp_path_factory):
    experiment, _ = small_search
    store = sqlite_uri(experiment.parent.parent / "mlflow.db")
    out = tmp_path_factory.mktemp("report") / "small"
    done = subprocess.run(report_command(store, out), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return store, out, done


def test_the_reports_winner_is_the_best_trial_in_mlflow(real_report):
    store, out, done = real_report
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("small")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`aesearch.role` = 'trial'")
    finished = [r for r in runs if r.data.tags["outcome"] == "completed" or r.data.tags["outcome"].startswith("stopped")]
    best = min(finished, key=lambda r: r.data.metrics["val/recon_mse"])
    board = pd.read_csv(out / "leaderboard.csv")
    assert board.loc[0, "run_id"] == best.info.run_id and board.loc[0, "rank"] == 1
    assert board.loc[0, "val/recon_mse"] == pytest.approx(best.data.metrics["val/recon_mse"], rel=1e-9)
    assert len(board) == len(runs) == 8
    assert set(board.loc[board["state"] == "diverged", "rank"].isna()) == {True}
    unranked = (out / "report.md").read_text().split("Trials not ranked")[1].split("\n#")[0]
    assert unranked.count("diverged at epoch 1") == (board["state"] == "diverged").sum() >= 1
    assert str(out / "index.html") == done.stdout.strip()
    assert "8 trials" in done.stderr


def test_every_picture_the_report_references_exists(real_report):
    _, out, _ = real_report
    markdown = (out / "report.md").read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert any(p.startswith("figures/") for p in linked) and any(p.startswith("images/") for p in linked)
    for path in linked:
        assert (out / path).is_file(), path
    page = (out / "index.html").read_text()
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r"src='([^']+)'", page))


def test_the_report_opens_in_a_browser_without_console_errors(real_report, tmp_path):
    _, out, _ = real_report
    with open_page((out / "index.html").as_uri(), tmp_path / "profile") as browser:
        shown = browser.execute_script(
            "return Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)")
        errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        text = browser.find_element("tag name", "body").text
        browser.save_screenshot(str(tmp_path / "report.png"))
    assert shown and all(shown), "an image did not load"
    assert errors == []
    assert "Best trial per variant family" in text and "aesearch reproduce small --run-id" in text
    assert matplotlib.image.imread(tmp_path / "report.png").shape[1] >= 1200


def test_a_report_of_a_missing_experiment_or_store_is_one_line_and_writes_nothing(real_report, tmp_path):
    store, _, _ = real_report
    missing = sqlite_uri(tmp_path / "none.db")
    refused = run_at_once({"experiment": report_command(store, tmp_path / "out", "nosuch"),  # both at once
                           "store": report_command(missing, tmp_path / "out")}, dict(os.environ), tmp_path / "logs",
                          timeout=120)
    done = refused["experiment"]
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "'nosuch'" in done.stderr and "small" in done.stderr  # names what the store does hold
    done = refused["store"]
    assert done.returncode == 2 and "no such store" in done.stderr
    assert not (tmp_path / "none.db").exists() and not (tmp_path / "out").exists()
