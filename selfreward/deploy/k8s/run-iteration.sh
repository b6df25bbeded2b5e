#!/usr/bin/env bash
# One self-rewarding iteration on Kubernetes: each stage a Job on the shared volume, started once the one
# before it completed; generate and judge as indexed Jobs (one pod per shard) followed by a merge.
#   kubectl apply -f selfreward/deploy/k8s/00-storage.yaml
#   kubectl create configmap selfreward-recipe --from-file=recipe.yaml=recipes/my-recipe.yaml
#   selfreward/deploy/k8s/run-iteration.sh 1            # SFT runs first when the iteration is 1
# A failed Job stops the iteration here (its logs: kubectl logs job/selfreward-<stage>); rerunning this
# script resumes: finished stages are skipped by selfreward itself.
set -euo pipefail
iteration="${1:?usage: run-iteration.sh ITERATION}"
here="$(cd "$(dirname "$0")" && pwd)"
for manifest in "$here"/[1-9][0-9]-*.yaml; do
  stage="$(basename "$manifest" .yaml)"; stage="${stage#*-}"
  if [[ "$stage" == sft && "$iteration" != 1 ]]; then continue; fi
  kubectl delete job "selfreward-$stage" --ignore-not-found --wait=true
  sed "s/{name: ITERATION, value: \"1\"}/{name: ITERATION, value: \"$iteration\"}/" "$manifest" | kubectl apply -f -
  # Wait for completion or failure, whichever comes first.
  while true; do
    if kubectl wait --for=condition=complete "job/selfreward-$stage" --timeout=60s >/dev/null 2>&1; then break; fi
    if kubectl wait --for=condition=failed "job/selfreward-$stage" --timeout=1s >/dev/null 2>&1; then
      echo "stage $stage failed: kubectl logs job/selfreward-$stage" >&2
      exit 1
    fi
  done
  echo "stage $stage of iteration $iteration done"
done
