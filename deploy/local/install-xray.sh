#!/usr/bin/env bash
# Builds Xray (XTLS/Xray-core) with `go install` into the quotaflow cache, for the
# live Xray tests (tests/producers/sources/test_v2ray.py). Debian ships V2Ray but
# not Xray. Idempotent: it does nothing when the binary is already there. Needs Go.
# Prints the binary's path on stdout; the build's output goes to the cache's log/.
#
#   XRAY_VERSION         the Xray-core module version (default below)
#   QUOTAFLOW_CACHE_DIR  the cache (default ~/.cache/quotaflow); the binary lands in
#                        $QUOTAFLOW_CACHE_DIR/bin/xray-$XRAY_VERSION
set -euo pipefail

XRAY_VERSION="${XRAY_VERSION:-v1.260327.0}"
CACHE="${QUOTAFLOW_CACHE_DIR:-${HOME}/.cache/quotaflow}"
BIN="${CACHE}/bin"
TARGET="${BIN}/xray-${XRAY_VERSION}"

if [[ -x "$TARGET" ]]; then
  echo "$TARGET"
  exit 0
fi
if ! command -v go >/dev/null 2>&1; then
  echo "install-xray: needs Go (https://go.dev/dl/) to build Xray ${XRAY_VERSION}" >&2
  exit 1
fi

mkdir -p "$BIN" "${CACHE}/log" "${CACHE}/go"
# The module's command package is .../main, so `go install` names the binary `main`:
# build into a private folder, then move it to its versioned name in one step.
build="$(mktemp -d "${BIN}/.xray-build.XXXXXX")"
trap 'rm -rf "$build"' EXIT
log="${CACHE}/log/xray-build.log"
echo "install-xray: building Xray ${XRAY_VERSION} with go install (about a minute)" >&2
if ! env GOPATH="${CACHE}/go" GOBIN="$build" CGO_ENABLED=0 \
    GOFLAGS="${GOFLAGS:-} -modcacherw" \
    go install "github.com/xtls/xray-core/main@${XRAY_VERSION}" >"$log" 2>&1; then
  echo "install-xray: go install failed; the end of ${log}:" >&2
  tail -n 30 "$log" >&2
  exit 1
fi
mv -f "${build}/main" "$TARGET"
echo "$TARGET"
