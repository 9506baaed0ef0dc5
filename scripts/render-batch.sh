#!/usr/bin/env bash
# Render the Kubernetes manifests of a batch fine-tune: one Indexed Job, one pod per line of the
# batch file (JSON Lines, one subject's settings per line), written to stdout.
#
#   scripts/render-batch.sh BATCH_FILE BATCH_URI [OVERLAY]
#
#   BATCH_FILE  the local batch file (its non-blank lines are counted: one index each)
#   BATCH_URI   where the job will read it (s3://bucket/batches/<name>.jsonl); upload it there
#   OVERLAY     k8s/overlays/<OVERLAY> to start from (default: eks)
#   env IMAGE   image to run, ideally by digest (repo@sha256:…); default: the overlay's image
#   env SUFFIX  name suffix that makes this batch's Job unique (default: UTC time + random)
#   env KUBECTL kubectl binary (default: the venv's, else the one on PATH)
set -euo pipefail

if (( $# < 2 || $# > 3 )); then
  sed -n '2,13p' "$0" >&2
  exit 2
fi
batch_file=$1
batch_uri=$2
overlay=${3:-eks}
root=$(cd "$(dirname "$0")/.." && pwd)
suffix=${SUFFIX:-$(date -u +%Y%m%d%H%M%S)-$(od -An -N2 -tx2 /dev/urandom | tr -d ' ')}

if [[ -z ${KUBECTL:-} ]]; then
  KUBECTL=kubectl
  [[ -x $root/.venv/bin/kubectl ]] && KUBECTL=$root/.venv/bin/kubectl
fi
[[ -d $root/k8s/overlays/$overlay ]] || { echo "no overlay k8s/overlays/$overlay" >&2; exit 2; }
[[ $suffix =~ ^[a-z0-9-]+$ ]] || { echo "SUFFIX must be lower-case letters, digits and -" >&2; exit 2; }
count=$(grep -c '[^[:space:]]' "$batch_file" || true)
(( count > 0 )) || { echo "$batch_file has no lines" >&2; exit 2; }

# kustomize only follows relative paths, so the generated kustomization lives inside the repo.
mkdir -p "$root/.work"
dir=$(mktemp -d "$root/.work/render-XXXXXX")
trap 'rm -rf "$dir"' EXIT

image_entry=""
if [[ -n ${IMAGE:-} ]]; then
  if [[ $IMAGE == *@sha256:* ]]; then
    image_entry="    newName: ${IMAGE%@*}
    digest: ${IMAGE#*@}"
  else
    image_entry="    newName: ${IMAGE%:*}
    newTag: ${IMAGE##*:}"
  fi
fi

# Two levels: the overlay plus the fanout component, then this batch's values on top (a
# kustomization's own generators run before its components, so they cannot override them).
mkdir "$dir/fanout"
cat > "$dir/fanout/kustomization.yaml" <<YAML
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../../../k8s/overlays/$overlay
components:
  - ../../../k8s/components/fanout
YAML
cat > "$dir/kustomization.yaml" <<YAML
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - fanout
nameSuffix: -$suffix
configMapGenerator:
  - name: sdft-settings
    behavior: merge
    literals:
      - SDFT_BATCH_URI=$batch_uri
patches:
  - target:
      kind: Job
      name: sdft
    patch: |-
      - op: replace
        path: /spec/completions
        value: $count
      - op: replace
        path: /spec/parallelism
        value: $count
      - op: replace
        path: /spec/maxFailedIndexes
        value: $count
YAML
if [[ -n $image_entry ]]; then
  # Every overlay names the image after the base's ghcr.io/sdft/sdft or its own registry; match
  # whatever the overlay produced.
  current=$("$KUBECTL" kustomize "$dir" | sed -n 's/^ *image: *//p' | grep -v -e minio -e /mc: | head -n1)
  printf 'images:\n  - name: %s\n%s\n' "${current%[:@]*}" "$image_entry" >> "$dir/kustomization.yaml"
fi
"$KUBECTL" kustomize "$dir"
