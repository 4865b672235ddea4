/* icmp.h: ICMP/ICMPv6 errors about a service flow are delivered to that flow's backend.
 *
 * A router on the client's path answers a reply we (or a DSR backend) sent as VIP:port with an
 * error (fragmentation needed / packet too big, unreachable, time exceeded) addressed to the
 * VIP. The quoted packet is VIP:port -> client:port; its reverse is the flow's conntrack key
 * (or, without an entry, its Maglev slot: the hash excludes the destination). The error is
 * rewritten to what the backend's socket sent, like the flow itself:
 *   local backend: outer destination and quoted source -> backend:port; passed to the stack;
 *   DSR backend:   the same, then forwarded to the backend (FIB);
 *   SNAT backend:  the same plus quoted destination client:port -> node:nat_port, forwarded.
 * A router between this node and a SNAT backend answers our translated request (quoted
 * node:nat_port -> backend:port, addressed to the node): its port slot turns the error into
 * one about client:port -> VIP:port, sent to the client.
 * IPv4 header, quoted IP header and ICMP checksums are updated incrementally (ICMPv6: the
 * pseudo header too); the quoted L4 checksum is left alone (receivers do not check it).
 * Errors about other flows, and everything that fails a check, pass untouched.
 */
#pragma once

struct icmp_quote {          /* the quoted packet of an ICMP error */
	__u32 saddr[4];
	__u32 daddr[4];
	__be16 sport, dport;
	__u8 proto, family;
	__u16 il3, il4;      /* offsets of the quoted IP and L4 headers */
};

/* The error's quoted packet (IPv4 types 3, 11, 12; ICMPv6 types 1-4; TCP or UDP inside).
 * Returns 0 when q is filled. */
static __always_inline int icmp_parse_quote(struct xdp_md *ctx, const struct pkt *p, struct icmp_quote *q)
{
	void *data = ctx_data(ctx), *data_end = ctx_data_end(ctx);
	__u32 il3 = p->l4_off + 8, il4;

	if (p->family == 4 ? !(p->icmp_type == 3 || p->icmp_type == 11 || p->icmp_type == 12)
			   : !(p->icmp_type >= 1 && p->icmp_type <= 4))
		return -1;
	if (il3 > 0x3ff)
		return -1;
	if (p->family == 4) {
		struct iphdr *iph = data + il3;
		if ((void *)(iph + 1) > data_end || iph->version != 4 || iph->ihl < 5)
			return -1;
		il4 = il3 + iph->ihl * 4;
		q->proto = iph->protocol;
		q->saddr[0] = iph->saddr;
		q->daddr[0] = iph->daddr;
	} else {
		struct ipv6hdr *ip6 = data + il3;
		if ((void *)(ip6 + 1) > data_end || ip6->version != 6)
			return -1;
		il4 = il3 + sizeof(*ip6);
		q->proto = ip6->nexthdr;
		__builtin_memcpy(q->saddr, &ip6->saddr, 16);
		__builtin_memcpy(q->daddr, &ip6->daddr, 16);
	}
	if (q->proto != IPPROTO_TCP && q->proto != IPPROTO_UDP)
		return -1;
	__be16 *ports = data + il4;
	if ((void *)(ports + 2) > data_end || il4 + 4 > p->l3_end)
		return -1;
	q->family = p->family;
	q->sport = ports[0];
	q->dport = ports[1];
	q->il3 = il3;
	q->il4 = il4;
	return 0;
}

/* Rewrite an ICMP error: outer destination -> odst, quoted source -> qsrc:qsport and, when
 * qdst is given, quoted destination -> qdst:qdport. Returns 0, or -1 (REWRITE) on failure. */
static __always_inline int icmp_rewrite(struct xdp_md *ctx, const struct pkt *p, const struct icmp_quote *q,
					const __u32 *odst, const __u32 *qsrc, __be16 qsport,
					const __u32 *qdst, __be16 qdport)
{
	void *data, *data_end;
	__u32 icsum = p->l4_off + 2, il3 = q->il3, il4 = q->il4;

	if (p->family == 4) {
		__be32 oold = p->daddr[0], onew = odst[0], sold = q->saddr[0], snew = qsrc[0];
		__be32 dold = q->daddr[0], dnew = qdst ? qdst[0] : q->daddr[0];
		__u32 ich_off = il3 + 10;
		__be16 ich_old, ich_new;
		/* outer destination: IPv4 header checksum only (ICMPv4 has no pseudo header) */
		if (ctx_store(ctx, p->l3_off + 16, &onew, 4) ||
		    ctx_l3_csum_replace(ctx, p->l3_off + 10, oold, onew, 4))
			return -1;
		data = ctx_data(ctx); data_end = ctx_data_end(ctx);
		if (data + ich_off + 2 > data_end)
			return -1;
		ich_old = *(__be16 *)(data + ich_off);
		/* quoted addresses: quoted header checksum, then the ICMP checksum over all of it */
		if (ctx_store(ctx, il3 + 12, &snew, 4) || ctx_l3_csum_replace(ctx, ich_off, sold, snew, 4))
			return -1;
		if (qdst && (ctx_store(ctx, il3 + 16, &dnew, 4) ||
			     ctx_l3_csum_replace(ctx, ich_off, dold, dnew, 4)))
			return -1;
		data = ctx_data(ctx); data_end = ctx_data_end(ctx);
		if (data + ich_off + 2 > data_end)
			return -1;
		ich_new = *(__be16 *)(data + ich_off);
		if (ctx_l4_csum_replace(ctx, icsum, sold, snew, 4) ||
		    (qdst && ctx_l4_csum_replace(ctx, icsum, dold, dnew, 4)) ||
		    ctx_l4_csum_replace(ctx, icsum, ich_old, ich_new, 2))
			return -1;
	} else {
		__u32 od[4], qs[4], qd[4];
		addr_copy(od, odst);
		addr_copy(qs, qsrc);
		addr_copy(qd, qdst ? qdst : q->daddr);
		/* the ICMPv6 checksum covers the pseudo header (outer daddr) and the quoted packet */
		__u32 d1 = csum_diff_addr6(p->daddr, od), d2 = csum_diff_addr6(q->saddr, qs);
		if (ctx_store(ctx, p->l3_off + 24, od, 16) || ctx_store(ctx, il3 + 8, qs, 16) ||
		    ctx_l4_csum_replace(ctx, icsum, 0, d1, 0) || ctx_l4_csum_replace(ctx, icsum, 0, d2, 0))
			return -1;
		if (qdst && (ctx_store(ctx, il3 + 24, qd, 16) ||
			     ctx_l4_csum_replace(ctx, icsum, 0, csum_diff_addr6(q->daddr, qd), 0)))
			return -1;
	}
	if (ctx_store(ctx, il4, &qsport, 2) || ctx_l4_csum_replace(ctx, icsum, q->sport, qsport, 2))
		return -1;
	if (qdst && (ctx_store(ctx, il4 + 2, &qdport, 2) ||
		     ctx_l4_csum_replace(ctx, icsum, q->dport, qdport, 2)))
		return -1;
	return 0;
}

/* A router between this node and a SNAT backend reports on our translated request
 * (node:nat_port -> backend:port): the client gets it about client:port -> VIP:port. */
static __always_inline int icmp_error_snat_request(struct xdp_md *ctx, struct pkt *p, const struct icmp_quote *q)
{
	__u16 nport = bpf_ntohs(q->sport);

	if (nport < SNAT_PORT_MIN || nport > SNAT_PORT_MAX || !addr_eq(p->daddr, q->saddr))
		return -1;
	__u32 nidx = p->family == 4 ? 0 : 1;
	struct node_addr *na = node_cfg_v1.lookup(&nidx);
	if (!na || !na->valid || !addr_eq(na->addr, q->saddr))
		return -1;
	struct snat_slot *s = snat_slot_find(q->daddr, q->family, q->dport, q->sport, q->proto);
	if (!s)
		return -1;
	__u32 vip[4], client[4];
	__be16 vport = s->vport, cport = s->cport;
	addr_copy(vip, s->vaddr);
	addr_copy(client, s->caddr);
	__u32 zero = 0;
	struct scratch *scr = scratch_v1.lookup(&zero);
	if (!scr)
		return -1;
	int fr = fib_lookup_to(ctx, p, p->saddr, client, p->l3_end - p->l3_off, &scr->fib);
	if (fr == FIB_FAIL)
		return -1;   /* no route to the client: leave the error to the stack, untouched */
	if (icmp_rewrite(ctx, p, q, client, client, cport, vip, vport))
		return drop(DROP_REWRITE);
	stat_inc(HOOK_XDP, STAT_ICMP_MAPPED);
	return fib_forward(ctx, &scr->fib, fr);
}

static __always_inline int icmp_error_to_flow(struct xdp_md *ctx, struct pkt *p)
{
	struct icmp_quote q = {};

	if (icmp_parse_quote(ctx, p, &q))
		return -1;
	struct svc_key sk = {};
	addr_copy(sk.addr, q.saddr);
	sk.port = q.sport;
	sk.proto = q.proto;
	sk.family = q.family;
	struct svc_val *svc = services_v2.lookup(&sk);
	if (!svc)
		return icmp_error_snat_request(ctx, p, &q);
	if (!addr_eq(p->daddr, q.saddr))
		return -1;   /* an error about VIP traffic must be addressed to the VIP */

	/* the flow as the client sent it: client -> VIP */
	struct ct_key ck = {};
	ct_key_set(&ck, q.daddr, q.saddr, q.dport, q.sport, q.proto, q.family, CT_DIR_SERVICE);
	__u32 bid = 0;
	__be16 nat_port = 0;
	__u16 ct_flags = 0;
	struct snat_slot *fs = NULL;
	struct ct_val *cv = NULL;
	struct dsr_flow *df = NULL;
	__u64 st = 0;
	__u32 fh = flow_hash_tuple(ck.saddr, ck.family, ck.sport, ck.dport, ck.proto);
	if (!(svc->flags & SVC_F_STATELESS)) {   /* a DSR or SNAT flow: its line (lb.h "Flow table") */
		df = dsr_flow_find(ck.saddr, ck.daddr, ck.sport, ck.dport, ck.proto, ck.family,
				   dsr_flow_start(fh, ck.daddr), &st);
		if (df && (LINE_FLAGS(st) & CT_F_SNAT) != (svc->flags & SVC_F_DSR ? 0 : CT_F_SNAT))
			df = NULL;   /* a line of the service's other mode: the flow re-balances */
	}
	if (!df && !(svc->flags & (SVC_F_DSR | SVC_F_STATELESS)))   /* a SNAT flow of before lines (lb.h "SNAT flow index") */
		fs = snat_flow_find(snat_search_start(fh, ck.daddr), ck.saddr, ck.daddr, ck.sport, ck.dport, ck.proto,
				    ck.family);
	if (!fs && !df)
		cv = ct_v2.lookup(&ck);
	if (df) {
		bid = LINE_BID(st);
		ct_flags = LINE_FLAGS(st);
		if (ct_flags & CT_F_SNAT)
			nat_port = LINE_NAT_PORT(st);
		__u32 esvc = df->svc_id, egen = df->svc_gen;
		if (!member_of(svc, svc->id, bid, &esvc, &egen, 0))
			bid = 0;   /* the flow's backend left the service: its next packet re-balances */
	} else if (fs) {
		bid = fs->backend_id;
		nat_port = fs->nat_port;
		ct_flags = fs->flags;
		__u32 esvc = fs->svc_id, egen = fs->svc_gen;
		if (!member_of(svc, svc->id, bid, &esvc, &egen, 0))
			bid = 0;
	} else if (cv) {
		bid = cv->backend_id;
		nat_port = cv->nat_port;
		ct_flags = cv->flags;
		__u32 esvc = cv->svc_id, egen = cv->svc_gen;
		if (!member_of(svc, svc->id, bid, &esvc, &egen, 0))
			bid = 0;   /* the flow's backend left the service: its next packet re-balances */
	} else if (svc->table_size) {
		__u32 slot = svc->table_off +
			flow_hash_tuple(ck.saddr, ck.family, (svc->flags & SVC_F_AFFINITY) ? 0 : ck.sport,
					ck.dport, ck.proto) % svc->table_size;
		__u32 *sb = maglev_v1.lookup(&slot);
		if (sb)
			bid = *sb;
	}
	struct backend *be = backends_v2.lookup(&bid);
	if (!bid || !be || !(be->flags & BE_F_ACTIVE))
		return -1;
	__u32 baddr[4];
	__be16 bport = be->port;
	addr_copy(baddr, be->addr);

	if (be->flags & BE_F_LOCAL) {
		if (icmp_rewrite(ctx, p, &q, baddr, baddr, bport, NULL, 0))
			return drop(DROP_REWRITE);
		stat_inc(HOOK_XDP, STAT_ICMP_MAPPED);
		return verdict(HOOK_XDP, XDP_PASS);
	}

	/* remote backend: everything that can refuse the error runs before its first rewrite */
	__u32 naddr[4] = {};
	int snat = !(svc->flags & SVC_F_DSR);
	if (snat) {
		/* the backend knows the flow as backend:port <-> node:nat_port (no entry: no port) */
		if (!(ct_flags & CT_F_SNAT) || !nat_port)
			return -1;
		__u32 nidx = p->family == 4 ? 0 : 1;
		struct node_addr *na = node_cfg_v1.lookup(&nidx);
		if (!na || !na->valid)
			return -1;
		addr_copy(naddr, na->addr);
	}
	__u32 zero = 0;
	struct scratch *scr = scratch_v1.lookup(&zero);
	if (!scr)
		return -1;
	int fr = fib_lookup_to(ctx, p, p->saddr, baddr, p->l3_end - p->l3_off, &scr->fib);
	if (fr == FIB_FAIL)
		return -1;   /* no route to the backend: leave the error to the stack, untouched */
	if (icmp_rewrite(ctx, p, &q, baddr, baddr, bport, snat ? naddr : NULL, nat_port))
		return drop(DROP_REWRITE);
	stat_inc(HOOK_XDP, STAT_ICMP_MAPPED);
	return fib_forward(ctx, &scr->fib, fr);
}
