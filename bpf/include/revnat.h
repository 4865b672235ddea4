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

/* Returns 1 if the packet was rewritten, 0 if it is not a tracked reply, -1 on failure. */
static __always_inline int revnat_reply(CTX *ctx, const struct pkt *p)
{
	struct ct_key k = {};
	struct ct_val *v;
	__u32 vip[4];
	__be16 vport;

	if (p->frag || (p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP))
		return 0;
	reply_key(&k, p);
	v = ct_v1.lookup(&k);
	if (!v || (v->flags & CT_F_SNAT))
		return 0;  /* SNAT replies are reversed by XDP on ingress */
	addr_copy(vip, v->raddr);
	vport = v->rport;
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
	addr_copy(k.saddr, p->daddr);
	addr_copy(k.daddr, p->saddr);
	k.sport = p->dport;
	k.dport = p->sport;
	k.proto = p->proto;
	k.family = p->family;
	k.dir = CT_DIR_REPLY;
	v.flags = CT_F_DSR;
	ct_v1.update(&k, &v);
	return 1;
}
