"""The public Python API alone, as a notebook uses it: a small search (on the Ray instance the
tests share, as a notebook beside a running Ray passes its address), its report, a trial reproduced,
a config trained into a folder and its model loaded back."""

import json
import subprocess
import sys

import aesearch
from tests.conftest import REPO
from tests.searching import write_space

NOTEBOOK = """
import json, sys
import torch
import aesearch

folder, uri, address = sys.argv[1], sys.argv[2], sys.argv[3]
space = aesearch.load_space(f"{folder}/api.yaml", {"budget.num_samples": 3})
board = aesearch.run_search(space, name="api", storage=f"{folder}/results", tracking_uri=uri, address=address)
report = aesearch.make_report("api", tracking_uri=uri, out=f"{folder}/report")
check = aesearch.reproduce("api", rank=1, tracking_uri=uri, from_checkpoint=True)
config = aesearch.load_config("vae").model_copy(update={"epochs": 1})
result = aesearch.train(config, out=f"{folder}/run")
trained = aesearch.load_model(f"{folder}/run/best.pt")
x = torch.rand(2, 1, 8, 8)
print(json.dumps({"trials": len(board), "best": board.iloc[0]["trial"], "states": board["state"].tolist(),
                  "report_best": report.board.iloc[0]["run_id"], "board_run": board.iloc[0]["mlflow_run_id"],
                  "reproduced": check.reproduced, "train_loss": result.history[-1]["train/loss"],
                  "reconstructed": list(trained.model(x).x_hat.shape), "same_weights": all(
                      torch.equal(a, b) for a, b in zip(trained.model.state_dict().values(),
                                                        result.model.state_dict().values()))}))
"""


def test_a_notebook_searches_reports_reproduces_trains_and_loads_through_the_api_alone(tmp_path, ray_env, ray_address):
    write_space(tmp_path, "api", trials=3, epochs=2, grace=1)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = subprocess.run([sys.executable, "-c", NOTEBOOK, str(tmp_path), uri, ray_address], cwd=REPO, env=ray_env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["trials"] == 3 and seen["states"][0] in ("completed", "stopped")
    assert seen["report_best"] == seen["board_run"]  # the report ranks as the search did
    assert seen["reproduced"] is True, seen
    assert seen["reconstructed"] == [2, 1, 8, 8] and seen["same_weights"]
    assert (tmp_path / "report" / "index.html").is_file() and (tmp_path / "run" / "best.pt").is_file()


def test_the_api_is_what_aesearch_offers_and_importing_it_is_light():
    assert set(aesearch.__all__) <= set(dir(aesearch))
    assert callable(aesearch.run_search) and callable(aesearch.load_model)
    code = "import sys, aesearch; print(sorted(m for m in ('torch', 'ray', 'mlflow') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "[]"  # the CLI's start does not pay for what a command does not use
