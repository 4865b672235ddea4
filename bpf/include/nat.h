/* nat.h: rewrite the source or destination (address, port) of a parsed TCP/UDP packet with
 * incremental IPv4 header and L4 checksum updates (RFC 1624; the L4 checksum covers the
 * pseudo header, so an address change updates it too). Works for XDP and tc via the shim.
 */
#pragma once

#define NAT_SRC 0
#define NAT_DST 1

static __always_inline int nat_rewrite(CTX *ctx, const struct pkt *p, int which,
				       const __u32 *addr, __be16 port)
{
	__u32 l4_csum = p->l4_csum_off ? p->l4_off + p->l4_csum_off : 0;
	__u64 mangled = p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	const __u32 *old = which == NAT_DST ? p->daddr : p->saddr;
	__be16 old_port = which == NAT_DST ? p->dport : p->sport;

	if (p->family == 4) {
		__u32 off = p->l3_off + (which == NAT_DST ? 16 : 12);
		__be32 from = old[0], to = addr[0];
		if (from != to) {
			if (ctx_store(ctx, off, &to, 4))
				return -1;
			if (ctx_l3_csum_replace(ctx, p->l3_off + 10, from, to, 4))
				return -1;
			if (l4_csum && ctx_l4_csum_replace(ctx, l4_csum, from, to,
							   4 | BPF_F_PSEUDO_HDR | mangled))
				return -1;
		}
	} else {
		__u32 off = p->l3_off + (which == NAT_DST ? 24 : 8);
		__u32 to[4] = { addr[0], addr[1], addr[2], addr[3] };
		if (!addr_eq(old, to)) {
			__u32 diff = csum_diff_addr6(old, to);
			if (ctx_store(ctx, off, to, 16))
				return -1;
			if (l4_csum && ctx_l4_csum_replace(ctx, l4_csum, 0, diff, BPF_F_PSEUDO_HDR | mangled))
				return -1;
		}
	}
	if (port != old_port && (p->proto == IPPROTO_TCP || p->proto == IPPROTO_UDP)) {
		__u32 off = p->l4_off + (which == NAT_DST ? 2 : 0);
		if (ctx_store(ctx, off, &port, 2))
			return -1;
		if (ctx_l4_csum_replace(ctx, l4_csum, old_port, port, 2 | mangled))
			return -1;
	}
	return 0;
}
