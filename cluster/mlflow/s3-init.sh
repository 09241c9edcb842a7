#!/bin/sh
# Once the SeaweedFS server of compose.yaml / kubernetes.yaml answers: its two buckets, and an S3
# identity for each that may use that bucket only -- `mlflow` (the tracking server's artifact store,
# bucket mlflow) and `aesearch-trials` (the searches' --storage, bucket aesearch-results). The server's
# root keys (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in its own environment) stay with the server.
# Identities are kept in the server's filer, so they survive restarts; running this again updates the
# keys. Checked with SeaweedFS 4.48 (`weed shell`: s3.bucket.list, s3.bucket.create, s3.configure).
set -eu
: "${WEED_MASTER:=s3:9333}" "${WEED_FILER:=s3:8888}"
weed_shell() { weed shell -master="$WEED_MASTER" -filer="$WEED_FILER"; }

tries=0
until buckets=$(echo s3.bucket.list | weed_shell 2>/dev/null); do  # until the master and filer answer
    tries=$((tries + 1))
    [ "$tries" -lt 60 ] || { echo "s3-init: no SeaweedFS at $WEED_MASTER / $WEED_FILER" >&2; exit 1; }
    sleep 2
done
for bucket in mlflow aesearch-results; do
    echo "$buckets" | grep -q "^ *$bucket[[:space:]]" || echo "s3.bucket.create -name $bucket" | weed_shell >/dev/null
done
# weed shell prints the identities it stores, keys included: its output goes nowhere.
{
    echo "s3.configure -user mlflow -access_key $MLFLOW_S3_ACCESS_KEY -secret_key $MLFLOW_S3_SECRET_KEY" \
         "-actions Read:mlflow,Write:mlflow,List:mlflow,Tagging:mlflow -apply"
    echo "s3.configure -user aesearch-trials -access_key $TRIALS_S3_ACCESS_KEY -secret_key $TRIALS_S3_SECRET_KEY" \
         "-actions Read:aesearch-results,Write:aesearch-results,List:aesearch-results,Tagging:aesearch-results -apply"
} | weed_shell >/dev/null
echo "s3-init: buckets mlflow and aesearch-results, identities mlflow and aesearch-trials"
