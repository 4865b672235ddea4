"""Service sessionAffinity / sessionAffinityConfig / loadBalancerSourceRanges (and the legacy
source-ranges annotation): Kubernetes' defaults, bounds and precedence, and errors that name
the field path and the bad entry."""

from __future__ import annotations

import ipaddress

import pytest
import yaml

from agent.config import load_documents
from agent.config.core import SOURCE_RANGES_ANNOTATION

ANNOTATION_PATH = f"metadata.annotations[{SOURCE_RANGES_ANNOTATION}]"


def service(annotations=None, **spec):
    doc = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": "web", "namespace": "shop", "annotations": annotations or {}},
           "spec": {"type": "LoadBalancer", "ports": [{"port": 80}], **spec}}
    return yaml.safe_dump(doc)


def load(text):
    result = load_documents(text, "svc.yaml")
    assert result.errors == [], [str(e) for e in result.errors]
    (svc,) = result.objects.services
    return svc


def error(text):
    result = load_documents(text, "svc.yaml")
    assert result.objects.services == (), "an invalid Service must not be loaded"
    (err,) = result.errors
    assert str(err).startswith("svc.yaml: Service/shop/web: "), str(err)
    return err


def nets(*cidrs):
    return tuple(ipaddress.ip_network(c) for c in cidrs)


# ------------------------------------------------------------------------- session affinity


def test_affinity_is_off_by_default_and_clientip_defaults_to_three_hours():
    assert load(service()).affinity_timeout == 0
    assert load(service(sessionAffinity="None")).affinity_timeout == 0
    assert load(service(sessionAffinity="ClientIP")).affinity_timeout == 10800
    assert load(service(sessionAffinity="ClientIP", sessionAffinityConfig={})).affinity_timeout == 10800
    assert load(service(sessionAffinity="ClientIP",
                        sessionAffinityConfig={"clientIP": {}})).affinity_timeout == 10800
    assert load(service(sessionAffinity="ClientIP",
                        sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}})).affinity_timeout == 60


@pytest.mark.parametrize("seconds", [1, 86400])
def test_affinity_timeout_bounds_are_inclusive(seconds):
    svc = load(service(sessionAffinity="ClientIP",
                       sessionAffinityConfig={"clientIP": {"timeoutSeconds": seconds}}))
    assert svc.affinity_timeout == seconds


@pytest.mark.parametrize("seconds", [0, -5, 86401])
def test_affinity_timeout_out_of_bounds_names_the_field_and_the_range(seconds):
    err = error(service(sessionAffinity="ClientIP",
                        sessionAffinityConfig={"clientIP": {"timeoutSeconds": seconds}}))
    assert err.field == "spec.sessionAffinityConfig.clientIP.timeoutSeconds"
    assert "1..86400" in err.message and str(seconds) in err.message


def test_unknown_session_affinity_lists_the_allowed_values():
    err = error(service(sessionAffinity="Cookie"))
    assert err.field == "spec.sessionAffinity"
    assert "'None'" in err.message and "'ClientIP'" in err.message and "Cookie" in err.message


def test_affinity_config_without_clientip_affinity_is_refused_like_the_api_server():
    err = error(service(sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}}))
    assert err.field == "spec.sessionAffinityConfig"
    assert "sessionAffinity is None" in err.message


# ---------------------------------------------------------------------------- source ranges


def test_no_ranges_means_everyone():
    assert load(service()).source_ranges == ()
    assert load(service(loadBalancerSourceRanges=[])).source_ranges == ()
    assert load(service({SOURCE_RANGES_ANNOTATION: "  "})).source_ranges == ()


def test_ranges_are_parsed_like_kubernetes_spaces_trimmed_host_bits_masked_duplicates_merged():
    svc = load(service(loadBalancerSourceRanges=[" 198.51.100.7/24 ", "fd00:1::/64", "10.0.0.0/8",
                                                 "198.51.100.0/24"]))
    assert svc.source_ranges == nets("10.0.0.0/8", "198.51.100.0/24", "fd00:1::/64")


def test_annotation_is_read_when_the_field_is_empty():
    svc = load(service({SOURCE_RANGES_ANNOTATION: "203.0.113.0/24, 2001:db8::/48 ,10.1.0.0/16"}))
    assert svc.source_ranges == nets("10.1.0.0/16", "203.0.113.0/24", "2001:db8::/48")


def test_the_field_wins_over_the_annotation():
    svc = load(service({SOURCE_RANGES_ANNOTATION: "203.0.113.0/24"},
                       loadBalancerSourceRanges=["192.0.2.0/24"]))
    assert svc.source_ranges == nets("192.0.2.0/24")
    # the annotation is not even validated then (Kubernetes reads only one of the two)
    svc = load(service({SOURCE_RANGES_ANNOTATION: "not-a-cidr"}, loadBalancerSourceRanges=["192.0.2.0/24"]))
    assert svc.source_ranges == nets("192.0.2.0/24")


def test_bad_range_error_names_the_index_and_the_entry():
    err = error(service(loadBalancerSourceRanges=["192.0.2.0/24", "192.0.2.0/33"]))
    assert err.field == "spec.loadBalancerSourceRanges[1]"
    assert "'192.0.2.0/33' is not a CIDR" in err.message


def test_every_bad_range_is_reported():
    result = load_documents(service(loadBalancerSourceRanges=["nope", "10.0.0.0/8", "fd00::/129"]))
    assert [e.field for e in result.errors] == ["spec.loadBalancerSourceRanges[0]",
                                                "spec.loadBalancerSourceRanges[2]"]


def test_a_plain_address_is_not_a_range_and_the_error_says_how_to_write_one():
    err = error(service(loadBalancerSourceRanges=["192.0.2.9"]))
    assert err.field == "spec.loadBalancerSourceRanges[0]"
    assert "192.0.2.9/32" in err.message
    err = error(service(loadBalancerSourceRanges=["2001:db8::9"]))
    assert "2001:db8::9/128" in err.message


def test_bad_annotation_entry_is_named_with_its_position():
    err = error(service({SOURCE_RANGES_ANNOTATION: "203.0.113.0/24,203.0.113.300/32"}))
    assert err.field == ANNOTATION_PATH
    assert "entry 2" in err.message and "'203.0.113.300/32'" in err.message


@pytest.mark.parametrize("kind", ["ClusterIP", "NodePort"])
def test_ranges_only_on_loadbalancer_services(kind):
    err = error(service(type=kind, loadBalancerSourceRanges=["192.0.2.0/24"]))
    assert err.field == "spec.loadBalancerSourceRanges"
    assert "LoadBalancer" in err.message and kind in err.message
    err = error(service({SOURCE_RANGES_ANNOTATION: "192.0.2.0/24"}, type=kind))
    assert err.field == ANNOTATION_PATH


def test_kubectl_output_of_a_plain_service_still_loads():
    # what `kubectl get svc -o yaml` prints for a Service that sets none of these
    svc = load(service(sessionAffinity="None", type="ClusterIP", clusterIP="10.96.0.10"))
    assert (svc.affinity_timeout, svc.source_ranges) == (0, ())
