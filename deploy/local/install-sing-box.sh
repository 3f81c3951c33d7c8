#!/usr/bin/env bash
# Builds sing-box (SagerNet/sing-box) with `go install` into the quotaflow cache, for
# the live sing-box tests (tests/producers/enforce/test_singbox.py). Debian ships no
# sing-box. Idempotent: it does nothing when the binary is already there. Needs Go.
# Prints the binary's path on stdout; the build's output goes to the cache's log/.
#
# Build tags: with_v2ray_api (the V2Ray StatsService the collectors read) and
# with_clash_api (the Clash API, whose /connections lists and closes connections).
# The SSM API (`services: [{"type": "ssm-api", ...}]`, with `managed: true` on the
# Shadowsocks inbound) needs no tag: 1.14.1 registers it in every build (it is a
# service since 1.12). The version
# is stamped in as sing-box's own release builds do (`go install` alone says
# "unknown"), so `sing-box version` and the SSM API's `GET /server/v1/` name it.
#
#   SING_BOX_VERSION     the module version (default below)
#   QUOTAFLOW_CACHE_DIR  the cache (default ~/.cache/quotaflow); the binary lands in
#                        $QUOTAFLOW_CACHE_DIR/bin/sing-box-$SING_BOX_VERSION
set -euo pipefail

SING_BOX_VERSION="${SING_BOX_VERSION:-v1.14.1}"
SING_BOX_TAGS="with_v2ray_api,with_clash_api"
CACHE="${QUOTAFLOW_CACHE_DIR:-${HOME}/.cache/quotaflow}"
BIN="${CACHE}/bin"
TARGET="${BIN}/sing-box-${SING_BOX_VERSION}"

if [[ -x "$TARGET" ]]; then
  echo "$TARGET"
  exit 0
fi
if ! command -v go >/dev/null 2>&1; then
  echo "install-sing-box: needs Go (https://go.dev/dl/) to build sing-box ${SING_BOX_VERSION}" >&2
  exit 1
fi

mkdir -p "$BIN" "${CACHE}/log" "${CACHE}/go"
# Build into a private folder, then move the binary to its versioned name in one
# step, so that a build cut short never leaves a half-written binary at $TARGET.
build="$(mktemp -d "${BIN}/.sing-box-build.XXXXXX")"
trap 'rm -rf "$build"' EXIT
log="${CACHE}/log/sing-box-build.log"
echo "install-sing-box: building sing-box ${SING_BOX_VERSION} with go install (about a minute)" >&2
if ! env GOPATH="${CACHE}/go" GOBIN="$build" CGO_ENABLED=0 \
    GOFLAGS="${GOFLAGS:-} -modcacherw" \
    go install -trimpath -tags "$SING_BOX_TAGS" \
    -ldflags "-X github.com/sagernet/sing-box/constant.Version=${SING_BOX_VERSION#v} -s -w -buildid=" \
    "github.com/sagernet/sing-box/cmd/sing-box@${SING_BOX_VERSION}" >"$log" 2>&1; then
  echo "install-sing-box: go install failed; the end of ${log}:" >&2
  tail -n 30 "$log" >&2
  exit 1
fi
mv -f "${build}/sing-box" "$TARGET"
echo "$TARGET"
