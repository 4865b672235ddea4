#!/usr/bin/env bash
# Vagrant lab node: vipd installed from the synced checkout (/vagrant) exactly as
# docs/quickstart.md "Run vipd on a node" says, run by systemd; one backend "pod" (a network
# namespace 10.1.N.10 serving HTTP) for the LoadBalancer Service web (10.30.0.10).
#   node.sh NAME N      e.g. node.sh node1 1
set -euo pipefail
NAME=$1 N=$2
/vagrant/deploy/install-node.sh /vagrant

sysctl -qw net.ipv4.ip_forward=1
echo net.ipv4.ip_forward=1 > /etc/sysctl.d/90-vipd-lab.conf
# Replies to the client network go back through the router, not the Vagrant management NIC.
ip route replace 10.20.0.0/24 via 10.10.0.2
uplink=$(ip -o -4 addr show to 10.10.0.0/24 | awk '{print $2; exit}')

# The pod: a namespace behind a veth, serving its own name over HTTP on port 80.
if ! ip netns list | grep -qx 'pod\( .*\)\?'; then
  ip netns add pod
  ip link add pod0 type veth peer name eth0 netns pod
  ip addr add "10.1.$N.1/24" dev pod0
  ip link set pod0 up
  ip -n pod addr add "10.1.$N.10/24" dev eth0
  ip -n pod link set eth0 up
  ip -n pod link set lo up
  ip -n pod route add default via "10.1.$N.1"
fi
mkdir -p /srv/pod && echo "$NAME-pod" > /srv/pod/index.html
systemctl is-active --quiet lab-pod || systemd-run --unit=lab-pod \
  ip netns exec pod python3 -m http.server 80 --directory /srv/pod

# Config: the same manifests on both nodes; each vipd picks its Node object by name.
install -m 0644 /vagrant/deploy/vagrant/vipd/*.yaml /etc/vipd/
cat > /etc/default/vipd <<CONF
VIPD_NODE_NAME=$NAME
VIPD_ARGS=--lb-interface $uplink
CONF
vipctl config validate /etc/vipd
systemctl enable --now vipd
systemctl restart vipd
