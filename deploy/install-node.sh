#!/usr/bin/env bash
# Install vipd on a Debian 12 node and register its systemd unit (docs/quickstart.md,
# "Run vipd on a node"). Idempotent. It does not start vipd: write /etc/vipd first.
#
#   deploy/install-node.sh [--root DIR] [--no-apt] [SOURCE]
#
# SOURCE is a vipd wheel or a vipd checkout (default: the checkout holding this script; pip
# builds the wheel, fetching hatchling and grpcio-tools for the build only).
# Creates: /opt/vipd/venv (vipd + vipctl, Debian's bcc via system site packages),
# /usr/local/bin/{vipd,vipctl} symlinks, /etc/vipd (manifests), /etc/default/vipd (node name,
# extra `vipd run` flags; kept if present), /etc/systemd/system/vipd{,-prepare}.service, and
# (on this machine, not with --root) runs `vipd prepare`: the BPF programs compiled into the
# program cache, so vipd's first start loads them instead of compiling.
# systemd itself creates /run/vipd and /var/lib/vipd (RuntimeDirectory=, StateDirectory=).
# --root DIR installs below DIR instead of / (packaging tests); --no-apt skips apt-get.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=/ APT=1 SOURCE=$(dirname "$HERE")
while [ $# -gt 0 ]; do
  case "$1" in
    --root) ROOT=$2; shift 2 ;;
    --no-apt) APT=0; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) SOURCE=$1; shift ;;
  esac
done
log() { printf '[install-node] %s\n' "$*"; }

if [ "$APT" = 1 ]; then
  [ "$(id -u)" -eq 0 ] || { log "must run as root (apt-get, /opt, /etc)"; exit 1; }
  # bcc compiles the datapath on the node: it needs the running kernel's headers.
  headers=linux-headers-$(uname -r)
  apt-cache show "$headers" >/dev/null 2>&1 || headers=linux-headers-amd64
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends python3 python3-venv python3-bpfcc iproute2 \
    "$headers" >/dev/null
fi

venv=$ROOT/opt/vipd/venv
if [ ! -x "$venv/bin/python" ]; then
  log "venv: $venv on /usr/bin/python3 with system site packages (Debian's bcc)"
  /usr/bin/python3 -m venv --system-site-packages "$venv"
fi
log "pip: installing vipd from $SOURCE"
if "$venv/bin/pip" show -q vipd 2>/dev/null; then
  # A checkout keeps its version number while its code changes: always replace vipd itself.
  "$venv/bin/pip" install -q --force-reinstall --no-deps "$SOURCE"
fi
"$venv/bin/pip" install -q --upgrade --upgrade-strategy only-if-needed "$SOURCE"
# The PyPI package named "bcc" is unrelated to BPF; it must never shadow Debian's.
"$venv/bin/python" -c 'import bcc; assert hasattr(bcc, "BPF")' \
  || { log "bcc does not import in $venv: install python3-bpfcc"; exit 1; }

install -d -m 0755 "$ROOT/usr/local/bin" "$ROOT/etc/vipd" "$ROOT/etc/default" "$ROOT/etc/systemd/system"
ln -sfn /opt/vipd/venv/bin/vipd "$ROOT/usr/local/bin/vipd"
ln -sfn /opt/vipd/venv/bin/vipctl "$ROOT/usr/local/bin/vipctl"
[ -e "$ROOT/etc/default/vipd" ] || install -m 0644 "$HERE/vipd.default" "$ROOT/etc/default/vipd"
install -m 0644 "$HERE/vipd.service" "$ROOT/etc/systemd/system/vipd.service"
install -m 0644 "$HERE/vipd-prepare.service" "$ROOT/etc/systemd/system/vipd-prepare.service"
if [ "$ROOT" = / ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
fi
if [ "$ROOT" = / ]; then
  # not fatal: a node without kernel headers can still run vipd without --lb-interface
  # (vipd-prepare.service tries again at every boot)
  "$venv/bin/vipd" prepare --state-dir /var/lib/vipd \
    || log "vipd prepare failed (above); vipd run --lb-interface will compile at its first start"
fi
log "ok: $("$venv/bin/vipd" --version); put manifests in /etc/vipd, then: systemctl enable --now vipd"
