"""Once the tracking server of compose.yaml / kubernetes.yaml answers: the cluster's trials get an MLflow
user of their own (MLFLOW_TRIALS_USERNAME), not the admin, so that a node's credentials cannot manage
users or other people's experiments. Run as the admin (MLFLOW_TRACKING_USERNAME/PASSWORD); running it
again sets the password from the environment. Checked with MLflow 3.17's basic-auth app."""

import os

from mlflow.exceptions import RestException
from mlflow.server import get_app_client

users = get_app_client("basic-auth", tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
name, password = os.environ["MLFLOW_TRIALS_USERNAME"], os.environ["MLFLOW_TRIALS_PASSWORD"]
try:
    users.create_user(name, password)
except RestException as error:
    if error.error_code != "RESOURCE_ALREADY_EXISTS":
        raise
    users.update_user_password(name, password)
print(f"mlflow-users: user {name} ready")
