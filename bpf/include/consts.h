/* consts.h: every tunable, flag and numeric code of the vipd datapath.
 *
 * Tunables are "#ifndef X / #define X default" so the loader can override them with -D flags
 * (agent/datapath/api.py Features). Flags and codes are mirrored by name in
 * agent/datapath/abi.py; tests/bpf/test_abi.py checks that both sides agree.
 */
#pragma once

/* ---- tunables (loader -D flags) ---- */
/* MAX_SERVICES, MAX_BACKENDS, MAX_MEMBERS and MAGLEV_SLOTS are defaults only: the agent
 * sizes them from the configuration (agent/datapath/capacity.py) and grows them by a reload. */
#ifndef MAX_SERVICES
#define MAX_SERVICES 65536        /* service ids 1..MAX_SERVICES-1 (0 unused) */
#endif
#ifndef MAX_BACKENDS
#define MAX_BACKENDS 65536        /* backend ids 1..MAX_BACKENDS-1; id 0 = "no backend" */
#endif
#ifndef MAX_MEMBERS
#define MAX_MEMBERS 262144        /* {service, backend} memberships (svc_backends) */
#endif
#ifndef MAGLEV_SLOTS
#define MAGLEV_SLOTS (1 << 22)    /* u32 slots shared by all services' Maglev tables */
#endif
#ifndef CT_SIZE
#define CT_SIZE (1 << 18)         /* conntrack LRU entries (one per flow, two per local non-designated flow) */
#endif
#ifndef SNAT_SLOTS
#define SNAT_SLOTS (1 << 18)      /* SNAT node-port slots (power of 2; keep live SNAT flows below ~half) */
#endif
#ifndef DSR_FLOW_SLOTS
#define DSR_FLOW_SLOTS (1 << 18)  /* DSR flow table slots (power of 2; the agent: ct_size rounded up) */
#endif
#ifndef DSR_FLOW_PROBES
#define DSR_FLOW_PROBES 4         /* adjacent slots a DSR flow may sit in (then conntrack takes it) */
#endif
#define DSR_TICK_SHIFT 8          /* dsr_flow.last_seen ticks: jiffies >> 8 (0.26-2.6 s by HZ) */
#ifndef CT_MAP_FLAGS
#define CT_MAP_FLAGS 0   /* common LRU (BPF_F_NO_COMMON_LRU measured no faster here) */
#endif
#ifndef AFFINITY_SIZE
#define AFFINITY_SIZE 65536
#endif
#ifndef SRC_RANGE_SIZE
#define SRC_RANGE_SIZE 16384
#endif
#ifndef HASH_SEED
#define HASH_SEED 0x4a4c6676      /* flow hash seed: must be equal on every node */
#endif
#ifndef SNAT_PORT_MIN
#define SNAT_PORT_MIN 61000       /* above Linux's default ephemeral range (32768-60999) */
#endif
#ifndef SNAT_PORT_MAX
#define SNAT_PORT_MAX 65535
#endif
#ifndef SNAT_PORT_TRIES
#define SNAT_PORT_TRIES 8         /* random probes for a free (or reusable) SNAT port */
#endif
#ifndef CT_CLOSE_TIMEOUT_S
#define CT_CLOSE_TIMEOUT_S 10     /* a SNAT port whose TCP flow saw FIN/RST is reusable after this */
#endif
#ifndef CT_TCP_IDLE_TIMEOUT_S
#define CT_TCP_IDLE_TIMEOUT_S 21600  /* ... or after this long without a reply (Cilium: 6 h) */
#endif
#ifndef CT_SYN_TIMEOUT_S
#define CT_SYN_TIMEOUT_S 60       /* ... or this long after its claim if no reply ever came */
#endif
#ifndef CT_UDP_IDLE_TIMEOUT_S
#define CT_UDP_IDLE_TIMEOUT_S 60
#endif
#ifndef DERIVE_LOCAL_REPLIES
#define DERIVE_LOCAL_REPLIES 1    /* designated local flows get no REPLY entry (see revnat.h) */
#endif
#ifndef NEIGH_SLOTS
#define NEIGH_SLOTS 4096          /* next-hop cache slots per CPU (power of 2; slot = backend id % N) */
#endif
#ifndef NEIGH_CLIENT_SALT
#define NEIGH_CLIENT_SALT 0x800   /* SNAT replies cache the hop to a client at a slot from its address,
				   * offset so small backend ids and clients do not share slots */
#endif
#ifndef PIN_DIR
#define PIN_DIR "/sys/fs/bpf/vipd/default"
#endif
#ifndef SIZED_PIN_DIR
#define SIZED_PIN_DIR PIN_DIR     /* the maps sized from the configuration (maps.h) */
#endif
#define MAX_V6_EXT_HDRS 4         /* IPv6 extension headers walked before giving up (pass) */

/* ---- service flags (svc_val.flags) ---- */
#define SVC_F_LOCAL_ONLY     (1 << 0)  /* externalTrafficPolicy=Local: table holds local backends only */
#define SVC_F_DSR            (1 << 1)  /* remote backends reached by DSR (IP option), else SNAT */
#define SVC_F_AFFINITY       (1 << 2)  /* ClientIP session affinity, svc_val.affinity_timeout seconds */
#define SVC_F_SOURCE_RANGES  (1 << 3)  /* source must match src_ranges {svc_id, saddr} */
#define SVC_F_STATELESS      (1 << 4)  /* no forward conntrack entry: Maglev decides every packet */
#define SVC_F_WILDCARD       (1 << 5)  /* address-only entry {vip, 0, 0}: "this address is a VIP" */

/* ---- backend flags (backend.flags) ---- */
#define BE_F_ACTIVE          (1 << 0)  /* slot in use */
#define BE_F_LOCAL           (1 << 1)  /* runs on this node: DNAT and pass to the stack */
#define BE_F_TERMINATING     (1 << 2)  /* keeps established flows, no new ones */

/* ---- conntrack ---- */
#define CT_DIR_SERVICE 1   /* key = client -> VIP tuple; value names the backend */
#define CT_DIR_REPLY   2   /* key = tuple of the reply as it leaves the backend; value = rewrite */
#define CT_F_LOCAL     (1 << 0)
#define CT_F_SNAT      (1 << 1)
#define CT_F_DSR       (1 << 2)
#define CT_F_STATELESS (1 << 3)
#define CT_F_CLOSING   (1 << 4)   /* SNAT: FIN or RST seen; the port frees CT_CLOSE_TIMEOUT_S later */
#define CT_F_REPLIED   (1 << 5)   /* SNAT port slot: a reply came back (else it frees CT_SYN_TIMEOUT_S later) */
#define CT_F_ESTABLISHED (1 << 6) /* DSR flow slot: a packet after the first came (else it frees CT_SYN_TIMEOUT_S later) */

/* ---- hooks: index into stats (hook * NUM_STATS + stat) ---- */
#define HOOK_XDP        0
#define HOOK_TC_INGRESS 1
#define HOOK_TC_EGRESS  2
#define NUM_HOOKS       3

/* ---- per-CPU statistics (stats map), stable indices ---- */
#define STAT_PASS         0   /* verdict: to the stack (XDP_PASS / TC_ACT_OK); sum of verdicts = packets */
#define STAT_TX           1   /* verdict: XDP_TX */
#define STAT_REDIRECT     2   /* verdict: redirect */
#define STAT_DROP         3   /* verdict: drop (reason in the drops map) */
#define STAT_NON_SERVICE  4   /* IP packet not for a service: untouched */
#define STAT_UNPARSED     5   /* not IP, or headers that do not parse: untouched */
#define STAT_CT_HIT       6   /* service packet of an established flow */
#define STAT_CT_NEW       7   /* service packet that chose a backend */
#define STAT_REVNAT       8   /* reply rewritten back to VIP:port (local / DSR backends, tc) */
#define STAT_SNAT_REPLY   9   /* SNAT reply reversed (XDP) */
#define STAT_DSR_OPT     10   /* DSR option inserted */
#define STAT_DSR_RECORD  11   /* DSR option seen and recorded on a backend node (tc) */
#define STAT_ICMP_MAPPED 12   /* ICMP error mapped to its service flow */
#define STAT_AFFINITY    13   /* backend taken from the affinity map */
#define STAT_FRAGMENT    14   /* fragment seen (dropped if to a VIP, else untouched) */
#define STAT_NEIGH_PUNT  15   /* rewritten, but no neighbour entry: passed to the stack to resolve it */
#define STAT_SNAT_REUSE  16   /* a SNAT port of a closed/idle flow was taken over */
#define NUM_STATS        17

/* Ethernet / IP constants, big-endian where compared to packet fields. */
#define ETH_P_IP_BE    0x0008
#define ETH_P_IPV6_BE  0xDD86
#define ETH_P_8021Q_BE 0x0081
#define ETH_P_8021AD_BE 0xA888
#define IP_MF_OFFSET_BE 0xFF3F   /* htons(IP_MF | IP_OFFSET) */
#define IP_OFFSET_BE    0xFF1F   /* htons(IP_OFFSET) */

#define NEXTHDR_HOP     0
#define NEXTHDR_ROUTING 43
#define NEXTHDR_FRAGMENT 44
#define NEXTHDR_AUTH    51
#define NEXTHDR_DEST    60
#define NEXTHDR_NONE    59

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10

/* DSR option (Cilium's "opt" dispatch layout, bpf/lib/dsr.h):
 * IPv4: option type = copy(1) | class 0 | number 26 = 0x9a, length 8: type, len, port, addr.
 * IPv6: Destination Options header (8-byte aligned, 24 bytes) with option type 0x1B
 *       (00 = skip if unknown, 0 = does not change en route, 11011 unassigned), length 20. */
#define DSR_IPV4_OPT_TYPE 0x9a
#define DSR_IPV4_OPT_LEN  8
#define DSR_IPV6_OPT_TYPE 0x1b
#define DSR_IPV6_OPT_LEN  20
#define DSR_IPV6_EXT_LEN  2      /* hdrlen in 8-byte units, not counting the first 8 */

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "vipd's datapath assumes a little-endian host"
#endif
#ifndef bpf_ntohs
#define bpf_ntohs(x) ((__u16)__builtin_bswap16(x))
#define bpf_htons(x) ((__be16)__builtin_bswap16(x))
#define bpf_ntohl(x) ((__u32)__builtin_bswap32(x))
#define bpf_htonl(x) ((__be32)__builtin_bswap32(x))
#endif
