/* icmp.h: ICMP/ICMPv6 errors about a service flow are delivered to that flow's backend.
 *
 * A router on the client's path answers a reply we sent (source VIP:port) with an error
 * (fragmentation needed / packet too big, unreachable, time exceeded) addressed to the VIP.
 * The quoted inner packet is VIP:port -> client:port; its reverse is the flow's conntrack
 * key (or, without an entry, its Maglev slot: the hash excludes the destination). For a local
 * backend the error is rewritten like the flow itself: outer destination and inner source
 * become the backend, with the IPv4 header, inner header and ICMP checksums updated, so the
 * backend's socket sees its PMTU/unreachable signal. Errors about other flows, or whose flow
 * is served by a remote backend, pass untouched.
 */
#pragma once

static __always_inline int icmp_error_to_local(struct xdp_md *ctx, struct pkt *p)
{
	void *data = ctx_data(ctx), *data_end = ctx_data_end(ctx);
	int v4 = p->family == 4;
	struct {
		__u32 saddr[4];
		__u32 daddr[4];
		__be16 sport, dport;
		__u8 proto, family;
	} in = {};
	__u32 il3 = p->l4_off + 8, il4, icsum = p->l4_off + 2;

	if (v4 ? !(p->icmp_type == 3 || p->icmp_type == 11 || p->icmp_type == 12)
	       : !(p->icmp_type >= 1 && p->icmp_type <= 4))
		return -1;
	if (il3 > 0x3ff)
		return -1;
	if (v4) {
		struct iphdr *iph = data + il3;
		if ((void *)(iph + 1) > data_end || iph->version != 4 || iph->ihl < 5)
			return -1;
		il4 = il3 + iph->ihl * 4;
		in.proto = iph->protocol;
		in.saddr[0] = iph->saddr;
		in.daddr[0] = iph->daddr;
	} else {
		struct ipv6hdr *ip6 = data + il3;
		if ((void *)(ip6 + 1) > data_end || ip6->version != 6)
			return -1;
		il4 = il3 + sizeof(*ip6);
		in.proto = ip6->nexthdr;
		__builtin_memcpy(in.saddr, &ip6->saddr, 16);
		__builtin_memcpy(in.daddr, &ip6->daddr, 16);
	}
	if (in.proto != IPPROTO_TCP && in.proto != IPPROTO_UDP)
		return -1;
	__be16 *ports = data + il4;
	if ((void *)(ports + 2) > data_end || il4 + 4 > p->l3_end)
		return -1;
	in.family = p->family;
	in.sport = ports[0];
	in.dport = ports[1];

	struct svc_key sk = {};
	addr_copy(sk.addr, in.saddr);
	sk.port = in.sport;
	sk.proto = in.proto;
	sk.family = in.family;
	struct svc_val *svc = services_v2.lookup(&sk);
	if (!svc)
		return -1;

	/* the flow as the client sent it: client -> VIP */
	struct ct_key ck = {};
	addr_copy(ck.saddr, in.daddr);
	addr_copy(ck.daddr, in.saddr);
	ck.sport = in.dport;
	ck.dport = in.sport;
	ck.proto = in.proto;
	ck.family = in.family;
	ck.dir = CT_DIR_SERVICE;
	__u32 bid = 0;
	struct ct_val *cv = ct_v1.lookup(&ck);
	if (cv) {
		bid = cv->backend_id;
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
	if (!bid || !be || !(be->flags & BE_F_ACTIVE) || !(be->flags & BE_F_LOCAL))
		return -1;
	__u32 baddr[4];
	__be16 bport = be->port, vport = in.sport;
	addr_copy(baddr, be->addr);

	if (v4) {
		__be32 vip = in.saddr[0], b = baddr[0];
		/* outer destination: IPv4 header checksum only (ICMPv4 has no pseudo header) */
		if (ctx_store(ctx, p->l3_off + 16, &b, 4) ||
		    ctx_l3_csum_replace(ctx, p->l3_off + 10, vip, b, 4))
			return drop(DROP_REWRITE);
		/* inner source: inner header checksum, and the ICMP checksum over both changes */
		__u32 ich_off = il3 + 10;
		__be16 ich_old, ich_new;
		data = ctx_data(ctx); data_end = ctx_data_end(ctx);
		if (data + ich_off + 2 > data_end)
			return drop(DROP_REWRITE);
		ich_old = *(__be16 *)(data + ich_off);
		if (ctx_store(ctx, il3 + 12, &b, 4) ||
		    ctx_l3_csum_replace(ctx, ich_off, vip, b, 4))
			return drop(DROP_REWRITE);
		data = ctx_data(ctx); data_end = ctx_data_end(ctx);
		if (data + ich_off + 2 > data_end)
			return drop(DROP_REWRITE);
		ich_new = *(__be16 *)(data + ich_off);
		if (ctx_l4_csum_replace(ctx, icsum, vip, b, 4) ||
		    ctx_l4_csum_replace(ctx, icsum, ich_old, ich_new, 2))
			return drop(DROP_REWRITE);
	} else {
		__u32 diff = csum_diff_addr6(in.saddr, baddr);
		/* ICMPv6 checksum covers the pseudo header (outer daddr) and the quoted packet */
		if (ctx_store(ctx, p->l3_off + 24, baddr, 16) ||
		    ctx_store(ctx, il3 + 8, baddr, 16) ||
		    ctx_l4_csum_replace(ctx, icsum, 0, diff, 0) ||
		    ctx_l4_csum_replace(ctx, icsum, 0, diff, 0))
			return drop(DROP_REWRITE);
	}
	if (ctx_store(ctx, il4, &bport, 2) || ctx_l4_csum_replace(ctx, icsum, vport, bport, 2))
		return drop(DROP_REWRITE);
	stat_inc(HOOK_XDP, STAT_ICMP_MAPPED);
	return verdict(HOOK_XDP, XDP_PASS);
}
