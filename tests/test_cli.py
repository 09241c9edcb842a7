"""The `aesearch` command end to end: real files, real datasets, real exit statuses."""

import io
import json
import subprocess
import sys

import pytest
import torch

from aesearch.cli import main
from aesearch.training.checkpoints import load_checkpoint
from aesearch.training.run_folder import FolderReporter
from aesearch.training.trainer import EpochEnd
from tests.conftest import CONFIGS, REPO, make_config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FAST_EVAL = ["evaluation.iwae_samples=5", "evaluation.kmeans_restarts=1", "evaluation.probe_max_samples=2000"]


def _set(*overrides):
    return [arg for override in overrides for arg in ("--set", override)]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One real `aesearch train` process on digits: its folder and its stdout."""
    folder = tmp_path_factory.mktemp("cli") / "run"
    command = [sys.executable, "-m", "aesearch.cli", "train", str(REPO / "aesearch" / "configs" / "denoising.yaml"),
               "--epochs", "3", "--out", str(folder), *_set(*FAST_EVAL)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return folder, done


def test_train_prints_final_metrics_as_json_on_the_last_line(trained_run):
    folder, done = trained_run
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["variant"] == "denoising" and summary["epochs"] == 3
    assert 0 < summary["test/recon_mse"] < 0.2
    assert summary["fingerprint"] == load_checkpoint(folder / "best.pt")["fingerprint"]
    assert "epoch 3/3" in done.stderr  # the progress bar


def test_progress_in_a_log_is_not_a_line_per_epoch(tmp_path):
    log = io.StringIO()  # not a terminal, as a pipe or a log file
    earlier = [{"epoch": 1.0}]  # resumed after epoch 1
    reporter = FolderReporter(tmp_path / "run", make_config(epochs=4), earlier, stream=log)
    for epoch in (2, 3, 4):
        metrics = {"epoch": float(epoch), "train/loss": 0.5, "val/loss": 0.25, "val/recon_mse": 0.125}
        reporter(EpochEnd(epoch, metrics, epoch == 3, save_checkpoint=lambda path: None, model=None))
    text = log.getvalue()
    assert "epoch 1/4" in text and "epoch 4/4" in text  # where it starts, and the end
    assert "epoch 2/4" not in text and "epoch 3/4" not in text  # a fast run: nothing in between
    assert text.endswith("val/recon_mse 0.125]\n")  # the last epoch's metrics (it was not the best)
    reporter.close()  # as run_in_folder does after training: nothing more to write
    assert log.getvalue() == text


def test_train_writes_a_complete_run_folder(trained_run):
    folder, _ = trained_run
    assert {p.name for p in folder.iterdir()} == {
        "config.yaml", "metrics.jsonl", "last.pt", "best.pt", "reconstructions.png", "latent.png", "result.json",
    }
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    assert (folder / "reconstructions.png").read_bytes().startswith(PNG_SIGNATURE)
    assert (folder / "latent.png").read_bytes().startswith(PNG_SIGNATURE)
    assert load_checkpoint(folder / "last.pt")["epoch"] == 3


def test_evaluate_a_checkpoint_reproduces_the_recorded_metrics(trained_run, capsys):
    folder, _ = trained_run
    recorded = json.loads((folder / "result.json").read_text())
    assert main(["evaluate", str(folder / "best.pt")]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for name in ("test/recon_mse", "test/psnr", "test/recon_bce", "test/probe_accuracy", "test/cluster_ari"):
        assert evaluated[name] == pytest.approx(recorded[name], rel=1e-5), name


def _copy_of(folder, tmp_path):
    copy = tmp_path / "run"
    copy.mkdir()
    for path in folder.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    return copy


def test_resume_continues_a_run_folder(trained_run, tmp_path, capsys):
    copy = _copy_of(trained_run[0], tmp_path)
    args = ["train", str(REPO / "aesearch" / "configs" / "denoising.yaml"), "--epochs", "4", "--out", str(copy),
            "--resume", str(copy / "last.pt"), *_set(*FAST_EVAL)]
    assert main(args) == 0
    lines = (copy / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["epochs"] == 4


def test_resume_from_an_earlier_checkpoint_rewrites_the_later_epochs(trained_run, tmp_path):
    copy = _copy_of(trained_run[0], tmp_path)
    state = load_checkpoint(copy / "last.pt")
    state["epoch"], state["history"] = 1, state["history"][:1]  # as if saved after epoch 1
    state["best"]["epoch"] = 1
    torch.save(state, copy / "epoch1.pt")
    args = ["train", str(REPO / "aesearch" / "configs" / "denoising.yaml"), "--epochs", "3", "--out", str(copy),
            "--resume", str(copy / "epoch1.pt"), *_set(*FAST_EVAL)]
    assert main(args) == 0
    lines = (copy / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def test_validate_accepts_every_shipped_config(capsys):
    assert main(["validate", *map(str, CONFIGS)]) == 0
    assert capsys.readouterr().out.count(": ok (") == len(CONFIGS)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["train", "vae", "--set", "model.latent_dim=0"], "model.latent_dim=0: Input should be greater than or equal to 1"),
        (["train", "vae", "--set", "objective.kl.beta=-2"], "objective.kl.beta=-2: Input should be greater than or equal to 0"),
        (["train", "vae", "--epochs", "0"], "epochs=0"),
        (["train", "vae", "--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
        (["train", "vae", "--set", "latent_dim"], "expected key.path=value"),
        (["train", "dense", "--data", "data.csv"], "unrecognized arguments: --data data.csv"),  # not --data-dir
        (["train", "configs/missing.yaml"], "configs/missing.yaml: cannot read"),
        (["train", "vae", "--set", "data.name=fashion_mnist"], "--download"),
        (["train", "vae", "--resume", "README.md"], "README.md: not a readable checkpoint"),
        (["trian", "vae"], "invalid choice: 'trian'"),
        (["train", "vae", "--set", "data.max_train_samples=1"], "training split of digits has 1 rows"),
        (["train", "vae", "--set", "name=a/b"], "name='a/b': String should match pattern"),
        (["train", "dense", "--set", "evaluation.anomaly_score=neg_elbo"],
         "evaluation.anomaly_score='neg_elbo' needs a gaussian latent (model.latent: gaussian)"),
        (["train", "dense", "--set", "evaluation.anomaly_neighbors=0"], "evaluation.anomaly_neighbors=0"),
        (["train", "dense", "--set", "clustering.refinement=idec"],
         "clustering.refine_epochs=0: clustering.refinement='idec' needs at least one epoch"),
        (["train", "dense", "--set", "clustering.refinement=idec", "--set", "clustering.refine_epochs=3",
          "--set", "clustering.update_interval=0"], "clustering.update_interval=0"),
        (["train", "dense", "--set", "clustering.refinement=dec", "--set", "clustering.refine_epochs=3",
          "--set", "clustering.tol=1.5"], "clustering.tol=1.5"),
        (["train", "dense", "--set", "clustering.clusterer=dbscan"], "clustering.clusterer='dbscan': unknown clusterer"),
        (["evaluate", "README.md", "--device", "cpu"], "README.md: not a readable checkpoint"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(args, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AESEARCH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    assert main([*args, "--out", str(out)] if args[0] == "train" else args) == 2
    stderr = capsys.readouterr().err.strip()
    assert expected in stderr and len(stderr.splitlines()) == 1, stderr
    assert not out.exists() and not (tmp_path / "data").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given on a machine without CUDA")
def test_asking_for_cuda_without_it_is_a_clear_error(tmp_path, capsys):
    assert main(["train", str(REPO / "aesearch" / "configs" / "dense.yaml"), "--device", "cuda", "--out", str(tmp_path / "o")]) == 2
    assert "runtime.device='cuda': CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("where", ["a_file", "a_file/below"])
def test_run_folder_that_cannot_be_a_folder_is_refused(tmp_path, capsys, where):
    (tmp_path / "a_file").write_text("keep me")
    assert main(["train", str(REPO / "aesearch" / "configs" / "dense.yaml"), "--out", str(tmp_path / where)]) == 2
    assert f"--out {tmp_path / where}: " in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["a_file"] and (tmp_path / "a_file").read_text() == "keep me"


def test_resume_into_another_non_empty_folder_is_refused(trained_run, tmp_path, capsys):
    folder, _ = trained_run
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    args = ["train", str(REPO / "aesearch" / "configs" / "denoising.yaml"), "--epochs", "4", "--out", str(tmp_path / "other"),
            "--resume", str(folder / "last.pt"), *_set(*FAST_EVAL)]
    assert main(args) == 2
    assert "already holds files" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["notes.txt"]


def test_train_refuses_to_overwrite_a_run_folder(trained_run, capsys):
    folder, _ = trained_run
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert main(["train", str(REPO / "aesearch" / "configs" / "dense.yaml"), "--out", str(folder)]) == 2
    assert "already holds files" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_validate_reports_each_bad_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {latent: gaussian}\nobjective: {sparsity: {kind: l1}}\n")
    assert main(["validate", str(CONFIGS[0]), str(bad)]) == 2
    captured = capsys.readouterr()
    assert "ok (" in captured.out
    assert "bad.yaml: objective.sparsity.kind='l1' needs model.latent='deterministic'" in captured.err


@pytest.mark.slow  # trains every variant on MNIST
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_named_variant_trains_on_mnist_from_a_data_directory(path, mnist_dir, tmp_path, capsys):
    # One kind of noise for the denoising metrics (of four): each is a pass over MNIST's 10000 test images.
    overrides = ["data.name=mnist", "data.max_train_samples=2000", *FAST_EVAL,
                 "evaluation.denoise_levels={gaussian: 0.3}"]
    if "attention" in path.stem:
        overrides.append("model.patch_size=7")
    args = ["train", str(path), "--epochs", "1", "--data-dir", str(mnist_dir), "--out", str(tmp_path / "run"), *_set(*overrides)]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["dataset"] == "mnist" and summary["variant"] == path.stem
    assert 0 < summary["test/recon_mse"] < 0.15
