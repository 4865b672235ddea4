/* xdp_lb.c: the XDP program on the node's uplink(s): services, SNAT replies, ICMP errors,
 * fragment policy. Everything else passes untouched. */
#include "kernel.h"
#include "consts.h"
#include "drop_reasons.h"
#include "structs.h"
#include "maps.h"
#include "csum.h"
#include "ctx_xdp.h"
#include "jhash.h"
#include "parse.h"
#include "nat.h"
#include "revnat.h"
#include "lb.h"
#include "icmp.h"

/* Fragments carry no (trustworthy) ports: one addressed to a VIP is dropped with a reason,
 * never guessed onto a backend; any other fragment passes untouched. */
static __always_inline int handle_fragment(struct xdp_md *ctx, const struct pkt *p)
{
	struct svc_key k = {};

	stat_inc(HOOK_XDP, STAT_FRAGMENT);
	addr_copy(k.addr, p->daddr);
	k.family = p->family;
	if (services_v2.lookup(&k))
		return drop(DROP_FRAGMENT);
	return verdict(HOOK_XDP, XDP_PASS);
}

/* v, as the verifier sees a value loaded from a map: an unknown scalar (no constant, no range) */
static __always_inline __u32 launder(struct scratch *scr, __u32 v)
{
	*(volatile __u32 *)&scr->opaque = v;
	return *(volatile __u32 *)&scr->opaque;
}

#define MAX_L4_OFF 0x3fff   /* larger offsets: not a frame XDP sees linearly; passed untouched */

int xdp_lb(struct xdp_md *ctx)
{
	struct pkt p = {};
	int rc;

	if (parse_packet(ctx, &p) != PARSE_OK) {
		stat_inc(HOOK_XDP, STAT_UNPARSED);
		return verdict(HOOK_XDP, XDP_PASS);
	}
	if (p.frag)
		return handle_fragment(ctx, &p);
	/* The verifier would walk everything below once per parser outcome: l3_off is a known
	 * constant per VLAN depth (14/18/22), and l4_off / l3_end take a different range for
	 * each number of IPv6 extension headers (0..4; each variant cost ~200k processed insns).
	 * Read back through memory they are bounded unknowns, so every outcome of the parser is
	 * one verifier state below (docs/datapath.md, "Verifier budget"). */
	__u32 zero = 0;
	struct scratch *scr = scratch_v1.lookup(&zero);
	if (!scr)
		return verdict(HOOK_XDP, XDP_PASS);
	__u32 l3 = launder(scr, p.l3_off), l4 = launder(scr, p.l4_off), end = launder(scr, p.l3_end);
	if (l3 > 22 || l4 > MAX_L4_OFF || end > MAX_L4_OFF)
		return verdict(HOOK_XDP, XDP_PASS);
	p.l3_off = l3;
	p.l4_off = l4;
	p.l3_end = end;
	if (p.proto == IPPROTO_TCP || p.proto == IPPROTO_UDP) {
		struct svc_key k = {};
		addr_copy(k.addr, p.daddr);
		k.port = p.dport;
		k.proto = p.proto;
		k.family = p.family;
		struct svc_val *svc = services_v2.lookup(&k);
		if (svc)
			return lb_handle(ctx, &p, svc, scr);
		rc = snat_reply(ctx, &p);
		if (rc >= 0)
			return rc;
	} else if (p.proto == IPPROTO_ICMP || p.proto == IPPROTO_ICMPV6) {
		rc = icmp_error_to_flow(ctx, &p);
		if (rc >= 0)
			return rc;
	}
	stat_inc(HOOK_XDP, STAT_NON_SERVICE);
	return verdict(HOOK_XDP, XDP_PASS);
}

/* Not attached: the loader runs it twice under BPF_PROG_TEST_RUN to measure the kernel's HZ
 * (the return value is the low 32 bits of jiffies), so the next-hop cache's lifetime can be
 * given in jiffies (bpf_jiffies64 is ~35 ns cheaper per packet than the coarse clock). */
int clock_probe(struct xdp_md *ctx)
{
	return (__u32)bpf_jiffies64();
}
