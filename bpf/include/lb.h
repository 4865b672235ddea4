/* lb.h: the service path of the XDP program.
 *
 * lb_handle():  service lookup (VIP, port, proto) -> source-range check -> conntrack ->
 *               (affinity | Maglev) -> local DNAT (pass to the stack) or remote backend
 *               (SNAT or DSR option, FIB lookup, XDP_TX / redirect).
 * snat_reply(): replies to SNATed flows, addressed to node:nat_port, reversed to VIP -> client.
 * Every rewrite happens only after every check that could refuse the packet has passed,
 * so a refused packet is never half-rewritten.
 */
#pragma once

static __always_inline int verdict(__u32 hook, int action)
{
	switch (action) {
	case XDP_PASS: stat_inc(hook, STAT_PASS); break;
	case XDP_TX: stat_inc(hook, STAT_TX); break;
	case XDP_REDIRECT: stat_inc(hook, STAT_REDIRECT); break;
	default: stat_inc(hook, STAT_DROP); break;
	}
	return action;
}

static __always_inline int drop(__u32 reason)
{
	drop_inc(reason);
	return verdict(HOOK_XDP, XDP_DROP);
}

/* Flow hash for Maglev: saddr, ports, protocol; never the destination address, so every node
 * (and every VIP of the same backend set) derives the same slot. */
static __always_inline __u32 flow_hash_tuple(const __u32 *saddr, __u8 family, __be16 sport,
					       __be16 dport, __u8 proto)
{
	__u32 a;

	if (family == 4) {
		a = bpf_ntohl(saddr[0]);
	} else {
		a = jhash_2words(jhash_2words(bpf_ntohl(saddr[0]), bpf_ntohl(saddr[1]), HASH_SEED),
				 jhash_2words(bpf_ntohl(saddr[2]), bpf_ntohl(saddr[3]), HASH_SEED),
				 HASH_SEED);
	}
	return jhash_3words(a, ((__u32)bpf_ntohs(dport) << 16) | bpf_ntohs(sport), proto, HASH_SEED);
}

static __always_inline __u32 flow_hash(const struct pkt *p, __be16 sport)
{
	return flow_hash_tuple(p->saddr, p->family, sport, p->dport, p->proto);
}

/* Is bid still one of the service's backends? Checked through svc_backends only when the
 * entry's generation is older than the service's (a backend left the service since), so an
 * established flow costs nothing extra; a still-valid entry is brought up to date. */
static __always_inline int member_of(const struct svc_val *svc, __u32 svc_id, __u32 bid,
				     __u32 *entry_svc_id, __u32 *entry_gen, int refresh)
{
	__u32 gen = svc->backend_gen;

	if (*entry_gen == gen && *entry_svc_id == svc_id)
		return 1;
	struct svc_member_key mk = { .svc_id = svc_id, .backend_id = bid };
	if (!svc_backends_v1.lookup(&mk))
		return 0;
	if (refresh) {
		*entry_svc_id = svc_id;
		*entry_gen = gen;
	}
	return 1;
}

/* The backend an established flow goes on with (bid, from its conntrack entry or SNAT port
 * slot), or NULL: re-balance. Gone: re-balance; terminating: keep the flow but a new SYN
 * re-balances; removed from this service (even if another still uses it): re-balance. A SNAT
 * flow records its backend's address and port (e_bport != 0: the address its node port was
 * allocated towards): when a backend left this service since the entry was checked (the
 * generation differs) and the id now names another address (ids of removed backends are
 * reused), re-balance. e_svc_id/e_gen: the entry's, brought up to date when still valid. */
static __always_inline struct backend *flow_backend(const struct pkt *p, const struct svc_val *svc, __u32 svc_id,
						    __u32 bid, __u32 *e_svc_id, __u32 *e_gen, __be16 e_bport,
						    const __u32 *e_baddr)
{
	struct backend *be = backends_v2.lookup(&bid);

	if (!be || !(be->flags & BE_F_ACTIVE) ||
	    ((be->flags & BE_F_TERMINATING) && (p->tcp_flags & TCP_FLAG_SYN)))
		return NULL;
	if (e_bport && (*e_gen != svc->backend_gen || *e_svc_id != svc_id) &&
	    (e_bport != be->port || !addr_eq(e_baddr, be->addr)))
		return NULL;
	if (!member_of(svc, svc_id, bid, e_svc_id, e_gen, 1))
		return NULL;
	return be;
}

static __always_inline void flow_hit(const struct backend *be, __be16 *nat_port)
{
	if (be)
		stat_inc(HOOK_XDP, STAT_CT_HIT);
	else
		*nat_port = 0;
}

/* Seconds since boot, from jiffies: bpf_jiffies64() is inlined by the verifier, while
 * bpf_ktime_get_coarse_ns() is a helper call (~35 ns here), paid per SNAT flow and per SNAT
 * reply. jiffies_64 starts at INITIAL_JIFFIES, (u32)(-300 * HZ); neigh_cfg carries the HZ the
 * loader measured. Until it is written, the coarse clock (the same scale). */
static __always_inline __u32 now_s(void)
{
	__u32 zero = 0;
	struct neigh_cfg *cfg = neigh_cfg_v1.lookup(&zero);
	__u32 hz = cfg ? cfg->hz : 0;

	if (hz)
		return (bpf_jiffies64() - (__u64)(__u32)(-300 * (__s32)hz)) / hz;
	return bpf_ktime_get_coarse_ns() / 1000000000ULL;
}

/* ---- Flow table (DSR and SNAT flows) ------------------------------------------------------
 * A DSR flow (client:cport -> VIP:vport, proto) keeps its backend in dsr_flows, an array of
 * 64-B slots that hold the tuple as well, at one of DSR_FLOW_PROBES adjacent slots from an
 * index hashed from the flow (dsr_flow_start). A cold established packet so reads one cache
 * line (and its TLB miss) where a conntrack hit reads the LRU's bucket and then its element:
 * two misses in a row (docs/datapath.md, "The 100k-flow ACK"). A new flow takes its own slot,
 * else the first free or stale one (compare-and-swap on seq, as SNAT port slots); when every
 * probe holds a live flow it gets a conntrack SERVICE entry as before, so no flow loses its
 * backend. Non-SYN DSR packets look in the table, then in conntrack (the overflow, and flows
 * from before the table: no migration), then Maglev. Slots are never evicted, only reused
 * when stale (dsr_flow_stale); no slot is ever emptied, so a probe stops at a free one.
 * SNAT flows have lines in the same table (CT_F_SNAT, with the node port where a DSR line
 * keeps its clock): see "Flow table: SNAT lines" below. */
static __always_inline __u32 dsr_ticks(void)
{
	return bpf_jiffies64() >> DSR_TICK_SHIFT;   /* inlined, unlike the clock helpers */
}

static __always_inline __u32 dsr_flow_start(__u32 fh, const __u32 *vaddr)
{
	__u32 v = vaddr[0] ^ vaddr[3];

	v ^= v >> 16;   /* the VIP's varying octets reach the low (index) bits */
	v *= 0x7feb352d;
	v ^= v >> 15;
	return fh ^ v;   /* fh: flow_hash(p, p->sport), what Maglev uses */
}

static __always_inline int dsr_flow_is_tuple(const struct dsr_flow *s, const __u32 *saddr, const __u32 *daddr,
					     __be16 sport, __be16 dport, __u8 proto, __u8 family)
{
	return s->backend_id && s->sport == sport && s->dport == dport && s->proto == proto &&
	       s->family == family && addr_eq(s->saddr, saddr) && addr_eq(s->daddr, daddr);
}

static __always_inline int dsr_flow_is(const struct dsr_flow *s, const struct pkt *p)
{
	return dsr_flow_is_tuple(s, p->saddr, p->daddr, p->sport, p->dport, p->proto, p->family);
}

/* The line of flow (client saddr:sport -> VIP daddr:dport), read stable (not being written),
 * or NULL; *st: its backend, flags and (SNAT line) node port (LINE_BID, LINE_FLAGS,
 * LINE_NAT_PORT), read before the stability check (a line taken over after the check cannot
 * hand this flow another flow's backend or port). One u64, not three out-parameters: each
 * would take a slot of the 512-B stack. */
#define LINE_BID(st)      ((__u32)(st))
#define LINE_FLAGS(st)    ((__u16)((st) >> 32))
#define LINE_NAT_PORT(st) ((__be16)((st) >> 48))
static __always_inline struct dsr_flow *dsr_flow_find(const __u32 *saddr, const __u32 *daddr, __be16 sport,
						      __be16 dport, __u8 proto, __u8 family, __u32 start,
						      __u64 *st)
{
#pragma unroll
	for (int i = 0; i < DSR_FLOW_PROBES; i++) {
		__u32 idx = (start + i) & (DSR_FLOW_SLOTS - 1);
		struct dsr_flow *s = dsr_flows_v1.lookup(&idx);
		if (!s)
			return NULL;
		__u64 seq = *(volatile __u64 *)&s->seq;
		if (seq & 1)
			continue;          /* being written on another CPU: not trusted */
		if (!s->backend_id)
			return NULL;       /* a claim takes the first free slot: nothing of p beyond */
		if (dsr_flow_is_tuple(s, saddr, daddr, sport, dport, proto, family)) {
			__u32 b = *(volatile __u32 *)&s->backend_id;
			__u16 f = *(volatile __u16 *)&s->flags;
			__be16 np = *(volatile __be16 *)&s->nat_port;
			asm volatile("" ::: "memory");
			if (*(volatile __u64 *)&s->seq == seq) {
				*st = b | ((__u64)f << 32) | ((__u64)np << 48);
				return s;
			}
		}
	}
	return NULL;
}

/* May a live-looking slot be given to another flow? Closed (FIN/RST) CT_CLOSE_TIMEOUT_S after
 * its last packet, never a second packet for CT_SYN_TIMEOUT_S (a scan, a SYN flood), or idle
 * for the protocol's timeout. Ticks, not seconds: no division per packet; hz: neigh_cfg's
 * (0 before the loader measured it: 1000, the largest, so ages read short, never long). */
static __always_inline int dsr_flow_stale(const struct dsr_flow *s, __u32 now, __u32 hz)
{
	__u32 age = now - s->last_seen;
	__u32 idle = s->proto == IPPROTO_TCP ? CT_TCP_IDLE_TIMEOUT_S : CT_UDP_IDLE_TIMEOUT_S;

	if (!hz)
		hz = 1000;
#define S_TO_TICKS(S) ((__u32)(((__u64)(S) * hz) >> DSR_TICK_SHIFT) + 1)
	return ((s->flags & CT_F_CLOSING) && age >= S_TO_TICKS(CT_CLOSE_TIMEOUT_S)) ||
	       (!(s->flags & CT_F_ESTABLISHED) && age >= S_TO_TICKS(CT_SYN_TIMEOUT_S)) ||
	       age >= S_TO_TICKS(idle);
#undef S_TO_TICKS
}

/* An established packet of the flow in slot s: its last_seen and flags, each written only when
 * it changes (an established packet does not dirty the line for nothing). */
static __always_inline void dsr_flow_touch(struct dsr_flow *s, const struct pkt *p)
{
	__u32 now = dsr_ticks();
	__u16 f = s->flags, nf = f | CT_F_ESTABLISHED;

	if (p->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST))
		nf |= CT_F_CLOSING;   /* reusable CT_CLOSE_TIMEOUT_S after its last packet */
	if (s->last_seen != now)
		s->last_seen = now;
	if (nf != f)
		s->flags = nf;
}

#define FIB_OK    0
#define FIB_PUNT  1   /* route found, neighbour unresolved: rewrite and let the stack resolve it */
#define FIB_FAIL -1

/* FIB lookup towards dst before anything is rewritten; fills fib (MACs, egress ifindex). */
static __always_inline int fib_lookup_to(struct xdp_md *ctx, const struct pkt *p, const __u32 *src,
					 const __u32 *dst, __u32 tot_len, struct bpf_fib_lookup *fib)
{
	__builtin_memset(fib, 0, sizeof(*fib));
	fib->ifindex = ctx->ingress_ifindex;
	fib->l4_protocol = p->proto;
	fib->tot_len = tot_len;
	if (p->family == 4) {
		fib->family = 2;  /* AF_INET */
		fib->ipv4_src = src[0];
		fib->ipv4_dst = dst[0];
	} else {
		fib->family = 10; /* AF_INET6 */
		__builtin_memcpy(fib->ipv6_src, src, 16);
		__builtin_memcpy(fib->ipv6_dst, dst, 16);
	}
	switch (bpf_fib_lookup(ctx, fib, sizeof(*fib), 0)) {
	case BPF_FIB_LKUP_RET_SUCCESS: return FIB_OK;
	case BPF_FIB_LKUP_RET_NO_NEIGH: return FIB_PUNT;
	default: return FIB_FAIL;
	}
}

/* After the rewrite: new MACs, then XDP_TX (same link) or redirect (another link); or, when
 * the neighbour was unresolved, pass the rewritten packet to the stack, which resolves it
 * (ARP/ND) and forwards it (a SNATed packet needs accept_local on the uplink, which
 * Datapath.attach_xdp sets). Later packets find the neighbour and take the fast path. */
static __always_inline int forward_to(struct xdp_md *ctx, int fr, __u32 ifindex, const __u8 *smac,
				      const __u8 *dmac)
{
	if (fr == FIB_PUNT) {
		stat_inc(HOOK_XDP, STAT_NEIGH_PUNT);
		return verdict(HOOK_XDP, XDP_PASS);
	}
	void *data = ctx_data(ctx), *data_end = ctx_data_end(ctx);
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return drop(DROP_REWRITE);
	__builtin_memcpy(eth->h_dest, dmac, 6);
	__builtin_memcpy(eth->h_source, smac, 6);
	if (ifindex == ctx->ingress_ifindex)
		return verdict(HOOK_XDP, XDP_TX);
	return verdict(HOOK_XDP, bpf_redirect(ifindex, 0));
}

static __always_inline int fib_forward(struct xdp_md *ctx, const struct bpf_fib_lookup *fib, int fr)
{
	return forward_to(ctx, fr, fib->ifindex, fib->smac, fib->dmac);
}

/* Next hop towards a remote backend, without a FIB lookup per packet.
 *
 * neigh[slot] (per CPU, slot = backend id % NEIGH_SLOTS) caches one bpf_fib_lookup result:
 * egress ifindex and MACs, tagged with the destination, family, ingress ifindex and the
 * generation neigh_cfg[0].gen. It is used only when every tag matches, it is younger than
 * neigh_cfg[0].ttl jiffies (the loader sets 1 s; 0 = no caching) and the packet is no longer
 * than one the lookup accepted (the route's MTU check). Anything else is a miss:
 * bpf_fib_lookup runs, and its success refills the slot; a punt (neighbour unresolved) or a
 * failure empties it, so the cache never keeps what the FIB would refuse. So a route or
 * neighbour change is followed within the TTL (+ one jiffy), or at once when the agent bumps
 * the generation; the source address (source-based policy routing) is not part of the tag.
 * Jiffies, not bpf_ktime_get_coarse_ns(): that helper cost ~35 ns per packet here.
 * Per CPU: no other CPU writes a slot while this one reads it. Returns FIB_OK (*out: the
 * entry to forward with), FIB_PUNT or FIB_FAIL. */
static __always_inline int nh_resolve(struct xdp_md *ctx, const struct pkt *p, __u32 slot,
				      const __u32 *src, const __u32 *dst, __u32 tot_len,
				      struct bpf_fib_lookup *fib, struct neigh_entry **out)
{
	__u32 zero = 0;
	struct neigh_cfg *cfg = neigh_cfg_v1.lookup(&zero);
	if (!cfg)
		return FIB_FAIL;   /* an array's slot 0: never */
	__u32 gen = cfg->gen, ttl = cfg->ttl;

	slot &= NEIGH_SLOTS - 1;
	struct neigh_entry *ne = neigh_v1.lookup(&slot);
	if (!ne)
		return FIB_FAIL;
	__u64 now = bpf_jiffies64();
	int fresh = ne->stamp && now - ne->stamp < ttl && ne->gen == gen &&
		    ne->ingress == ctx->ingress_ifindex && ne->family == p->family && addr_eq(ne->addr, dst);
	if (fresh && tot_len <= ne->len_ok) {
		*out = ne;
		return FIB_OK;
	}
	__u32 len_ok = fresh && ne->len_ok > tot_len ? ne->len_ok : tot_len;
	int fr = fib_lookup_to(ctx, p, src, dst, tot_len, fib);
	if (fr != FIB_OK) {
		ne->stamp = 0;
		return fr;
	}
	addr_copy(ne->addr, dst);
	ne->family = p->family;
	ne->ingress = ctx->ingress_ifindex;
	ne->gen = gen;
	ne->ifindex = fib->ifindex;
	ne->len_ok = len_ok;
	__builtin_memcpy(ne->smac, fib->smac, 6);
	__builtin_memcpy(ne->dmac, fib->dmac, 6);
	ne->stamp = now ? now : 1;
	*out = ne;
	return FIB_OK;
}

static __always_inline int nh_forward(struct xdp_md *ctx, const struct neigh_entry *ne, int fr)
{
	if (fr != FIB_OK || !ne)
		return forward_to(ctx, FIB_PUNT, 0, NULL, NULL);
	return forward_to(ctx, FIB_OK, ne->ifindex, ne->smac, ne->dmac);
}

/* Can the DSR option be added? It goes right after the fixed IP header, before any IPv4
 * options / IPv6 extension headers the packet carries (so the backend finds it at a fixed
 * offset, and an IPv4 End-of-Options padding cannot hide it); IPv4 needs room in IHL (15
 * words), and an IPv6 Hop-by-Hop header must stay first (RFC 8200 4.1), so packets with one
 * are refused. At most two VLAN tags (the parser's limit). */
static __always_inline int dsr_fits(struct xdp_md *ctx, const struct pkt *p)
{
	if (p->l3_off > 22)
		return 0;
	if (p->family == 4)
		return p->l4_off - p->l3_off <= 60 - DSR_IPV4_OPT_LEN;
	/* read from the packet, not kept by the parser: a parser flag splits verifier states */
	struct ipv6hdr *ip6 = ctx_data(ctx) + p->l3_off;
	if ((void *)(ip6 + 1) > ctx_data_end(ctx))
		return 0;
	return ip6->nexthdr != NEXTHDR_HOP;
}

/* Insert the DSR option at the end of the fixed IP header: grow the frame at the front, move
 * the L2 + fixed IP header to the new front, write the option, and fix the IP header.
 * Returns 0, -1 (rewrite failed), -2 (no headroom). */
static __always_inline int dsr_insert(struct xdp_md *ctx, const struct pkt *p, const __u32 *vip,
				      __be16 vport)
{
	int v4 = p->family == 4;
	__u32 grow = v4 ? DSR_IPV4_OPT_LEN : 24;
	__u32 l3 = p->l3_off;
	void *data, *data_end;

	if (l3 != 14 && l3 != 18 && l3 != 22)   /* no, one or two VLAN tags */
		return -1;
	if (bpf_xdp_adjust_head(ctx, -(int)grow))
		return -2;
	data = ctx_data(ctx);
	data_end = ctx_data_end(ctx);
	/* constant-size moves through the stack (a variable-length loop costs the verifier
	 * far more states than these six straight-line cases) */
#define DSR_MOVE(GROW, N) do {							\
		__u8 buf[N];							\
		if (data + (GROW) + (N) > data_end)				\
			return -1;						\
		__builtin_memcpy(buf, data + (GROW), N);			\
		__builtin_memcpy(data, buf, N);					\
	} while (0)
	if (v4) {
		if (l3 == 14) DSR_MOVE(DSR_IPV4_OPT_LEN, 34);
		else if (l3 == 18) DSR_MOVE(DSR_IPV4_OPT_LEN, 38);
		else DSR_MOVE(DSR_IPV4_OPT_LEN, 42);
	} else {
		if (l3 == 14) DSR_MOVE(24, 54);
		else if (l3 == 18) DSR_MOVE(24, 58);
		else DSR_MOVE(24, 62);
	}
#undef DSR_MOVE

	if (v4) {
		struct iphdr *iph = data + l3;
		__u8 *opt = data + l3 + 20;
		if ((void *)(iph + 1) > data_end || (void *)(opt + DSR_IPV4_OPT_LEN) > data_end)
			return -1;
		opt[0] = DSR_IPV4_OPT_TYPE;
		opt[1] = DSR_IPV4_OPT_LEN;
		__builtin_memcpy(opt + 2, &vport, 2);
		__builtin_memcpy(opt + 4, &vip[0], 4);
		__u32 n32 = iph->ihl + DSR_IPV4_OPT_LEN / 4;
		if (n32 > 15)
			return -1;
		/* RFC 1624 over what changed: the ihl/tot_len word, plus the option's two words */
		__u32 w_old = *(__u32 *)iph, o32[2];
		__u64 sum = (__u16)~iph->check;
		iph->ihl = n32;
		iph->tot_len = bpf_htons(bpf_ntohs(iph->tot_len) + DSR_IPV4_OPT_LEN);
		__builtin_memcpy(o32, opt, 8);
		sum += (__u32)~w_old;
		sum += *(__u32 *)iph;
		sum += o32[0];
		sum += o32[1];
		iph->check = ~csum_fold64(sum);
	} else {
		struct ipv6hdr *ip6 = data + l3;
		__u8 *opt = data + l3 + 40;
		if ((void *)(ip6 + 1) > data_end || (void *)(opt + 24) > data_end)
			return -1;
		opt[0] = ip6->nexthdr;   /* whatever followed the fixed header follows the option */
		opt[1] = DSR_IPV6_EXT_LEN;
		opt[2] = DSR_IPV6_OPT_TYPE;
		opt[3] = DSR_IPV6_OPT_LEN;
		__builtin_memcpy(opt + 4, vip, 16);
		__builtin_memcpy(opt + 20, &vport, 2);
		opt[22] = 0;             /* two Pad1 options */
		opt[23] = 0;
		ip6->nexthdr = NEXTHDR_DEST;
		ip6->payload_len = bpf_htons(bpf_ntohs(ip6->payload_len) + 24);
	}
	return 0;
}

static __always_inline void fill_reply_val(struct ct_val *rv, const struct pkt *p, __u32 bid,
					   __u32 svc_id, __u16 flags)
{
	__builtin_memset(rv, 0, sizeof(*rv));
	addr_copy(rv->raddr, p->daddr);   /* replies leave from VIP:port */
	rv->rport = p->dport;
	addr_copy(rv->rdaddr, p->saddr);  /* SNAT replies go back to the client */
	rv->rdport = p->sport;
	rv->backend_id = bid;
	rv->svc_id = svc_id;
	rv->flags = flags;
}

static __always_inline void fill_fwd_val(struct ct_val *v, __u32 bid, __u32 svc_id, __u32 gen,
					 __u16 flags, __be16 nat_port)
{
	__builtin_memset(v, 0, sizeof(*v));
	v->backend_id = bid;
	v->svc_id = svc_id;
	v->svc_gen = gen;
	v->flags = flags;
	v->nat_port = nat_port;
}

/* ---- SNAT node ports -------------------------------------------------------------------
 * A SNAT flow's node port is claimed in snat_ports, an array, at the index hashed from what
 * the flow's replies carry (backend:bport -> node:nat_port, proto): a reply finds its slot in
 * one array lookup and checks the tag, and the SYN path claims a port with an atomic
 * compare-and-swap on the slot's sequence word plus plain stores, instead of inserting a
 * REPLY entry into the conntrack LRU (~150 ns here). A key maps to exactly one slot, so no two
 * live flows share (backend, bport, node port); a key whose slot is taken by another key's
 * live flow is a busy port (the next candidate is tried). Slots are never evicted: a port is
 * reused when its flow closed (FIN/RST + CT_CLOSE_TIMEOUT_S), never answered or went idle
 * (snat_slot_stale), and the agent frees the slots of backends it removes. */
static __always_inline __u32 snat_slot_index(const __u32 *baddr, __u8 family, __be16 bport, __be16 nat_port,
					     __u8 proto)
{
	return flow_hash_tuple(baddr, family, nat_port, bport, proto) & (SNAT_SLOTS - 1);
}

static __always_inline int snat_slot_is(const struct snat_slot *s, const __u32 *baddr, __u8 family,
					__be16 bport, __be16 nat_port, __u8 proto)
{
	return s->backend_id && s->nat_port == nat_port && s->bport == bport && s->proto == proto &&
	       s->family == family && addr_eq(s->baddr, baddr);
}

/* The slot of the SNAT mapping {backend:bport -> node:nat_port}, or NULL */
static __always_inline struct snat_slot *snat_slot_find(const __u32 *baddr, __u8 family, __be16 bport,
							__be16 nat_port, __u8 proto)
{
	__u32 idx = snat_slot_index(baddr, family, bport, nat_port, proto);
	struct snat_slot *s = snat_ports_v2.lookup(&idx);

	if (!s || !snat_slot_is(s, baddr, family, bport, nat_port, proto))
		return NULL;
	return s;
}

/* Is this slot the mapping of the client flow p (client:cport -> VIP:vport)? A flow checks
 * before it trusts or marks "its" port: the port may have been given to another flow since. */
static __always_inline int snat_slot_of(const struct snat_slot *s, const struct pkt *p)
{
	return s->cport == p->sport && s->vport == p->dport && addr_eq(s->caddr, p->saddr) &&
	       addr_eq(s->vaddr, p->daddr);
}

/* Is the slot of {baddr:bport -> node:nat_port} claimed by the client flow p? */
static __always_inline int snat_slot_is_flows(const __u32 *baddr, const struct pkt *p, __be16 bport,
					      __be16 nat_port)
{
	struct snat_slot *s = snat_slot_find(baddr, p->family, bport, nat_port, p->proto);

	return s && snat_slot_of(s, p);
}

/* ---- SNAT flow index (read-only: flows of vipd before SNAT lines) -----------------------
 * vipd before SNAT lines kept a SNAT flow's forward state in its port slot only, found through
 * snat_flows, an array of u32 at snat_search_start(client flow) & (SNAT_SLOTS - 1) holding the
 * slot's index + 1. New flows get a line in the flow table instead ("Flow table: SNAT lines");
 * the index is still read after a line miss, so flows established under the old program keep
 * their backend and node port across the upgrade, and nothing writes it any more. An entry is
 * trusted only if the slot it names is claimed and names this client flow, so an entry left by
 * a flow whose port was freed or taken over is a miss. snat_search_start is also where a new
 * flow's node-port search starts. */
static __always_inline __u32 snat_search_start(__u32 fh, const __u32 *vaddr)
{
	return fh ^ vaddr[0] ^ vaddr[3];   /* fh: flow_hash(client flow, cport) */
}

static __always_inline int snat_slot_of_tuple(const struct snat_slot *s, const __u32 *caddr, const __u32 *vaddr,
					      __be16 cport, __be16 vport, __u8 proto, __u8 family)
{
	return s->backend_id && s->cport == cport && s->vport == vport && s->proto == proto &&
	       s->family == family && addr_eq(s->caddr, caddr) && addr_eq(s->vaddr, vaddr);
}

/* The claimed port slot of the client flow caddr:cport -> vaddr:vport (start: its
 * snat_search_start), or NULL. A slot being written (odd or changed seq) is not trusted. */
static __always_inline struct snat_slot *snat_flow_find(__u32 start, const __u32 *caddr, const __u32 *vaddr,
							__be16 cport, __be16 vport, __u8 proto, __u8 family)
{
	__u32 fi = start & (SNAT_SLOTS - 1);
	__u32 *fe = snat_flows_v1.lookup(&fi);
	if (!fe || !*fe)
		return NULL;
	__u32 idx = *fe - 1;
	struct snat_slot *s = snat_ports_v2.lookup(&idx);
	if (!s)
		return NULL;
	__u64 seq = *(volatile __u64 *)&s->seq;
	if ((seq & 1) || !snat_slot_of_tuple(s, caddr, vaddr, cport, vport, proto, family) ||
	    *(volatile __u64 *)&s->seq != seq)
		return NULL;
	return s;
}

/* May this claimed port be given to another flow? Its flow closed (FIN/RST) CT_CLOSE_TIMEOUT_S
 * ago, never had a reply for CT_SYN_TIMEOUT_S (a SYN that moved to another backend, a scan, a
 * dead backend), or had no reply for the protocol's idle timeout. */
static __always_inline int snat_slot_stale(const struct snat_slot *s, __u32 now)
{
	__u32 age = now - s->last_seen;

	return ((s->flags & CT_F_CLOSING) && age >= CT_CLOSE_TIMEOUT_S) ||
	       (!(s->flags & CT_F_REPLIED) && age >= CT_SYN_TIMEOUT_S) ||
	       age >= (s->proto == IPPROTO_TCP ? CT_TCP_IDLE_TIMEOUT_S : CT_UDP_IDLE_TIMEOUT_S);
}

/* The i-th node-port candidate of a search that starts at start: a 32-bit mix of start + i·φ,
 * scaled to the range (multiply-shift, no division). Each candidate depends on the whole 32-bit
 * start, so two flows that meet on one port part again at the next candidate. (The earlier
 * (start + i·7919) mod range made every flow walk the same cyclic order of ports — linear probing
 * in disguise: busy ports clustered along it and 8 consecutive candidates were all busy far
 * more often than the occupancy predicts; at 75 % of a backend's ports busy, 8.8 % of SYNs
 * were refused instead of 1 %.) agent/datapath/snatports.py snat_port_candidate mirrors it. */
static __always_inline __be16 snat_port_candidate(__u32 start, __u32 i)
{
	__u32 x = start + i * 0x9e3779b9;

	x ^= x >> 16;   /* lowbias32 (C. Wellons' hash prospector) */
	x *= 0x7feb352d;
	x ^= x >> 15;
	x *= 0x846ca68b;
	x ^= x >> 16;
	return bpf_htons(SNAT_PORT_MIN + (__u32)(((__u64)x * (SNAT_PORT_MAX - SNAT_PORT_MIN + 1)) >> 32));
}

/* ---- Flow table: SNAT lines ------------------------------------------------------------
 * A SNAT flow keeps its forward state in the flow table too (one 64-B line, as a DSR flow), so
 * its established packets read one cache line, not the flow index and then the 88-B port slot
 * (docs/datapath.md "The 100k-flow ACK"). A SNAT line (CT_F_SNAT) holds the client tuple,
 * backend, service generation and node port; the port slot stays the truth for replies and for
 * the port's life: a SNAT line has no clock of its own and is stale when its slot (found from
 * the backend's address and port + nat_port) no longer names the flow or is snat_slot_stale —
 * checked only on the claim path. A claim that takes over a stale port invalidates the old
 * flow's line if it still holds that port (snat_line_kill: proto 0, a tombstone that matches
 * no flow and is reused by the next claim); the old flow's next packet then gets a new port,
 * never the taken one. Flows of vipd before SNAT lines keep their
 * snat_flows index entry: looked up (read-only) after a line miss. */
static __always_inline int snat_line_stale(const struct dsr_flow *l, __u32 now)
{
	__u32 bid = l->backend_id;
	struct backend *be = backends_v2.lookup(&bid);
	if (!be)
		return 1;
	struct snat_slot *s = snat_slot_find(be->addr, l->family, be->port, l->nat_port, l->proto);
	return !s || !snat_slot_of_tuple(s, l->saddr, l->daddr, l->sport, l->dport, l->proto, l->family) ||
	       snat_slot_stale(s, now);
}

/* The port slot {backend:bport -> node:port} was taken over from the flow fk (backend
 * old_bid): that flow's line, if it still holds this port, becomes a tombstone. Found as the
 * flow's own packets find it (the takeover of a stale port is rare: no link kept per SYN). */
static __always_inline void snat_line_kill(const struct ct_key *fk, __be16 port, __u32 old_bid)
{
	__u64 st = 0;
	__u32 fh = flow_hash_tuple(fk->saddr, fk->family, fk->sport, fk->dport, fk->proto);
	struct dsr_flow *l = dsr_flow_find(fk->saddr, fk->daddr, fk->sport, fk->dport, fk->proto, fk->family,
					   dsr_flow_start(fh, fk->daddr), &st);
	if (!l || LINE_BID(st) != old_bid || !(LINE_FLAGS(st) & CT_F_SNAT) || LINE_NAT_PORT(st) != port)
		return;
	__u64 seq = *(volatile __u64 *)&l->seq;
	if ((seq & 1) || __sync_val_compare_and_swap(&l->seq, seq, seq + 1) != seq)
		return;   /* being rewritten: no longer that flow's */
	if (l->nat_port == port && l->backend_id == old_bid)
		l->proto = 0;
	asm volatile("" ::: "memory");
	*(volatile __u64 *)&l->seq = seq + 2;
}

/* Place the new flow p (backend bid; a SNAT flow: nat_port != 0) in its own line, else the
 * first free, tombstoned or stale one among the probes (a DSR line by its clock; of the SNAT
 * lines, the first other flow's is checked through its port slot). 0: every probe holds
 * another live flow (or a claim race was lost): the caller gives the flow a conntrack entry. */
static __always_inline int dsr_flow_claim(const struct pkt *p, __u32 start, __u32 bid, __u32 svc_id, __u32 gen,
					  __be16 nat_port)
{
	__u32 zero = 0;
	struct neigh_cfg *cfg = neigh_cfg_v1.lookup(&zero);
	__u32 hz = cfg ? cfg->hz : 0, now = dsr_ticks();
	struct dsr_flow *t = NULL, *cand = NULL;
	__u64 tseq = 0, cseq = 0;

#pragma unroll
	for (int i = 0; i < DSR_FLOW_PROBES; i++) {
		__u32 idx = (start + i) & (DSR_FLOW_SLOTS - 1);
		struct dsr_flow *s = dsr_flows_v1.lookup(&idx);
		if (!s)
			break;
		__u64 seq = *(volatile __u64 *)&s->seq;
		if (seq & 1)
			continue;   /* another CPU is writing it */
		if (dsr_flow_is(s, p)) {
			t = s;      /* its own (a SYN of a known flow, a re-balance): rewritten in place */
			tseq = seq;
			break;
		}
		if (!s->backend_id) {
			if (!t) {
				t = s;
				tseq = seq;
				}
			break;      /* nothing of p beyond a free slot */
		}
		if (t)
			continue;
		if (!s->proto || (!(s->flags & CT_F_SNAT) && dsr_flow_stale(s, now, hz))) {
			t = s;      /* a tombstone, or a stale DSR line */
			tseq = seq;
		} else if ((s->flags & CT_F_SNAT) && !cand) {
			cand = s;
			cseq = seq;
		}
	}
	if (!t && cand && snat_line_stale(cand, now_s())) {
		t = cand;
		tseq = cseq;
	}
	if (!t)
		return 0;
	if (__sync_val_compare_and_swap(&t->seq, tseq, tseq + 1) != tseq)
		return 0;   /* lost the race for it */
	addr_copy(t->saddr, p->saddr);
	addr_copy(t->daddr, p->daddr);
	t->sport = p->sport;
	t->dport = p->dport;
	t->proto = p->proto;
	t->family = p->family;
	t->backend_id = bid;
	t->svc_id = svc_id;
	t->svc_gen = gen;
	if (nat_port) {
		t->flags = CT_F_SNAT;
		t->nat_port = nat_port;
		t->nat_pad = 0;
	} else {
		t->flags = CT_F_DSR;
		t->last_seen = now;
	}
	/* release: a plain store of seq + 2 (see snat_claim) */
	asm volatile("" ::: "memory");
	*(volatile __u64 *)&t->seq = tseq + 2;
	return 1;
}

/* Claim a node port towards backend baddr:bport for the client flow p: up to SNAT_PORT_TRIES
 * candidates from start (snat_port_for: first a hash of the flow, then a random one). A
 * candidate is taken when its slot is free, already this flow's, or stale (*prev: the stale
 * slot's flow's backend and port; fk: its key). Returns the port (network order) or 0. */
static __always_inline __be16 snat_claim(const struct pkt *p, const __u32 *baddr, __be16 bport, __u32 bid,
					 __u32 svc_id, __u32 gen, __u32 now, __u32 start, __u32 *idx_out,
					 struct ct_key *fk, struct snat_prev *prev)
{
	__be16 got = 0, old_port = 0;
	__u32 old_bid = 0;

#pragma unroll
	for (int i = 0; i < SNAT_PORT_TRIES; i++) {
		__be16 port = snat_port_candidate(start, i);
		__u32 idx = snat_slot_index(baddr, p->family, bport, port, p->proto);
		struct snat_slot *s = snat_ports_v2.lookup(&idx);
		if (!s)
			continue;
		__u64 seq = *(volatile __u64 *)&s->seq;
		if (seq & 1)
			continue;   /* another CPU is writing it */
		if (s->backend_id) {
			if (snat_slot_is(s, baddr, p->family, bport, port, p->proto) && snat_slot_of(s, p)) {
				s->flags &= ~CT_F_CLOSING;   /* ours already: live again */
				s->last_seen = now;
				s->svc_id = svc_id;
				s->svc_gen = gen;
				*idx_out = idx;
				return port;
			}
			if (!snat_slot_stale(s, now))
				continue;   /* a live flow's port (or another key's slot): busy */
			old_port = s->nat_port;
			old_bid = s->backend_id;
			ct_key_set(fk, s->caddr, s->vaddr, s->cport, s->vport, s->proto, s->family, CT_DIR_SERVICE);
		}
		if (__sync_val_compare_and_swap(&s->seq, seq, seq + 1) != seq) {
			old_bid = 0;
			continue;   /* lost the race for this slot */
		}
		s->backend_id = bid;
		addr_copy(s->baddr, baddr);
		s->bport = bport;
		s->nat_port = port;
		s->proto = p->proto;
		s->family = p->family;
		s->flags = CT_F_SNAT;
		s->last_seen = now;
		s->svc_id = svc_id;
		s->svc_gen = gen;
		s->flow_idx = 0;    /* (vipd before SNAT lines: its snat_flows index) */
		addr_copy(s->caddr, p->saddr);
		addr_copy(s->vaddr, p->daddr);
		s->cport = p->sport;
		s->vport = p->dport;
		/* release: a plain store of seq + 2, not an increment, so a slot the agent zeroed
		 * meanwhile (clear_slots) ends even, never stuck odd (skipped by every claim and
		 * distrusted by every reply for good) */
		asm volatile("" ::: "memory");
		*(volatile __u64 *)&s->seq = seq + 2;
		got = port;
		*idx_out = idx;
		break;
	}
	if (got && old_bid) {
		prev->bid = old_bid;
		prev->port = old_port;
	}
	return got;
}

/* A node port for a new SNAT flow: SNAT_PORT_TRIES candidates from a start hashed from the flow
 * (client, ports, VIP), so a retransmitted SYN or a new connection from a reused client port
 * walks the same candidates and takes back the slot that is already its own (Linux's NAT also
 * starts its port search at a hash of the tuple); if all are busy, as many from a random start,
 * so a retried SYN is not refused by the same busy ports again. fh: the flow hash Maglev just
 * computed (flow_hash(p, p->sport)), or 0 when it did not (affinity, a conntrack hit): the
 * candidate mix spreads it, and the VIP words make two VIPs' searches differ. */
static __always_inline __be16 snat_port_for(const struct pkt *p, const __u32 *baddr, __be16 bport, __u32 bid,
					    __u32 svc_id, __u32 gen, __u32 now, __u32 start, __u32 *idx_out,
					    struct ct_key *fk, struct snat_prev *prev)
{
	prev->bid = 0;
	__be16 port = snat_claim(p, baddr, bport, bid, svc_id, gen, now, start, idx_out, fk, prev);

	if (!port)
		port = snat_claim(p, baddr, bport, bid, svc_id, gen, now, bpf_get_prandom_u32(), idx_out, fk, prev);
	if (port && prev->bid) {
		/* a stale flow's port was taken over: that flow loses its SERVICE entry if the entry
		 * still uses this port (the client port may carry a newer flow, which lives on), and
		 * its line (so its next packet gets a new port, never this one) */
		struct ct_val *fv = ct_v2.lookup(fk);
		if (fv && fv->nat_port == prev->port && fv->backend_id == prev->bid)
			ct_v2.delete(fk);
		snat_line_kill(fk, prev->port, prev->bid);
		stat_inc(HOOK_XDP, STAT_SNAT_REUSE);
	}
	return port;
}

/* SNAT's two rewrites in one pass (XDP): destination -> backend:bport, source -> node:nat_port,
 * with one incremental update per checksum (RFC 1624) instead of one per changed field. */
static __always_inline int snat_rewrite(struct xdp_md *ctx, const struct pkt *p, const __u32 *daddr,
					__be16 dport, const __u32 *saddr, __be16 sport)
{
	__u64 l3, l4;
	__u32 a_off;

	if (p->family == 4) {
		l3 = (__u64)(__u32)~p->saddr[0] + saddr[0] + (__u32)~p->daddr[0] + daddr[0];
		__u32 addrs[2] = { saddr[0], daddr[0] };
		a_off = p->l3_off + 12;
		if (ctx_store(ctx, a_off, addrs, 8))
			return -1;
		void *data = ctx_data(ctx), *end = ctx_data_end(ctx);
		__sum16 *check = data + p->l3_off + 10;
		if (p->l3_off > 22 || (void *)(check + 1) > end)
			return -1;
		csum_apply(check, l3, 0);
	} else {
		l3 = (__u64)csum_diff_addr6(p->saddr, saddr) + csum_diff_addr6(p->daddr, daddr);
		__u32 addrs[8] = { saddr[0], saddr[1], saddr[2], saddr[3], daddr[0], daddr[1], daddr[2], daddr[3] };
		a_off = p->l3_off + 8;
		if (ctx_store(ctx, a_off, addrs, 32))
			return -1;
	}
	__be16 ports[2] = { sport, dport };
	if (ctx_store(ctx, p->l4_off, ports, 4))
		return -1;
	if (!p->l4_csum_off)
		return 0;
	l4 = l3 + (__u16)~p->sport + (__u16)sport + (__u16)~p->dport + (__u16)dport;
	__u32 off = p->l4_off + p->l4_csum_off;
	void *data = ctx_data(ctx), *end = ctx_data_end(ctx);
	if (off > 0xffff)
		return -1;
	__sum16 *sum = data + off;
	if ((void *)(sum + 1) > end)
		return -1;
	int udp = p->proto == IPPROTO_UDP;
	if (udp && *sum == 0)
		return 0;   /* UDP without checksum stays without (as nat_rewrite) */
	csum_apply(sum, l4, udp);
	return 0;
}

static __always_inline int lb_handle(struct xdp_md *ctx, struct pkt *p, struct svc_val *svc,
				     struct scratch *scr)
{
	struct ct_key ck = {}, rk = {};
	struct ct_val *cv = NULL;
	struct backend *be = NULL;
	__u32 svc_id = svc->id, flags = svc->flags, bid = 0;
	__be16 nat_port = 0;
	int new_flow = 0;
	__u32 fh = 0;   /* the flow hash, when Maglev computed it (snat_port_for) */

	/* large temporaries live in the per-CPU scratch slot (scr): the BPF stack is 512 bytes */
	struct ct_val *vp = &scr->v;
	struct bpf_fib_lookup *fib = &scr->fib;

	struct svc_counter *sc = svc_stats_v1.lookup(&svc_id);
	if (sc) {
		sc->packets += 1;
		sc->bytes += p->l3_end - p->l3_off;   /* the IP packet: no helper call for frags */
	}
	if (flags & SVC_F_SOURCE_RANGES) {
		struct src_range_key rk = {};
		rk.prefixlen = 32 + (p->family == 4 ? 32 : 128);
		rk.svc_id = svc_id;
		addr_copy(rk.addr, p->saddr);
		if (!src_ranges_v1.lookup(&rk))
			return drop(DROP_SOURCE_RANGE);
	}

	ct_key_set(&ck, p->saddr, p->daddr, p->sport, p->dport, p->proto, p->family, CT_DIR_SERVICE);
	/* A TCP SYN (without ACK) is a new flow: no conntrack probe that would miss anyway
	 * (Katran's rule; measured -20..30 ns per SYN). Its entry is written below, replacing one
	 * a reused or retransmitted SYN's 4-tuple may have left; Maglev gives it the same backend
	 * unless the table changed in between. A SNAT SYN keeps its node port all the same: the
	 * port candidates are a function of the flow, and the first slot that is already this
	 * flow's is taken back (snat_claim). */
	int syn_new = p->proto == IPPROTO_TCP && (p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
	struct dsr_flow *df = NULL;
	__u16 snat_line = flags & SVC_F_DSR ? 0 : CT_F_SNAT;   /* the kind of line this service's flows have */
	if (!(flags & SVC_F_STATELESS) && !syn_new) {
		/* a DSR or SNAT flow: its line in the flow table (one cache line), else below */
		__u64 st = 0;
		fh = flow_hash(p, p->sport);
		df = dsr_flow_find(p->saddr, p->daddr, p->sport, p->dport, p->proto, p->family,
				   dsr_flow_start(fh, p->daddr), &st);
		if (df && (LINE_FLAGS(st) & CT_F_SNAT) != snat_line)
			df = NULL;   /* the service changed mode since: re-balanced into its own kind */
		if (df) {
			/* IP reuse of a backend id matters only when a backend left the service since:
			 * then a SNAT line checks that its port slot (tagged with the backend's address)
			 * still names the flow */
			int regen = snat_line && (df->svc_gen != svc->backend_gen || df->svc_id != svc_id);
			bid = LINE_BID(st);
			be = flow_backend(p, svc, svc_id, bid, &df->svc_id, &df->svc_gen, 0, NULL);
			nat_port = LINE_NAT_PORT(st);
			if (be && regen && !snat_slot_is_flows(be->addr, p, be->port, nat_port))
				be = NULL;
			flow_hit(be, &nat_port);
			if (be && !snat_line)
				dsr_flow_touch(df, p);
		}
	}
	struct snat_slot *fs = NULL;
	if (snat_line && !(flags & SVC_F_STATELESS) && !syn_new && !df) {
		/* a SNAT flow of vipd before SNAT lines: its port slot through the flow index
		 * (read-only: new flows get lines) */
		fs = snat_flow_find(snat_search_start(fh, p->daddr), p->saddr, p->daddr, p->sport, p->dport,
				    p->proto, p->family);
		if (fs) {
			bid = fs->backend_id;
			nat_port = fs->nat_port;
			be = flow_backend(p, svc, svc_id, bid, &fs->svc_id, &fs->svc_gen, fs->bport, fs->baddr);
			flow_hit(be, &nat_port);
		}
	}
	if (!(flags & SVC_F_STATELESS) && !syn_new && !fs && !df) {
		cv = ct_v2.lookup(&ck);
		if (cv) {
			bid = cv->backend_id;
			nat_port = cv->nat_port;
			be = flow_backend(p, svc, svc_id, bid, &cv->svc_id, &cv->svc_gen, cv->rport, cv->raddr);
			/* a SNAT flow with a SERVICE entry (every probe of its line was taken): is the
			 * port still its own? (the slot can have been freed or taken over, and a later
			 * connection of this client flow may have left this entry behind) */
			if (be && nat_port && !snat_slot_is_flows(cv->raddr, p, cv->rport, nat_port))
				nat_port = 0;   /* a new port, same backend */
			flow_hit(be, &nat_port);
		}
	}
	if (!be) {
		__u32 m = svc->table_size;
		if (m == 0)
			return drop(flags & SVC_F_LOCAL_ONLY ? DROP_NO_LOCAL_BACKEND : DROP_NO_BACKEND);
		bid = 0;
		if (flags & SVC_F_AFFINITY) {
			struct affinity_key ak = {};
			addr_copy(ak.addr, p->saddr);
			ak.svc_id = svc_id;
			struct affinity_val *av = affinity_v1.lookup(&ak);
			if (av && bpf_ktime_get_coarse_ns() - av->last_used_ns <= (__u64)svc->affinity_timeout * 1000000000ULL) {
				__u32 abid = av->backend_id;
				struct backend *ab = backends_v2.lookup(&abid);
				if (ab && (ab->flags & BE_F_ACTIVE) && !(ab->flags & BE_F_TERMINATING) &&
				    member_of(svc, svc_id, abid, &ak.svc_id, &av->svc_gen, 0)) {
					bid = abid;
					stat_inc(HOOK_XDP, STAT_AFFINITY);
				}
			}
		}
		if (!bid) {
			/* with affinity the source port is not hashed: one client, one backend */
			__u32 h = (flags & SVC_F_AFFINITY) ? flow_hash(p, 0) : (fh ? fh : flow_hash(p, p->sport));
			__u32 slot = svc->table_off + h % m;
			if (!(flags & SVC_F_AFFINITY))
				fh = h;   /* SNAT's port search and flow index start from it too */
			__u32 *sb = maglev_v1.lookup(&slot);
			if (sb)
				bid = *sb;
		}
		if (!bid)
			return drop(DROP_NO_BACKEND);
		be = backends_v2.lookup(&bid);
		if (!be || !(be->flags & BE_F_ACTIVE))
			return drop(DROP_STALE_BACKEND);
		if (flags & SVC_F_AFFINITY) {
			struct affinity_key ak = {};
			struct affinity_val av = {};
			addr_copy(ak.addr, p->saddr);
			ak.svc_id = svc_id;
			av.backend_id = bid;
			av.svc_gen = svc->backend_gen;
			av.last_used_ns = bpf_ktime_get_coarse_ns();
			affinity_v1.update(&ak, &av);
		}
		new_flow = 1;
		stat_inc(HOOK_XDP, STAT_CT_NEW);
	}

	__u32 baddr[4];
	__be16 bport = be->port;
	addr_copy(baddr, be->addr);

	if (be->flags & BE_F_LOCAL) {
		/* local backend: DNAT and let the stack deliver it; tc egress reverses the reply */
		ct_key_set(&rk, baddr, p->saddr, bport, p->sport, p->proto, p->family, CT_DIR_REPLY);
		if (DERIVE_LOCAL_REPLIES && new_flow && !(flags & SVC_F_STATELESS) &&
		    be->revnat_svc == svc_id) {
			/* tc derives this flow's reply rewrite from revnat[backend] (this service's
			 * frontend) and the SERVICE entry: no REPLY entry (one conntrack insert fewer).
			 * A REPLY entry left by an earlier flow of the same client port through another
			 * frontend would win in tc, so it goes. */
			if (ct_v2.lookup(&rk))
				ct_v2.delete(&rk);
		} else if (new_flow && (!(flags & SVC_F_STATELESS) || !ct_v2.lookup(&rk))) {
			fill_reply_val(vp, p, bid, svc_id, CT_F_LOCAL);
			ct_v2.update(&rk, vp);
		}
		if (new_flow && !(flags & SVC_F_STATELESS)) {
			fill_fwd_val(vp, bid, svc_id, svc->backend_gen, CT_F_LOCAL, 0);
			ct_v2.update(&ck, vp);
		}
		if (nat_rewrite(ctx, p, NAT_DST, baddr, bport))
			return drop(DROP_REWRITE);
		return verdict(HOOK_XDP, XDP_PASS);
	}

	if (flags & SVC_F_DSR) {
		int add_opt = new_flow || p->proto == IPPROTO_UDP || (p->tcp_flags & TCP_FLAG_SYN);
		__u32 grow = add_opt ? (p->family == 4 ? DSR_IPV4_OPT_LEN : 24) : 0;
		if (add_opt && !dsr_fits(ctx, p))
			return drop(DROP_DSR_UNSUPPORTED);
		struct neigh_entry *ne = NULL;
		int fr = nh_resolve(ctx, p, bid, p->saddr, baddr, p->l3_end - p->l3_off + grow, fib, &ne);
		if (fr == FIB_FAIL)
			return drop(DROP_FIB_LOOKUP);
		if (new_flow && !(flags & SVC_F_STATELESS)) {
			if (!fh)
				fh = flow_hash(p, p->sport);   /* affinity chose the backend */
			if (!dsr_flow_claim(p, dsr_flow_start(fh, p->daddr), bid, svc_id, svc->backend_gen, 0)) {
				/* every probe holds a live flow: conntrack keeps this one's backend */
				fill_fwd_val(vp, bid, svc_id, svc->backend_gen, CT_F_DSR, 0);
				ct_v2.update(&ck, vp);
			}
		}
		__u32 vip[4];
		__be16 vport = p->dport;
		addr_copy(vip, p->daddr);
		if (nat_rewrite(ctx, p, NAT_DST, baddr, bport))
			return drop(DROP_REWRITE);
		if (add_opt) {
			int rc = dsr_insert(ctx, p, vip, vport);
			if (rc == -2)
				return drop(DROP_HEADROOM);
			if (rc)
				return drop(DROP_REWRITE);
			stat_inc(HOOK_XDP, STAT_DSR_OPT);
		}
		return nh_forward(ctx, ne, fr);
	}

	/* SNAT: DNAT to the backend and SNAT to node_addr:nat_port, so replies come back here */
	__u32 nidx = p->family == 4 ? 0 : 1;
	struct node_addr *na = node_cfg_v1.lookup(&nidx);
	if (!na || !na->valid)
		return drop(DROP_NO_NODE_ADDR);
	const __u32 *naddr = na->addr;   /* not copied: the 512-B stack is full on this path */
	struct neigh_entry *ne = NULL;
	int fr = nh_resolve(ctx, p, bid, naddr, baddr, p->l3_end - p->l3_off, fib, &ne);
	if (fr == FIB_FAIL)
		return drop(DROP_FIB_LOOKUP);
	if (nat_port && (p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_FIN | TCP_FLAG_RST))) {
		/* only SYN/FIN/RST look at the port's slot again (established packets pay nothing) */
		struct snat_slot *s = snat_slot_find(baddr, p->family, bport, nat_port, p->proto);
		if (!s || !snat_slot_of(s, p)) {
			nat_port = 0;   /* the port was freed or given to another flow: a new port */
		} else if (p->tcp_flags & TCP_FLAG_SYN) {
			/* a new connection from a reused client port (or a retransmitted SYN): live, so
			 * the closed predecessor's CLOSING mark must not let the port be taken over */
			if (s->flags & CT_F_CLOSING) {
				s->flags &= ~CT_F_CLOSING;
				s->last_seen = now_s();
			}
		} else {
			s->flags |= CT_F_CLOSING;
			s->last_seen = now_s();
		}
	}
	if (!nat_port) {
		__u32 now = now_s(), idx = 0;
		if (!fh)
			fh = flow_hash(p, p->sport);
		__u32 start = snat_search_start(fh, p->daddr);
		/* rk (the local path's REPLY key) is free here: the key of a taken-over flow */
		nat_port = snat_port_for(p, baddr, bport, bid, svc_id, svc->backend_gen, now, start, &idx, &rk,
					 &scr->prev);
		if (!nat_port)
			return drop(DROP_SNAT_NO_PORT);
		if (!dsr_flow_claim(p, dsr_flow_start(fh, p->daddr), bid, svc_id, svc->backend_gen, nat_port)) {
			/* every probe holds another live flow: a SERVICE entry, as before the table */
			fill_fwd_val(vp, bid, svc_id, svc->backend_gen, CT_F_SNAT, nat_port);
			addr_copy(vp->raddr, baddr);   /* the address the port was allocated towards */
			vp->rport = bport;
			ct_v2.update(&ck, vp);
		}
	}
	if (snat_rewrite(ctx, p, baddr, bport, naddr, nat_port))
		return drop(DROP_REWRITE);
	return nh_forward(ctx, ne, fr);
}

/* Not a service: maybe a reply to a SNATed flow (to node_addr:port in the SNAT range). */
static __always_inline int snat_reply(struct xdp_md *ctx, struct pkt *p)
{
	__u16 dport = bpf_ntohs(p->dport);

	if (dport < SNAT_PORT_MIN || dport > SNAT_PORT_MAX)
		return -1;
	__u32 zero = 0;
	struct scratch *scr = scratch_v1.lookup(&zero);
	if (!scr)
		return -1;
	struct bpf_fib_lookup *fib = &scr->fib;
	__u32 nidx = p->family == 4 ? 0 : 1;
	struct node_addr *na = node_cfg_v1.lookup(&nidx);
	if (!na || !na->valid || !addr_eq(na->addr, p->daddr))
		return -1;
	struct snat_slot *s = snat_slot_find(p->saddr, p->family, p->sport, p->dport, p->proto);
	if (!s)
		return -1;
	__u64 seq = *(volatile __u64 *)&s->seq;
	__u32 vip[4], client[4];
	__be16 vport = s->vport, cport = s->cport;
	addr_copy(vip, s->vaddr);
	addr_copy(client, s->caddr);
	/* a slot being taken over (a stale flow's) is not trusted half-written */
	if ((seq & 1) || *(volatile __u64 *)&s->seq != seq)
		return -1;
	__u32 now = now_s();
	if (p->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST))
		s->flags |= CT_F_CLOSING;
	if (s->last_seen != now)
		s->last_seen = now;   /* keeps the port from being taken over as idle */
	if (!(s->flags & CT_F_REPLIED))
		s->flags |= CT_F_REPLIED;
	/* the next hop towards the client from the per-CPU cache (slot by client address; the
	 * entry is tagged with it, so a collision is only a miss) */
	__u32 slot = client[0] ^ client[3] ^ (client[0] >> 13) ^ NEIGH_CLIENT_SALT;
	struct neigh_entry *ne = NULL;
	int fr = nh_resolve(ctx, p, slot, vip, client, p->l3_end - p->l3_off, fib, &ne);
	if (fr == FIB_FAIL)
		return drop(DROP_FIB_LOOKUP);
	if (snat_rewrite(ctx, p, client, cport, vip, vport))
		return drop(DROP_REWRITE);
	stat_inc(HOOK_XDP, STAT_SNAT_REPLY);
	return nh_forward(ctx, ne, fr);
}
