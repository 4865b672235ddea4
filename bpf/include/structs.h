/* structs.h: the key/value layouts of every map, declared once.
 *
 * Python never re-declares these: it reads the layouts bcc derives from this file
 * (BPF[...].Key / .Leaf ctypes) and only fills fields by name. Addresses are stored as four
 * raw network-order 32-bit words; an IPv4 address uses word 0 and words 1..3 are zero.
 * Ports are network order (__be16) everywhere.
 */
#pragma once

struct svc_key {            /* services: frontend (VIP, port, protocol) */
	__u32 addr[4];
	__be16 port;        /* 0 in an SVC_F_WILDCARD entry */
	__u8 proto;         /* IPPROTO_TCP / IPPROTO_UDP; 0 in a wildcard entry */
	__u8 family;        /* 4 or 6 */
};

struct svc_val {
	__u32 id;           /* service id: index of svc_stats, part of affinity/src_ranges keys */
	__u32 flags;        /* SVC_F_* */
	__u32 table_off;    /* first slot of this service's Maglev table in maglev[] */
	__u32 table_size;   /* M (prime); 0 = no backend for new flows */
	__u32 affinity_timeout; /* seconds, with SVC_F_AFFINITY */
	__u32 table_cap;    /* slots allocated at table_off (== M): kept when the table is empty */
	__u32 backend_gen;  /* bumped when a backend leaves this service (see svc_backends) */
};

struct backend {            /* backends[id] */
	__u32 addr[4];
	__be16 port;
	__u8 family;
	__u8 flags;         /* BE_F_* */
	__u32 revnat_svc;   /* local backend: the service whose flows get no REPLY entry, because
			     * tc derives their reply rewrite from revnat[] + the SERVICE entry */
};

struct svc_member_key {     /* svc_backends: backend_id is (still) one of svc_id's backends */
	__u32 svc_id;
	__u32 backend_id;
};

struct revnat_val {         /* revnat[{backend addr, port, proto, family}] (key: struct svc_key) */
	__u32 vip[4];       /* the designated service's frontend */
	__be16 vport;
	__u16 pad;
	__u32 svc_id;
	__u32 backend_id;
};

struct ct_key {             /* conntrack (LRU) */
	__u32 saddr[4];
	__u32 daddr[4];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 family;
	__u8 dir;           /* CT_DIR_SERVICE / CT_DIR_REPLY */
	__u8 pad;
};

struct ct_val {
	/* What an established packet reads comes first: with the LRU element's header (~48 B)
	 * and the 40 B key in front, these fields share the key's second cache line, so a hit
	 * touches two lines, not three (ct_v1 had the addresses first). */
	__u32 backend_id;   /* SERVICE: the flow's backend */
	__u32 svc_id;
	__u32 svc_gen;      /* SERVICE: svc_val.backend_gen when the backend was last known a member */
	__u16 flags;        /* CT_F_* */
	__be16 nat_port;    /* SERVICE with CT_F_SNAT: the node port allocated to the flow */
	__be16 rport;       /* REPLY: new source port (the service port) */
	__be16 rdport;      /* REPLY with CT_F_SNAT: new destination port (the client's port) */
	__u32 last_seen;    /* REPLY with CT_F_SNAT: seconds since boot (now_s) of the last packet */
	__u32 raddr[4];     /* REPLY: new source address (the VIP); SERVICE with CT_F_SNAT: the
			     * backend address nat_port was allocated towards (rport: its port) */
	__u32 rdaddr[4];    /* REPLY with CT_F_SNAT: new destination address (the client) */
};  /* no timestamp: reading the clock cost ~40 ns per call on the new-flow path; the LRU ages entries */

struct snat_slot {          /* snat_ports[snat_slot_index(backend, bport, nat_port, proto)]: a claimed node port
			     * and, found through snat_flows, the flow's forward state (no SERVICE entry) */
	__u64 seq;          /* even: stable; odd: being written (a claim: cmpxchg s -> s+1, fields, s+2);
			     * 64 bits: bcc's clang has 64-bit BPF atomics only */
	__u32 backend_id;   /* 0: free */
	__u32 baddr[4];     /* tag (what a reply carries): the backend address, */
	__be16 bport;       /* its port, */
	__be16 nat_port;    /* the node port, */
	__u8 proto;         /* protocol */
	__u8 family;        /* and family */
	__u16 flags;        /* CT_F_SNAT, CT_F_CLOSING */
	__u32 last_seen;    /* now_s() of the claim or the last reply */
	__u32 svc_id;
	__u32 svc_gen;      /* svc_val.backend_gen when the backend was last known a member (as ct_val) */
	__u32 flow_idx;     /* a slot of vipd before SNAT lines: the flow's snat_flows index; now 0 (a
			     * SNAT flow's forward state is its line in dsr_flows, lb.h "Flow table") */
	__u32 caddr[4];     /* replies go back to the client caddr:cport */
	__u32 vaddr[4];     /* from the VIP vaddr:vport */
	__be16 cport;
	__be16 vport;
};

struct dsr_flow {           /* dsr_flows[dsr_flow_start(flow) + 0..DSR_FLOW_PROBES-1]: one DSR or SNAT
			     * flow in one 64-B cache line, key and state inline (lb.h "Flow table").
			     * backend_id != 0 with proto 0: a tombstone (matches no flow, reusable) */
	__u64 seq;          /* even: stable; odd: being written (claim: cmpxchg s -> s+1, fields, s+2) */
	__u32 saddr[4];     /* the client flow: client address, */
	__u32 daddr[4];     /* VIP, */
	__be16 sport;       /* client port, */
	__be16 dport;       /* service port, */
	__u8 proto;         /* protocol */
	__u8 family;        /* and family */
	__u16 flags;        /* CT_F_DSR, CT_F_ESTABLISHED, CT_F_CLOSING */
	__u32 backend_id;   /* 0: free */
	__u32 svc_id;
	__u32 svc_gen;      /* svc_val.backend_gen when the backend was last known a member (as ct_val) */
	union {
		__u32 last_seen;    /* DSR line: ticks (jiffies >> DSR_TICK_SHIFT) of the last packet;
				     * written only when it changes */
		struct {
			__be16 nat_port;   /* SNAT line (CT_F_SNAT): the node port of its port slot, */
			__u16 nat_pad;     /* whose state (last_seen, CLOSING) is the line's too */
		};
	};
};

struct affinity_key {
	__u32 addr[4];      /* client address */
	__u32 svc_id;
};

struct affinity_val {
	__u64 last_used_ns;  /* bpf_ktime_get_coarse_ns() */
	__u32 backend_id;
	__u32 svc_gen;      /* svc_val.backend_gen when the backend was last known a member */
};

struct src_range_key {      /* LPM trie: prefixlen counts svc_id (32 bits) + address bits */
	__u32 prefixlen;
	__u32 svc_id;
	__u32 addr[4];
};

struct node_addr {          /* node_cfg[0] = IPv4, node_cfg[1] = IPv6: source of SNAT */
	__u32 addr[4];
	__u32 valid;
};

struct svc_counter {        /* svc_stats[svc_id] (per CPU) */
	__u64 packets;
	__u64 bytes;
};

struct neigh_cfg {          /* neigh_cfg[0], written by the agent */
	__u32 gen;          /* entries of another generation are misses (Datapath.flush_neighbours) */
	__u32 ttl;          /* jiffies an entry is used for (the loader measures HZ); 0: no caching */
	__u32 hz;           /* the kernel's HZ as measured by the loader (now_s in lb.h); 0: unknown */
};

struct neigh_entry {        /* neigh (per CPU, slot = backend id % NEIGH_SLOTS): next-hop cache */
	__u32 addr[4];      /* tag: the destination the FIB lookup was made for */
	__u64 stamp;        /* bpf_jiffies64() at the lookup; 0 = empty */
	__u32 ingress;      /* tag: the ingress ifindex the lookup was made for */
	__u32 gen;          /* tag: neigh_cfg[0].gen at the lookup (the agent bumps it to flush) */
	__u32 ifindex;      /* egress interface */
	__u16 len_ok;       /* largest IP length the lookup accepted (the route's MTU check) */
	__u8 family;        /* tag: 4 or 6 */
	__u8 pad;
	__u8 smac[6];
	__u8 dmac[6];
};
