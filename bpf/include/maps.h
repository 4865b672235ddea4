/* maps.h: every map of the datapath, pinned under PIN_DIR so the maps outlive the agent.
 *
 * bcc's "type:path" section opens the pin when it exists (adoption after a restart) and
 * creates + pins it otherwise. Names carry a layout version (_v1): a changed layout gets a
 * new name instead of silently reusing an old pin.
 *
 * The maps whose size comes from the configuration (services, backends, memberships, revnat,
 * Maglev slots, per-service counters) are pinned under SIZED_PIN_DIR, which is PIN_DIR except
 * while the agent grows them: it then compiles against an empty staging directory, so bcc
 * creates bigger maps there while conntrack and affinity are adopted from PIN_DIR, copies the
 * contents over, renames the new pins over the old ones and swaps the programs
 * (agent/datapath/api.py Datapath.grow; docs/datapath.md "Capacity and growth").
 */
#pragma once

/* frontend -> service (plus one wildcard entry per VIP address) */
BPF_TABLE_PINNED("hash", struct svc_key, struct svc_val, services_v2, MAX_SERVICES * 2,
		 SIZED_PIN_DIR "/services_v2");
/* backend id -> address; id 0 is never written ("no backend") */
BPF_TABLE_PINNED("array", __u32, struct backend, backends_v2, MAX_BACKENDS, SIZED_PIN_DIR "/backends_v2");
/* service membership {svc_id, backend_id}: consulted only when a conntrack/affinity entry's
 * svc_gen differs from its service's backend_gen (a backend left that service since) */
BPF_TABLE_PINNED("hash", struct svc_member_key, __u32, svc_backends_v1, MAX_MEMBERS,
		 SIZED_PIN_DIR "/svc_backends_v1", BPF_F_NO_PREALLOC);
/* local backend {addr, port, proto, family} -> its designated service frontend (tc egress) */
BPF_TABLE_PINNED("hash", struct svc_key, struct revnat_val, revnat_v1, MAX_BACKENDS,
		 SIZED_PIN_DIR "/revnat_v1", BPF_F_NO_PREALLOC);
/* all Maglev tables: service s owns slots [table_off, table_off + table_size). Mmap-able: the
 * agent writes a service's table as one memcpy into the mapping and reads tables back from it
 * (no syscall per 64 Ki slots); a pin created before this flag still works through syscalls. */
BPF_TABLE_PINNED("array", __u32, __u32, maglev_v1, MAGLEV_SLOTS, SIZED_PIN_DIR "/maglev_v1",
		 BPF_F_MMAPABLE);
/* connection tracking: flows keep their backend; replies find their rewrite */
BPF_TABLE_PINNED("lru_hash", struct ct_key, struct ct_val, ct_v2, CT_SIZE, PIN_DIR "/ct_v2",
		 CT_MAP_FLAGS);
/* Flow table: a DSR or SNAT flow's backend (and a SNAT flow's node port) in one 64-B slot that
 * holds its tuple too, so an established packet costs one dependent cache miss, not two (the
 * LRU's bucket, then its element; for SNAT: the flow index, then the port slot). Mmap-able only
 * for the alignment: its values start on a page, so every slot is one cache line (a plain
 * array's values start at 56 mod 64). Flows that find no free slot, and DSR flows from before
 * this map, live in ct_v2 (lb.h "Flow table"). The name stays from when it held DSR flows only
 * (a new name would drop the DSR flows of a running node). */
BPF_TABLE_PINNED("array", __u32, struct dsr_flow, dsr_flows_v1, DSR_FLOW_SLOTS, PIN_DIR "/dsr_flows_v1",
		 BPF_F_MMAPABLE);
/* SNAT node ports: one slot per claimed (backend, bport, node port, proto), at an index hashed
 * from exactly what a reply carries; replaces the per-flow REPLY conntrack entry (an array
 * write instead of an LRU insert on the SYN path; docs/datapath.md "SNAT port slots") */
BPF_TABLE_PINNED("array", __u32, struct snat_slot, snat_ports_v2, SNAT_SLOTS, PIN_DIR "/snat_ports_v2");
/* SNAT flow index of vipd before SNAT lines: at snat_search_start(client flow) the port slot's
 * index + 1 (0: none). Read-only, after a flow-table miss, so SNAT flows established under the
 * old program keep backend and node port (lb.h "SNAT flow index"); nothing writes it now. */
BPF_TABLE_PINNED("array", __u32, __u32, snat_flows_v1, SNAT_SLOTS, PIN_DIR "/snat_flows_v1");
/* ClientIP session affinity */
BPF_TABLE_PINNED("lru_hash", struct affinity_key, struct affinity_val, affinity_v1, AFFINITY_SIZE,
		 PIN_DIR "/affinity_v1");
/* loadBalancerSourceRanges allow lists */
BPF_TABLE_PINNED("lpm_trie", struct src_range_key, __u8, src_ranges_v1, SRC_RANGE_SIZE,
		 PIN_DIR "/src_ranges_v1", BPF_F_NO_PREALLOC);
/* node addresses used as SNAT source */
BPF_TABLE_PINNED("array", __u32, struct node_addr, node_cfg_v1, 2, PIN_DIR "/node_cfg_v1");
/* counters */
BPF_TABLE_PINNED("percpu_array", __u32, __u64, stats_v1, NUM_HOOKS * NUM_STATS, PIN_DIR "/stats_v1");
BPF_TABLE_PINNED("percpu_array", __u32, __u64, drops_v1, DROP_MAX, PIN_DIR "/drops_v1");
BPF_TABLE_PINNED("percpu_array", __u32, struct svc_counter, svc_stats_v1, MAX_SERVICES,
		 SIZED_PIN_DIR "/svc_stats_v1");

/* What a SNAT port claim took over: the stale slot's flow's backend and port (lb.h
 * snat_port_for cleans up after it) */
struct snat_prev {
	__u32 bid;          /* 0: the slot was free (or already this flow's) */
	__be16 port;
	__u16 pad;
};

/* per-CPU scratch space for large temporaries (not pinned: holds no state between packets) */
struct scratch {
	struct ct_val v;
	struct snat_prev prev;
	struct bpf_fib_lookup fib;
	__u32 opaque;   /* see lb_handle: hides a value from the verifier's constant tracking */
};
BPF_TABLE("percpu_array", __u32, struct scratch, scratch_v1, 1);

/* next-hop cache for remote backends (per CPU, not pinned: a new program starts empty); see
 * nh_resolve in lb.h. neigh_cfg[0]: the entries' lifetime in jiffies and the generation they
 * must carry (the agent bumps it to invalidate every entry at once). */
BPF_TABLE("percpu_array", __u32, struct neigh_entry, neigh_v1, NEIGH_SLOTS);
BPF_TABLE("array", __u32, struct neigh_cfg, neigh_cfg_v1, 1);

static __always_inline void stat_inc(__u32 hook, __u32 stat)
{
	__u32 idx = hook * NUM_STATS + stat;
	__u64 *v = stats_v1.lookup(&idx);
	if (v)
		*v += 1;
}

static __always_inline void drop_inc(__u32 reason)
{
	__u64 *v = drops_v1.lookup(&reason);
	if (v)
		*v += 1;
}
