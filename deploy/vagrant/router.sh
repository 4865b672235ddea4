#!/usr/bin/env bash
# Vagrant lab router: FRR in AS 65000 peering with node1/node2 (AS 65001), ECMP to the VIPs,
# routing between the fabric (10.10.0.0/24) and the client network (10.20.0.0/24).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends frr >/dev/null
sysctl -qw net.ipv4.ip_forward=1
echo net.ipv4.ip_forward=1 > /etc/sysctl.d/90-vipd-lab.conf
# ECMP across both nodes hashes on the 5-tuple, so connections spread over the nodes.
sysctl -qw net.ipv4.fib_multipath_hash_policy=1
echo net.ipv4.fib_multipath_hash_policy=1 >> /etc/sysctl.d/90-vipd-lab.conf
sed -i 's/^bgpd=no/bgpd=yes/' /etc/frr/daemons
cat > /etc/frr/frr.conf <<'FRR'
frr defaults datacenter
hostname router
router bgp 65000
 bgp router-id 10.10.0.2
 no bgp ebgp-requires-policy
 bgp bestpath as-path multipath-relax
 neighbor NODES peer-group
 neighbor NODES remote-as 65001
 neighbor 10.10.0.11 peer-group NODES
 neighbor 10.10.0.12 peer-group NODES
 address-family ipv4 unicast
  maximum-paths 8
 exit-address-family
FRR
systemctl restart frr
