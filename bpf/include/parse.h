/* parse.h: Ethernet (+802.1Q/802.1ad), IPv4 (with options), IPv6 (with extension headers),
 * TCP, UDP, ICMP/ICMPv6 into struct pkt (addresses, ports and header offsets).
 *
 * Rules: every header is bounds-checked before it is read; an IP header whose length fields
 * disagree with the frame, or an L4 header that does not fit in the IP payload, makes the
 * packet PARSE_BAD. Callers never rewrite a PARSE_BAD packet (they pass it untouched).
 */
#pragma once

#define PARSE_OK     0
#define PARSE_NOT_IP 1
#define PARSE_BAD    2

struct pkt {
	__u32 saddr[4];
	__u32 daddr[4];
	__be16 sport;       /* TCP/UDP ports; ICMP: 0 */
	__be16 dport;
	__u16 l3_off;       /* offset of the IP header in the frame */
	__u16 l4_off;       /* offset of the L4 header */
	__u16 l3_end;       /* offset of the end of the IP packet (frame may carry padding) */
	__u8 family;        /* 4 or 6 */
	__u8 proto;         /* L4 protocol after IPv6 extension headers */
	__u8 tcp_flags;
	__u8 frag;          /* 1: an IPv4 fragment (MF or offset) or IPv6 Fragment header */
	__u8 ip_opts;       /* 1: IPv4 options or IPv6 extension headers present */
	__u8 l4_csum_off;   /* L4 checksum offset inside the L4 header (TCP 16, UDP 6, ICMPv6 2), 0: none */
	__u8 icmp_type;
	__u8 icmp_code;
};

static __always_inline int parse_l4(void *data, void *data_end, struct pkt *p)
{
	void *l4 = data + p->l4_off;
	void *ip_end = data + p->l3_end;

	if (p->frag)
		return PARSE_OK;  /* ports unknown (or untrusted): caller applies the fragment policy */
	switch (p->proto) {
	case IPPROTO_TCP: {
		struct tcphdr *th = l4;
		if ((void *)(th + 1) > data_end || (void *)(th + 1) > ip_end)
			return PARSE_BAD;
		if (th->doff < 5 || l4 + th->doff * 4 > ip_end)
			return PARSE_BAD;
		p->sport = th->source;
		p->dport = th->dest;
		p->tcp_flags = ((__u8 *)th)[13];
		p->l4_csum_off = 16;
		return PARSE_OK;
	}
	case IPPROTO_UDP: {
		struct udphdr *uh = l4;
		if ((void *)(uh + 1) > data_end || (void *)(uh + 1) > ip_end)
			return PARSE_BAD;
		if (bpf_ntohs(uh->len) < sizeof(*uh) || l4 + bpf_ntohs(uh->len) > ip_end)
			return PARSE_BAD;
		p->sport = uh->source;
		p->dport = uh->dest;
		p->l4_csum_off = 6;
		return PARSE_OK;
	}
	case IPPROTO_ICMP:
	case IPPROTO_ICMPV6: {
		__u8 *ih = l4;
		if ((void *)(ih + 8) > data_end || (void *)(ih + 8) > ip_end)
			return PARSE_BAD;
		p->icmp_type = ih[0];
		p->icmp_code = ih[1];
		p->l4_csum_off = p->proto == IPPROTO_ICMPV6 ? 2 : 0;  /* ICMPv4 has no pseudo header */
		return PARSE_OK;
	}
	}
	return PARSE_OK;
}

static __always_inline int parse_ipv4(void *data, void *data_end, struct pkt *p)
{
	struct iphdr *iph = data + p->l3_off;
	__u32 hlen, tot;

	if ((void *)(iph + 1) > data_end)
		return PARSE_BAD;
	if (iph->version != 4 || iph->ihl < 5)
		return PARSE_BAD;
	hlen = iph->ihl * 4;
	tot = bpf_ntohs(iph->tot_len);
	if (tot < hlen || data + p->l3_off + tot > data_end)
		return PARSE_BAD;
	p->family = 4;
	p->proto = iph->protocol;
	p->saddr[0] = iph->saddr;
	p->daddr[0] = iph->daddr;
	p->l4_off = p->l3_off + hlen;
	p->l3_end = p->l3_off + tot;
	p->ip_opts = hlen > 20;
	p->frag = (iph->frag_off & IP_MF_OFFSET_BE) != 0;
	return parse_l4(data, data_end, p);
}

static __always_inline int parse_ipv6(void *data, void *data_end, struct pkt *p)
{
	struct ipv6hdr *ip6 = data + p->l3_off;
	__u32 off;
	__u8 nh;

	if ((void *)(ip6 + 1) > data_end)
		return PARSE_BAD;
	if (ip6->version != 6)
		return PARSE_BAD;
	off = p->l3_off + sizeof(*ip6);
	if (data + off + bpf_ntohs(ip6->payload_len) > data_end)
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
		if ((void *)(eh + 8) > data_end || off + 8 > p->l3_end)
			return PARSE_BAD;
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
	return parse_l4(data, data_end, p);
}

static __always_inline int parse_packet(CTX *ctx, struct pkt *p)
{
	void *data = ctx_data(ctx), *data_end = ctx_data_end(ctx);
	struct ethhdr *eth = data;
	__be16 proto;
	__u32 off = sizeof(*eth);

	if ((void *)(eth + 1) > data_end)
		return PARSE_BAD;
	proto = eth->h_proto;
#pragma unroll
	for (int i = 0; i < 2; i++) {  /* 802.1ad outer + 802.1Q inner at most */
		if (proto != ETH_P_8021Q_BE && proto != ETH_P_8021AD_BE)
			break;
		__be16 *vh = data + off;  /* TCI, then the encapsulated ethertype */
		if ((void *)(vh + 2) > data_end)
			return PARSE_BAD;
		proto = vh[1];
		off += 4;
	}
	p->l3_off = off;
	if (proto == ETH_P_IP_BE)
		return parse_ipv4(data, data_end, p);
	if (proto == ETH_P_IPV6_BE)
		return parse_ipv6(data, data_end, p);
	return PARSE_NOT_IP;
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
