/* icmp.h: ICMP/ICMPv6 errors about a service flow (placeholder filled in below). */
#pragma once
static __always_inline int icmp_error_to_local(struct xdp_md *ctx, struct pkt *p)
{
	return -1;
}
