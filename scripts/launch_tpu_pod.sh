#!/bin/bash
# jaxrlhf on a Cloud TPU pod slice: the same command on every worker; JAX finds its peers
# through the TPU metadata (jax.distributed.initialize with no arguments).
#
#   scripts/launch_tpu_pod.sh my-tpu us-central2-b configs/tiny.yaml output_dir=/mnt/gcs/runs/exp1
#
# output_dir must be a path every worker sees (here a bucket mounted with gcsfuse on each worker:
# `gcsfuse --implicit-dirs bucket /mnt/gcs`); gs:// URLs are refused, remote writes are not supported.
#
set -euo pipefail
tpu_name=$1; zone=$2; shift 2
gcloud compute tpus tpu-vm ssh "$tpu_name" --zone "$zone" --worker=all --command \
  "cd ~/jaxrlhf && python3 -m jaxrlhf.train $* distributed.initialize=always"
