"""Pure control-plane logic: node config, advertisements, route policies, LB-IPAM, conditions,
migration. No I/O; see docs/internal/controlplane-api.md for the contract with the daemon."""

from agent.controlplane import lbipam  # noqa: F401
from agent.controlplane.advertisements import (  # noqa: F401
    all_desired_paths,
    desired_paths,
    effective_services,
    route_policies,
    selections,
)
from agent.controlplane.conditions import (  # noqa: F401
    cluster_config_conditions,
    node_config_object,
    node_config_status,
    peer_config_conditions,
    reconcile_error_condition,
)
from agent.controlplane.nodeconfig import derive_node_config  # noqa: F401
from agent.controlplane.validation import validate_objects  # noqa: F401
from agent.controlplane.types import (  # noqa: F401
    AgentOptions,
    BgpInstance,
    Condition,
    ConfigIssue,
    FamilySpec,
    LbIpamResult,
    NodeConfigResult,
    PeerSpec,
    PolicyPrefix,
    PolicyStatement,
    RoutePolicy,
    to_data,
)
