"""The mistakes the API server refuses are refused here too, with the reason (issue 9's cases)."""

import pytest

from agent.config import load_documents

CC = """\
apiVersion: cilium.io/v2
kind: CiliumBGPClusterConfig
metadata: {{name: c}}
spec:
  bgpInstances:
  - name: i1
    localASN: {asn}
    localPort: {port}
"""


def only_error(text: str) -> str:
    r = load_documents(text, "f.yaml")
    assert not r.objects.all(), r.objects.all()
    assert len(r.errors) == 1, [str(e) for e in r.errors]
    return str(r.errors[0])


@pytest.mark.parametrize("asn, port, field, says", [
    ("true", "179", "localASN", "a boolean is not a number"),
    ('"64512"', "179", "localASN", "write it without quotes"),
    ("64512.5", "179", "localASN", "integer"),
    ("64512", "70000", "localPort", "allowed: 1..65535"),
    ("64512", "yes", "localPort", "a boolean is not a number"),
])
def test_integer_fields_take_integers_in_range(asn, port, field, says):
    err = only_error(CC.format(asn=asn, port=port))
    assert f"f.yaml: CiliumBGPClusterConfig/c: spec.bgpInstances[0].{field}:" in err and says in err


@pytest.mark.parametrize("kind, suggestion", [
    ("BGPPeeringPolicy", "CiliumBGPPeeringPolicy"),
    ("CiliumBGPPeerconfig", "CiliumBGPPeerConfig"),
    ("CiliumLoadBalancerIpPool", "CiliumLoadBalancerIPPool"),
])
def test_unknown_kinds_in_cilium_io_are_errors_with_a_suggestion(kind, suggestion):
    err = only_error(f"apiVersion: cilium.io/v2alpha1\nkind: {kind}\nmetadata: {{name: x}}\n")
    assert f"kind: '{kind}' is not a kind of the cilium.io API group; did you mean {suggestion}?" in err


def test_kinds_that_exist_elsewhere_are_ignored_not_errors():
    r = load_documents("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: a}\n"
                       "---\napiVersion: v1\nkind: Pod\nmetadata: {name: b}\n"
                       "---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: c}\n"
                       "---\napiVersion: example.com/v1\nkind: Anything\nmetadata: {name: d}\n", "f.yaml")
    assert r.errors == [] and len(r.ignored) == 4


def test_node_internal_ip_must_be_an_address():
    err = only_error("apiVersion: v1\nkind: Node\nmetadata: {name: n}\n"
                     "status: {addresses: [{type: InternalIP, address: 10.233.2.311}]}\n")
    assert "Node/n: status.addresses[0].address: '10.233.2.311' is not an IPv4 or IPv6 address" in err


def test_a_key_twice_is_an_error_naming_the_path_and_line():
    err = only_error(CC.format(asn=1, port=179) + "    localASN: 2\n")
    assert "CiliumBGPClusterConfig/c: spec.bgpInstances[0].localASN: duplicate key 'localASN' (line 9)" in err


def test_unquoted_yes_in_a_label_says_to_quote_it():
    err = only_error("apiVersion: v1\nkind: Node\nmetadata: {name: n, labels: {bgp: yes}}\n")
    assert "metadata.labels.bgp" in err and "quote the value" in err


def test_list_items_must_be_objects_and_errors_name_the_item():
    assert "items: must be a list of objects, got an integer" in only_error(
        "apiVersion: v1\nkind: List\nitems: 5\n")
    r = load_documents("apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Node, metadata: {name: a}}\n"
                       "- {apiVersion: v1, kind: Node, metadata: {name: b}, spec: {podCIDR: 10.0.0.1/8}}\n",
                       "f.yaml")
    assert [n.name for n in r.objects.nodes] == ["a"]
    assert "Node/b: items[1].spec.podCIDR:" in str(r.errors[0])
