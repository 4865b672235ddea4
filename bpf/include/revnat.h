/* revnat.h: the reply side, shared by the tc programs.
 *
 * tc egress (node uplink): a reply leaving a local or DSR backend finds its CT_DIR_REPLY
 * entry and gets its source rewritten back to VIP:port, so the client only sees the VIP.
 * tc ingress (backend node uplink): a packet carrying the DSR option records such an entry.
 */
#pragma once

static __always_inline void reply_key(struct ct_key *k, const struct pkt *p)
{
	addr_copy(k->saddr, p->saddr);
	addr_copy(k->daddr, p->daddr);
	k->sport = p->sport;
	k->dport = p->dport;
	k->proto = p->proto;
	k->family = p->family;
	k->dir = CT_DIR_REPLY;
}

/* What a reply (key k: backend -> client, dir REPLY) of a local or DSR backend's flow must
 * leave as: its REPLY entry; or, for a flow of a local backend's designated service (which
 * XDP creates without a REPLY entry), revnat[backend] names the frontend and the flow's
 * SERVICE entry {client -> frontend} must exist and name this backend.
 * Returns 1 and fills vip/vport, or 0 (not a tracked local/DSR reply; SNAT replies are XDP's). */
static __always_inline int reply_rewrite_of(struct ct_key *k, __u32 *vip, __be16 *vport)
{
	struct ct_val *v = ct_v2.lookup(k);

	if (v) {
		if (v->flags & CT_F_SNAT)
			return 0;
		addr_copy(vip, v->raddr);
		*vport = v->rport;
		return 1;
	}
	if (!DERIVE_LOCAL_REPLIES)
		return 0;
	struct svc_key bk = {};
	addr_copy(bk.addr, k->saddr);
	bk.port = k->sport;
	bk.proto = k->proto;
	bk.family = k->family;
	struct revnat_val *r = revnat_v1.lookup(&bk);
	if (!r)
		return 0;
	__u32 bid = r->backend_id;
	__be16 fport = r->vport;
	__u32 front[4];
	addr_copy(front, r->vip);
	struct ct_key fk = {};
	ct_key_set(&fk, k->daddr, front, k->dport, fport, k->proto, k->family, CT_DIR_SERVICE);
	struct ct_val *fv = ct_v2.lookup(&fk);
	if (!fv || fv->backend_id != bid || !(fv->flags & CT_F_LOCAL))
		return 0;
	addr_copy(vip, front);
	*vport = fport;
	return 1;
}

/* Returns 1 if the packet was rewritten, 0 if it is not a tracked reply, -1 on failure. */
static __always_inline int revnat_reply(CTX *ctx, const struct pkt *p)
{
	struct ct_key k = {};
	__u32 vip[4];
	__be16 vport;

	if (p->frag || (p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP))
		return 0;
	reply_key(&k, p);
	if (!reply_rewrite_of(&k, vip, &vport))
		return 0;  /* SNAT replies are reversed by XDP on ingress */
	if (nat_rewrite(ctx, p, NAT_SRC, vip, vport))
		return -1;
	return 1;
}

/* Backend node: record the DSR option's VIP:port for the replies of this flow. */
static __always_inline int dsr_record(CTX *ctx, const struct pkt *p)
{
	void *data = ctx_data(ctx), *data_end = ctx_data_end(ctx);
	struct ct_key k = {};
	struct ct_val v = {};

	if (!p->ip_opts || p->frag || (p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP))
		return 0;
	if (p->family == 4) {
		__u8 *o = data + p->l3_off + 20;
		if ((void *)(o + DSR_IPV4_OPT_LEN) > data_end)
			return 0;
		if (o[0] != DSR_IPV4_OPT_TYPE || o[1] != DSR_IPV4_OPT_LEN)
			return 0;
		v.rport = *(__be16 *)(o + 2);
		v.raddr[0] = *(__u32 *)(o + 4);
	} else {
		struct ipv6hdr *ip6 = data + p->l3_off;
		__u8 *o = data + p->l3_off + 40;
		if ((void *)(ip6 + 1) > data_end || (void *)(o + 24) > data_end)
			return 0;
		if (ip6->nexthdr != NEXTHDR_DEST || o[2] != DSR_IPV6_OPT_TYPE || o[3] != DSR_IPV6_OPT_LEN)
			return 0;
		__builtin_memcpy(v.raddr, o + 4, 16);
		v.rport = *(__be16 *)(o + 20);
	}
	/* the reply will travel backend -> client */
	ct_key_set(&k, p->daddr, p->saddr, p->dport, p->sport, p->proto, p->family, CT_DIR_REPLY);
	v.flags = CT_F_DSR;
	ct_v2.update(&k, &v);
	return 1;
}

/* tc egress: an ICMP/ICMPv6 error a local or DSR backend sends about a service flow (e.g. UDP
 * port unreachable) quotes client -> backend:port; the client only knows VIP:port, so the
 * outer source and the quoted destination become the VIP again (the reply entry says which).
 * Returns 1 if rewritten, 0 if not a tracked flow's error, -1 on failure. */
static __always_inline int revnat_icmp_error(CTX *ctx, const struct pkt *p)
{
	void *data = ctx_data(ctx), *data_end = ctx_data_end(ctx);
	int v4 = p->family == 4;
	__u32 il3 = p->l4_off + 8, il4, icsum = p->l4_off + 2;
	struct ct_key k = {};

	if (p->frag || (v4 ? !(p->icmp_type == 3 || p->icmp_type == 11 || p->icmp_type == 12)
			  : !(p->icmp_type >= 1 && p->icmp_type <= 4)))
		return 0;
	if (il3 > 0x3ff)
		return 0;
	if (v4) {
		struct iphdr *iph = data + il3;
		if ((void *)(iph + 1) > data_end || iph->version != 4 || iph->ihl < 5)
			return 0;
		il4 = il3 + iph->ihl * 4;
		k.proto = iph->protocol;
		k.saddr[0] = iph->daddr;   /* the backend */
		k.daddr[0] = iph->saddr;   /* the client */
	} else {
		struct ipv6hdr *ip6 = data + il3;
		if ((void *)(ip6 + 1) > data_end || ip6->version != 6)
			return 0;
		il4 = il3 + sizeof(*ip6);
		k.proto = ip6->nexthdr;
		__builtin_memcpy(k.saddr, &ip6->daddr, 16);
		__builtin_memcpy(k.daddr, &ip6->saddr, 16);
	}
	if (k.proto != IPPROTO_TCP && k.proto != IPPROTO_UDP)
		return 0;
	__be16 *ports = data + il4;
	if ((void *)(ports + 2) > data_end || il4 + 4 > p->l3_end)
		return 0;
	k.sport = ports[1];
	k.dport = ports[0];
	k.family = p->family;
	k.dir = CT_DIR_REPLY;
	/* the error must come from the backend itself (not a router on the way) */
	if (!addr_eq(k.saddr, p->saddr))
		return 0;
	__u32 vip[4], backend[4];
	__be16 vport, bport = k.sport;
	if (!reply_rewrite_of(&k, vip, &vport))
		return 0;
	addr_copy(backend, k.saddr);

	if (v4) {
		__be32 from = backend[0], to = vip[0];
		__u32 ich_off = il3 + 10;
		__be16 ich_old, ich_new;
		/* outer source: IPv4 header checksum (ICMPv4 has no pseudo header) */
		if (ctx_store(ctx, p->l3_off + 12, &to, 4) ||
		    ctx_l3_csum_replace(ctx, p->l3_off + 10, from, to, 4))
			return -1;
		data = ctx_data(ctx); data_end = ctx_data_end(ctx);
		if (data + ich_off + 2 > data_end)
			return -1;
		ich_old = *(__be16 *)(data + ich_off);
		/* quoted destination: quoted header checksum, then the ICMP checksum over both */
		if (ctx_store(ctx, il3 + 16, &to, 4) || ctx_l3_csum_replace(ctx, ich_off, from, to, 4))
			return -1;
		data = ctx_data(ctx); data_end = ctx_data_end(ctx);
		if (data + ich_off + 2 > data_end)
			return -1;
		ich_new = *(__be16 *)(data + ich_off);
		if (ctx_l4_csum_replace(ctx, icsum, from, to, 4) ||
		    ctx_l4_csum_replace(ctx, icsum, ich_old, ich_new, 2))
			return -1;
	} else {
		__u32 diff = csum_diff_addr6(backend, vip);
		if (ctx_store(ctx, p->l3_off + 8, vip, 16) || ctx_store(ctx, il3 + 24, vip, 16) ||
		    ctx_l4_csum_replace(ctx, icsum, 0, diff, BPF_F_PSEUDO_HDR) ||
		    ctx_l4_csum_replace(ctx, icsum, 0, diff, 0))
			return -1;
	}
	if (ctx_store(ctx, il4 + 2, &vport, 2) || ctx_l4_csum_replace(ctx, icsum, bport, vport, 2))
		return -1;
	return 1;
}
