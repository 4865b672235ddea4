/* jhash.h: Bob Jenkins' lookup3 final mix (as in the kernel's jhash_2words/jhash_3words).
 * agent/datapath/flowhash.py implements the same function; tests compare both. */
#pragma once

#define JHASH_INITVAL 0xdeadbeef

static __always_inline __u32 vipd_rol32(__u32 w, __u32 s) { return (w << s) | (w >> (32 - s)); }

static __always_inline __u32 jhash_nwords(__u32 a, __u32 b, __u32 c, __u32 initval)
{
	a += initval; b += initval; c += initval;
	c ^= b; c -= vipd_rol32(b, 14);
	a ^= c; a -= vipd_rol32(c, 11);
	b ^= a; b -= vipd_rol32(a, 25);
	c ^= b; c -= vipd_rol32(b, 16);
	a ^= c; a -= vipd_rol32(c, 4);
	b ^= a; b -= vipd_rol32(a, 14);
	c ^= b; c -= vipd_rol32(b, 24);
	return c;
}

static __always_inline __u32 jhash_3words(__u32 a, __u32 b, __u32 c, __u32 initval)
{
	return jhash_nwords(a, b, c, initval + JHASH_INITVAL + (3 << 2));
}

static __always_inline __u32 jhash_2words(__u32 a, __u32 b, __u32 initval)
{
	return jhash_nwords(a, b, 0, initval + JHASH_INITVAL + (2 << 2));
}
