#!/usr/bin/env bash
# Vagrant lab client: reaches the VIP (10.30.0.0/24) and the pods (10.1.0.0/16) via the router.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends curl >/dev/null
ip route replace 10.30.0.0/24 via 10.20.0.2
ip route replace 10.1.0.0/16 via 10.20.0.2
