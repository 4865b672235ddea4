/* csum.h: RFC 1071 / RFC 1624 ones'-complement arithmetic for incremental checksum updates.
 * Sums are taken over raw (network-order) 16/32-bit words: ones'-complement addition is
 * byte-order independent, so no swapping is needed. */
#pragma once

static __always_inline __u16 csum_fold64(__u64 s)
{
	s = (s & 0xffffffff) + (s >> 32);
	s = (s & 0xffffffff) + (s >> 32);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)s;
}

/* RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'); diff already holds ~m + m'. */
static __always_inline void csum_apply(__sum16 *sum, __u64 diff, int mangled_0)
{
	__u64 s = (__u16)~*sum;
	__u16 r;

	s += diff;
	r = ~csum_fold64(s);
	if (mangled_0 && r == 0)
		r = 0xffff;  /* UDP: 0 means "no checksum", send the other zero */
	*sum = r;
}

/* ~old + new over four 32-bit words (an IPv6 address), folded to 32 bits: a diff usable
 * with ctx_l4_csum_replace(..., 0, diff, BPF_F_PSEUDO_HDR). */
static __always_inline __u32 csum_diff_addr6(const __u32 *old, const __u32 *new)
{
	__u64 s = 0;
	s += (__u32)~old[0]; s += (__u32)~old[1]; s += (__u32)~old[2]; s += (__u32)~old[3];
	s += new[0]; s += new[1]; s += new[2]; s += new[3];
	s = (s & 0xffffffff) + (s >> 32);
	s = (s & 0xffffffff) + (s >> 32);
	return (__u32)s;
}

/* Full IPv4 header checksum over n32 32-bit words (5..15), field must be zero on entry. */
static __always_inline __u16 csum_ipv4_hdr(const __u32 *w, int n32)
{
	__u64 s = 0;
#pragma unroll
	for (int i = 0; i < 15; i++) {
		if (i < n32)
			s += w[i];
	}
	return ~csum_fold64(s);
}
