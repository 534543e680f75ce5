#!/usr/bin/env bash
# `make image-test`: build the CPU image with buildah and check the server inside it.
#
# No container registry is reachable and there is no Docker engine, so:
#   1. the base is a debootstrap'd Debian bookworm (minbase + python3, venv, pip, CA certificates), imported once
#      into containers-storage as localhost/instructlm-base:bookworm and kept for later runs;
#   2. a tiny random-weight model is exported to an ONNX bundle (`instructlm export onnx`) and baked in with
#      --build-arg BUNDLE;
#   3. `buildah bud --isolation chroot --storage-driver vfs` builds the Dockerfile's CPU target, pip reaching PyPI
#      through the host's CA bundle (mounted, passed as PIP_CA_BUNDLE);
#   4. `buildah run` (podman run does not work here) runs deploy/image_check.py inside it as the image's user: the
#      ENTRYPOINT serves, /health turns 200, a chat completion answers, /metrics has every series the chart and the
#      dashboard read, the image's HEALTHCHECK passes, and SIGTERM exits 0.
# Prints the image size. Needs root (buildah with the vfs driver). Leaves the base image, removes the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-.venv/bin/python}
BASE=localhost/instructlm-base:bookworm
IMAGE=localhost/instructlm:image-test
WORK=runs/image-test
STORAGE=(--storage-driver vfs)
NICE=(nice -n 10)
t_start=$(date +%s)
say() { printf '[image-test %4ds] %s\n' $(($(date +%s) - t_start)) "$*"; }

bash deploy/install-tools.sh --image >/dev/null

# 1. Base image (about 1 minute the first time).
if ! podman "${STORAGE[@]}" image exists "$BASE"; then
  say "debootstrap bookworm (minbase + python3) -> $BASE"
  rootfs=$(mktemp -d /var/tmp/instructlm-rootfs.XXXXXX)
  "${NICE[@]}" debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$rootfs.log" 2>&1 \
    || { tail -20 "$rootfs.log"; exit 1; }
  rm -rf "$rootfs/var/cache/apt/archives/"*.deb "$rootfs/var/lib/apt/lists/"*
  tar -C "$rootfs" -c . | podman "${STORAGE[@]}" import --quiet - "$BASE" >/dev/null
  rm -rf "$rootfs" "$rootfs.log"
fi
say "base $BASE ready"

# 2. A tiny bundle inside the build context (runs/ is ignored by git; .dockerignore lets bundles through).
rm -rf "$WORK/checkpoint" "$WORK/tokenizer" "$WORK/bundle"
mkdir -p "$WORK"
OMP_NUM_THREADS=1 PYTHONPATH=. "${NICE[@]}" "$PY" - "$WORK" <<'EOF'
import sys
from pathlib import Path

import torch

from model.checkpoint import save_checkpoint
from model.config import preset
from model.tokenizer import train_tokenizer
from model.transformer import Transformer
from tests.conftest import tiny_corpus

torch.set_num_threads(1)
out = Path(sys.argv[1])
tok = train_tokenizer(tiny_corpus(), vocab_size=512, min_frequency=1, model_max_length=256)
cfg = preset("tiny", vocab_size=tok.vocab_size, eos_token_id=[tok.eos_id, tok.endoftext_id], pad_token_id=tok.pad_id)
model = Transformer(cfg)
model.init_weights(seed=0)
tok.save(out / "tokenizer", model_max_length=cfg.max_position_embeddings)
save_checkpoint(model.eval(), out / "checkpoint", tokenizer_dir=out / "tokenizer")
EOF
# --attention slot: the image must run the SlotAttention op library its ops stage builds.
OMP_NUM_THREADS=1 "${NICE[@]}" .venv/bin/instructlm export onnx --checkpoint "$WORK/checkpoint" --out "$WORK/bundle" \
  --attention slot 2>&1 | tail -1
say "tiny bundle exported to $WORK/bundle"

# 3. Build (about 5 minutes on 2 cores, most of it pip and the vfs driver's full layer copies).
CA=/etc/ssl/certs/ca-certificates.crt
if [ -n "${IMAGE_TEST_REUSE:-}" ] && podman "${STORAGE[@]}" image exists "$IMAGE"; then
  say "reusing $IMAGE (IMAGE_TEST_REUSE)"
else
  say "buildah bud (TARGET=cpu, BASE_IMAGE=$BASE)"
  # buildah 1.28 leaves a working container per multi-stage build behind (each a full vfs copy): remove ours.
  before=$(buildah "${STORAGE[@]}" containers --all --quiet | sort)
  "${NICE[@]}" buildah "${STORAGE[@]}" bud --isolation chroot --format docker --pull=never --layers=false \
    --build-arg BASE_IMAGE="$BASE" --build-arg TARGET=cpu --build-arg BUNDLE="$WORK/bundle" \
    --build-arg PIP_CA_BUNDLE=/run/host-ca.crt --volume "$CA:/run/host-ca.crt:ro" \
    -f Dockerfile -t "$IMAGE" . >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; build_failed=1; }
  comm -13 <(echo "$before") <(buildah "${STORAGE[@]}" containers --all --quiet | sort) \
    | xargs -r buildah "${STORAGE[@]}" rm >/dev/null
  buildah "${STORAGE[@]}" rmi --prune >/dev/null 2>&1 || true
  [ -z "${build_failed:-}" ] || exit 1
fi
size=$(podman "${STORAGE[@]}" image inspect --format '{{.Size}}' "$IMAGE")
base_size=$(podman "${STORAGE[@]}" image inspect --format '{{.Size}}' "$BASE")
say "built $IMAGE: $((size / 1000000)) MB ($((base_size / 1000000)) MB of it the base), build log $WORK/build.log"

# 4. Run the checks inside it. chroot isolation shares the host's network: pick a free port.
port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
ctr=$(buildah "${STORAGE[@]}" from --pull=never "$IMAGE")
cleanup() {
  buildah "${STORAGE[@]}" rm "$ctr" >/dev/null 2>&1 || true
  # IMAGE_TEST_KEEP=1 keeps the image for another run with IMAGE_TEST_REUSE=1.
  [ -n "${IMAGE_TEST_KEEP:-}" ] || buildah "${STORAGE[@]}" rmi "$IMAGE" >/dev/null 2>&1 || true
  buildah "${STORAGE[@]}" rmi --prune >/dev/null 2>&1 || true
}
trap cleanup EXIT
buildah "${STORAGE[@]}" inspect --type image "$IMAGE" >"$WORK/inspect.json"
read_config() {  # one field of the image's Docker config, as JSON
  "$PY" -c 'import json, sys; print(json.dumps(json.load(open(sys.argv[1]))["Docker"]["config"][sys.argv[2]]))' \
    "$WORK/inspect.json" "$1"
}
healthcheck=$(read_config Healthcheck | "$PY" -c 'import json, sys; print(json.dumps(json.load(sys.stdin)["Test"]))')
entrypoint=$(read_config Entrypoint | "$PY" -c 'import json, sys; print(" ".join(json.load(sys.stdin)))')
user=$(read_config User)
"$PY" deploy/metric_names.py >"$WORK/metrics.txt"
say "checks inside the image (user $user, entrypoint: $entrypoint, port $port)"
# shellcheck disable=SC2086  # the entrypoint is a word list
buildah "${STORAGE[@]}" run --isolation chroot --volume "$ROOT/deploy/image_check.py:/check/image_check.py:ro" \
  --volume "$ROOT/$WORK/metrics.txt:/check/metrics.txt:ro" --env OMP_NUM_THREADS=1 --env INSTRUCTLM_THREADS=1 "$ctr" -- \
  python3 /check/image_check.py --port "$port" --entrypoint $entrypoint \
  --healthcheck-json "$healthcheck" --metrics-file /check/metrics.txt
say "image test passed; CPU image $((size / 1000000)) MB"
