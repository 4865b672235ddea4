/* parse.h: Ethernet (+802.1Q/802.1ad), IPv4 (with options), IPv6 (with extension headers),
 * TCP, UDP, ICMP/ICMPv6 into struct pkt (addresses, ports and header offsets).
 *
 * Rules: every header is bounds-checked against the linear data (data_end) before it is read
 * in place; lengths are checked against the whole packet (ctx_has: skb->len in tc, the
 * multi-buffer frame length in XDP), since the payload of a GSO/GRO or page-fragment skb or of
 * a multi-buffer XDP frame lies beyond data_end. An IP header whose length fields disagree with
 * the packet, or an L4 header that does not fit in the IP payload, makes the packet PARSE_BAD.
 * A header that is in the packet but not in the linear data makes it PARSE_SHORT with
 * p->need = the bytes from the frame start the parser needs linear: tc pulls exactly those
 * (parse_packet_pull) and parses again; XDP treats it as unparsed. Callers never rewrite a
 * packet that did not parse (they pass it untouched).
 */
#pragma once

#define PARSE_OK     0
#define PARSE_NOT_IP 1
#define PARSE_BAD    2
#define PARSE_SHORT  3

struct pkt {
	__u32 saddr[4];
	__u32 daddr[4];
	__be16 sport;       /* TCP/UDP ports; ICMP: 0 */
	__be16 dport;
	__u16 l3_off;       /* offset of the IP header in the frame */
	__u16 l4_off;       /* offset of the L4 header */
	__u16 l3_end;       /* offset of the end of the IP packet (frame may carry padding) */
	__u16 need;         /* PARSE_SHORT: headers end here (bytes from the frame start) */
	__u8 family;        /* 4 or 6 */
	__u8 proto;         /* L4 protocol after IPv6 extension headers */
	__u8 tcp_flags;
	__u8 frag;          /* 1: an IPv4 fragment (MF or offset) or IPv6 Fragment header */
	__u8 ip_opts;       /* 1: IPv4 options or IPv6 extension headers present */
	__u8 l4_csum_off;   /* L4 checksum offset inside the L4 header (TCP 16, UDP 6, ICMPv6 2), 0: none */
	__u8 icmp_type;
	__u8 icmp_code;
};

/* The header ending at offset end is not in the linear data: in the packet -> PARSE_SHORT
 * (need it linear), beyond it -> PARSE_BAD. */
static __always_inline int parse_short(CTX *ctx, struct pkt *p, __u32 end)
{
	if (!ctx_has(ctx, end))
		return PARSE_BAD;
	p->need = end;
	return PARSE_SHORT;
}

static __always_inline int parse_l4(CTX *ctx, void *data, void *data_end, struct pkt *p)
{
	void *l4 = data + p->l4_off;
	__u32 l4_off = p->l4_off, end = p->l3_end;

	if (p->frag)
		return PARSE_OK;  /* ports unknown (or untrusted): caller applies the fragment policy */
	switch (p->proto) {
	case IPPROTO_TCP: {
		struct tcphdr *th = l4;
		if (l4_off + sizeof(*th) > end)
			return PARSE_BAD;
		if ((void *)(th + 1) > data_end)
			return parse_short(ctx, p, l4_off + sizeof(*th));
		if (th->doff < 5 || l4_off + th->doff * 4 > end)
			return PARSE_BAD;
		p->sport = th->source;
		p->dport = th->dest;
		p->tcp_flags = ((__u8 *)th)[13];
		p->l4_csum_off = 16;
		return PARSE_OK;
	}
	case IPPROTO_UDP: {
		struct udphdr *uh = l4;
		if (l4_off + sizeof(*uh) > end)
			return PARSE_BAD;
		if ((void *)(uh + 1) > data_end)
			return parse_short(ctx, p, l4_off + sizeof(*uh));
		if (bpf_ntohs(uh->len) < sizeof(*uh) || l4_off + bpf_ntohs(uh->len) > end)
			return PARSE_BAD;
		p->sport = uh->source;
		p->dport = uh->dest;
		p->l4_csum_off = 6;
		return PARSE_OK;
	}
	case IPPROTO_ICMP:
	case IPPROTO_ICMPV6: {
		__u8 *ih = l4;
		if (l4_off + 8 > end)
			return PARSE_BAD;
		if ((void *)(ih + 8) > data_end)
			return parse_short(ctx, p, l4_off + 8);
		p->icmp_type = ih[0];
		p->icmp_code = ih[1];
		p->l4_csum_off = p->proto == IPPROTO_ICMPV6 ? 2 : 0;  /* ICMPv4 has no pseudo header */
#ifdef CTX_IS_SKB
		/* tc reads an error's quoted IP header (at most 60/40 bytes) and ports in place too
		 * (XDP's linear part always holds them) */
		__u32 quote = l4_off + 8 + (p->family == 4 ? 60 : 40) + 8;
		if (quote > end)
			quote = end;
		if (quote > (__u32)(data_end - data))
			return parse_short(ctx, p, quote);
#endif
		return PARSE_OK;
	}
	}
	return PARSE_OK;
}

static __always_inline int parse_ipv4(CTX *ctx, void *data, void *data_end, struct pkt *p)
{
	struct iphdr *iph = data + p->l3_off;
	__u32 hlen, tot;

	if ((void *)(iph + 1) > data_end)
		return parse_short(ctx, p, p->l3_off + sizeof(*iph));
	if (iph->version != 4 || iph->ihl < 5)
		return PARSE_BAD;
	hlen = iph->ihl * 4;
	tot = bpf_ntohs(iph->tot_len);
	if (tot < hlen || !ctx_has(ctx, p->l3_off + tot))
		return PARSE_BAD;
	p->family = 4;
	p->proto = iph->protocol;
	p->saddr[0] = iph->saddr;
	p->daddr[0] = iph->daddr;
	p->l4_off = p->l3_off + hlen;
	p->l3_end = p->l3_off + tot;
	p->ip_opts = hlen > 20;
	p->frag = (iph->frag_off & IP_MF_OFFSET_BE) != 0;
	return parse_l4(ctx, data, data_end, p);
}

static __always_inline int parse_ipv6(CTX *ctx, void *data, void *data_end, struct pkt *p)
{
	struct ipv6hdr *ip6 = data + p->l3_off;
	__u32 off;
	__u8 nh;

	if ((void *)(ip6 + 1) > data_end)
		return parse_short(ctx, p, p->l3_off + sizeof(*ip6));
	if (ip6->version != 6)
		return PARSE_BAD;
	off = p->l3_off + sizeof(*ip6);
	if (!ctx_has(ctx, off + bpf_ntohs(ip6->payload_len)))
		return PARSE_BAD;
	p->family = 6;
	p->l3_end = off + bpf_ntohs(ip6->payload_len);
	__builtin_memcpy(p->saddr, &ip6->saddr, 16);
	__builtin_memcpy(p->daddr, &ip6->daddr, 16);
	nh = ip6->nexthdr;
#pragma unroll
	for (int i = 0; i < MAX_V6_EXT_HDRS; i++) {
		__u8 *eh = data + off;
		if (nh != NEXTHDR_HOP && nh != NEXTHDR_ROUTING && nh != NEXTHDR_DEST &&
		    nh != NEXTHDR_FRAGMENT && nh != NEXTHDR_AUTH)
			break;
		if (off + 8 > p->l3_end)
			return PARSE_BAD;
		if ((void *)(eh + 8) > data_end)
			return parse_short(ctx, p, off + 8);
		p->ip_opts = 1;
		if (nh == NEXTHDR_FRAGMENT) {
			p->frag = 1;
			off += 8;
		} else if (nh == NEXTHDR_AUTH) {
			off += (eh[1] + 2) * 4;
		} else {
			off += (eh[1] + 1) * 8;
		}
		nh = eh[0];
		if (off > p->l3_end)
			return PARSE_BAD;
	}
	if (nh == NEXTHDR_HOP || nh == NEXTHDR_ROUTING || nh == NEXTHDR_DEST ||
	    nh == NEXTHDR_FRAGMENT || nh == NEXTHDR_AUTH)
		return PARSE_BAD;  /* more extension headers than we walk: not ours to touch */
	p->proto = nh;
	p->l4_off = off;
	return parse_l4(ctx, data, data_end, p);
}

static __always_inline int parse_packet(CTX *ctx, struct pkt *p)
{
	void *data = ctx_data(ctx), *data_end = ctx_data_end(ctx);
	struct ethhdr *eth = data;
	__be16 proto;
	__u32 off = sizeof(*eth);

	if ((void *)(eth + 1) > data_end)
		return parse_short(ctx, p, sizeof(*eth));
	proto = eth->h_proto;
#pragma unroll
	for (int i = 0; i < 2; i++) {  /* 802.1ad outer + 802.1Q inner at most */
		if (proto != ETH_P_8021Q_BE && proto != ETH_P_8021AD_BE)
			break;
		__be16 *vh = data + off;  /* TCI, then the encapsulated ethertype */
		if ((void *)(vh + 2) > data_end)
			return parse_short(ctx, p, off + 4);
		proto = vh[1];
		off += 4;
	}
	p->l3_off = off;
	if (proto == ETH_P_IP_BE)
		return parse_ipv4(ctx, data, data_end, p);
	if (proto == ETH_P_IPV6_BE)
		return parse_ipv6(ctx, data, data_end, p);
	return PARSE_NOT_IP;
}

/* parse_packet; while a header is not in the linear data, make the headers found so far plus
 * that one linear (tc: bpf_skb_pull_data; the payload stays in its fragments) and parse again:
 * each round gets at least one header further (Ethernet, VLAN tags, IP, extension headers, L4,
 * an ICMP error's quote). Packets from the stack carry their headers in the linear head, so they
 * parse in the first round. XDP cannot pull: its multi-buffer frames keep at least the first
 * ~3.5k bytes linear. */
#define PARSE_ROUNDS (3 + MAX_V6_EXT_HDRS + 2)
static __always_inline int parse_packet_pull(CTX *ctx, struct pkt *p)
{
	int rc = PARSE_BAD;

#pragma nounroll
	for (int i = 0; i < PARSE_ROUNDS; i++) {
		__builtin_memset(p, 0, sizeof(*p));
		rc = parse_packet(ctx, p);
		if (rc != PARSE_SHORT)
			return rc;
		if (ctx_pull(ctx, p->need))
			return PARSE_BAD;
	}
	return PARSE_BAD;
}

static __always_inline int addr_eq(const __u32 *a, const __u32 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

static __always_inline void addr_copy(__u32 *dst, const __u32 *src)
{
	dst[0] = src[0]; dst[1] = src[1]; dst[2] = src[2]; dst[3] = src[3];
}

/* Fill a conntrack key (one place for its field order; callers pass the flow's direction). */
static __always_inline void ct_key_set(struct ct_key *k, const __u32 *saddr, const __u32 *daddr,
				       __be16 sport, __be16 dport, __u8 proto, __u8 family, __u8 dir)
{
	addr_copy(k->saddr, saddr);
	addr_copy(k->daddr, daddr);
	k->sport = sport;
	k->dport = dport;
	k->proto = proto;
	k->family = family;
	k->dir = dir;
}
