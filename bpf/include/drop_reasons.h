/* drop_reasons.h: why a packet was dropped. Index of the drops map, exported as metric labels.
 *
 * Codes are stable: never renumber, never reuse; retire a code by renaming it DROP_UNUSED_<n>.
 * Mirrored in agent/datapath/abi.py (DropReason), checked by tests/bpf/test_abi.py.
 */
#pragma once

#define DROP_NO_BACKEND        1  /* service has no backend for new flows (empty table or slot 0) */
#define DROP_NO_LOCAL_BACKEND  2  /* externalTrafficPolicy=Local and no backend on this node */
#define DROP_SOURCE_RANGE      3  /* source address not in the service's loadBalancerSourceRanges */
#define DROP_FRAGMENT          4  /* IP fragment addressed to a VIP (ports unknown: never guessed) */
#define DROP_FIB_LOOKUP        5  /* no route towards a remote backend or client (no neighbour: punted, not dropped) */
#define DROP_SNAT_NO_PORT      6  /* no free or reusable SNAT port after SNAT_PORT_TRIES probes */
#define DROP_DSR_UNSUPPORTED   7  /* DSR option cannot be added (IPv4 options / IPv6 ext headers present) */
#define DROP_HEADROOM          8  /* adjust_head for the DSR option failed */
#define DROP_STALE_BACKEND     9  /* Maglev slot names a backend id that is not programmed */
#define DROP_NO_NODE_ADDR     10  /* SNAT mode but no node address of that family configured */
#define DROP_REWRITE          11  /* a header store failed half-way (should never happen) */
#define DROP_MAX              32  /* size of the drops map */
