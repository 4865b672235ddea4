"""Names and numbers shared with the C datapath (bpf/include/consts.h, drop_reasons.h).

Only enums, flags and map names are mirrored here; struct layouts are never re-declared in
Python (bcc derives them from bpf/include/structs.h). tests/bpf/test_abi.py parses the C
headers and fails when the two sides drift.
"""

from __future__ import annotations

import enum

__all__ = [
    "SvcFlag", "BackendFlag", "CtDir", "CtFlag", "Hook", "Stat", "DropReason", "XdpAction",
    "TcAction", "MapName", "DSR_IPV4_OPT_TYPE", "DSR_IPV4_OPT_LEN", "DSR_IPV6_OPT_TYPE",
    "DSR_IPV6_OPT_LEN", "DSR_IPV6_EXT_LEN", "NUM_STATS", "DROP_MAX",
]


class SvcFlag(enum.IntFlag):       # SVC_F_*
    LOCAL_ONLY = 1 << 0
    DSR = 1 << 1
    AFFINITY = 1 << 2
    SOURCE_RANGES = 1 << 3
    STATELESS = 1 << 4
    WILDCARD = 1 << 5


class BackendFlag(enum.IntFlag):   # BE_F_*
    ACTIVE = 1 << 0
    LOCAL = 1 << 1
    TERMINATING = 1 << 2


class CtDir(enum.IntEnum):         # CT_DIR_*
    SERVICE = 1
    REPLY = 2


class CtFlag(enum.IntFlag):        # CT_F_*
    LOCAL = 1 << 0
    SNAT = 1 << 1
    DSR = 1 << 2
    STATELESS = 1 << 3
    CLOSING = 1 << 4
    REPLIED = 1 << 5
    ESTABLISHED = 1 << 6


class Hook(enum.IntEnum):          # HOOK_*
    XDP = 0
    TC_INGRESS = 1
    TC_EGRESS = 2


class Stat(enum.IntEnum):          # STAT_*: index hook * NUM_STATS + stat in stats_v1
    PASS = 0
    TX = 1
    REDIRECT = 2
    DROP = 3
    NON_SERVICE = 4
    UNPARSED = 5
    CT_HIT = 6
    CT_NEW = 7
    REVNAT = 8
    SNAT_REPLY = 9
    DSR_OPT = 10
    DSR_RECORD = 11
    ICMP_MAPPED = 12
    AFFINITY = 13
    FRAGMENT = 14
    NEIGH_PUNT = 15
    SNAT_REUSE = 16


NUM_STATS = 17


class DropReason(enum.IntEnum):    # DROP_*: stable codes, never renumbered
    NO_BACKEND = 1
    NO_LOCAL_BACKEND = 2
    SOURCE_RANGE = 3
    FRAGMENT = 4
    FIB_LOOKUP = 5
    SNAT_NO_PORT = 6
    DSR_UNSUPPORTED = 7
    HEADROOM = 8
    STALE_BACKEND = 9
    NO_NODE_ADDR = 10
    REWRITE = 11


DROP_MAX = 32


class XdpAction(enum.IntEnum):
    ABORTED = 0
    DROP = 1
    PASS = 2
    TX = 3
    REDIRECT = 4


class TcAction(enum.IntEnum):
    OK = 0
    SHOT = 2


class MapName(str, enum.Enum):
    """Map names (also their file names under the pin directory)."""

    SERVICES = "services_v2"
    BACKENDS = "backends_v2"
    SVC_BACKENDS = "svc_backends_v1"
    REVNAT = "revnat_v1"
    MAGLEV = "maglev_v1"
    CT = "ct_v2"
    DSR_FLOWS = "dsr_flows_v1"
    SNAT_PORTS = "snat_ports_v2"
    AFFINITY = "affinity_v1"
    SRC_RANGES = "src_ranges_v1"
    NODE_CFG = "node_cfg_v1"
    STATS = "stats_v1"
    DROPS = "drops_v1"
    SVC_STATS = "svc_stats_v1"


DSR_IPV4_OPT_TYPE = 0x9A
DSR_IPV4_OPT_LEN = 8
DSR_IPV6_OPT_TYPE = 0x1B
DSR_IPV6_OPT_LEN = 20
DSR_IPV6_EXT_LEN = 2
