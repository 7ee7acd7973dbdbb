#!/bin/bash
# jaxrlhf on a Cloud TPU pod slice: the same command on every worker; JAX finds its peers
# through the TPU metadata (jax.distributed.initialize with no arguments).
#
#   scripts/launch_tpu_pod.sh my-tpu us-central2-b configs/tiny.yaml output_dir=gs://bucket/runs/exp1
#
set -euo pipefail
tpu_name=$1; zone=$2; shift 2
gcloud compute tpus tpu-vm ssh "$tpu_name" --zone "$zone" --worker=all --command \
  "cd ~/jaxrlhf && python3 -m jaxrlhf.train $* distributed.initialize=always"
