/* xdp_floor.c: benchmark floors. xdp_pass returns XDP_PASS; xdp_parse runs the datapath's
 * own parser (parse.h) and returns a verdict that depends on it, so it is not optimised out. */
#include "kernel.h"
#include "consts.h"
/* parse.h's ct_key_set needs struct ct_key */
#include "structs.h"
#include "csum.h"
#include "ctx_xdp.h"
#include "parse.h"

int xdp_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

int xdp_parse(struct xdp_md *ctx)
{
	struct pkt p = {};

	if (parse_packet(ctx, &p) != PARSE_OK)
		return XDP_PASS;
	return p.proto == 255 && p.dport == 0xffff ? XDP_DROP : XDP_PASS;
}
