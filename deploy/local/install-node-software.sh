#!/usr/bin/env bash
# Installs the proxy and VPN software that the live collector tests drive
# (tests/producers/sources/), from Debian's packages. Idempotent: it does
# nothing when every command is already there. Needs root, or passwordless sudo.
#
#   v2ray               v2ray, v2ctl           (StatsService / HandlerService)
#   shadowsocks-libev   ss-manager, ss-server, ss-local
#   wireguard-go        wireguard-go           (userspace WireGuard)
#   wireguard-tools     wg
#   openvpn             openvpn
#   openssl             openssl                (the OpenVPN tests' throwaway CA)
#   iptables, iproute2, curl
set -euo pipefail

declare -A PACKAGE_OF=(
  [v2ray]=v2ray
  [ss-manager]=shadowsocks-libev
  [ss-server]=shadowsocks-libev
  [ss-local]=shadowsocks-libev
  [wireguard-go]=wireguard-go
  [wg]=wireguard-tools
  [openvpn]=openvpn
  [openssl]=openssl
  [iptables]=iptables
  [ip]=iproute2
  [curl]=curl
)

missing=()
for command in "${!PACKAGE_OF[@]}"; do
  if ! command -v "$command" >/dev/null 2>&1 && [[ ! -x "/usr/sbin/$command" ]]; then
    missing+=("${PACKAGE_OF[$command]}")
  fi
done
if [[ ${#missing[@]} -eq 0 ]]; then
  exit 0
fi
mapfile -t packages < <(printf '%s\n' "${missing[@]}" | sort -u)

as_root=()
if [[ $(id -u) -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
  else
    echo "install-node-software: need root to install: ${packages[*]}" >&2
    exit 1
  fi
fi

export DEBIAN_FRONTEND=noninteractive
echo "install-node-software: installing ${packages[*]}" >&2
# A lock held by another apt run is waited for rather than failed on.
"${as_root[@]}" apt-get -o DPkg::Lock::Timeout=300 update -qq
"${as_root[@]}" apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends \
  "${packages[@]}" >/dev/null
