/* tc_lb.c: the tc programs (clsact, direct action).
 *   tc_egress  (uplink egress):  replies of local and DSR backends -> source VIP:port, and
 *                                their ICMP errors about the flow -> from / about VIP:port.
 *   tc_ingress (uplink ingress): on a backend's node, record the DSR option of a request. */
#include "kernel.h"
#include "consts.h"
#include "drop_reasons.h"
#include "structs.h"
#include "maps.h"
#include "csum.h"
#include "ctx_skb.h"
#include "parse.h"
#include "nat.h"
#include "revnat.h"

static __always_inline int tc_verdict(__u32 hook, int action)
{
	stat_inc(hook, action == TC_ACT_SHOT ? STAT_DROP : STAT_PASS);
	return action;
}

int tc_egress(struct __sk_buff *ctx)
{
	struct pkt p = {};
	int rc;

	if (parse_packet_pull(ctx, &p) != PARSE_OK) {
		stat_inc(HOOK_TC_EGRESS, STAT_UNPARSED);
		return tc_verdict(HOOK_TC_EGRESS, TC_ACT_OK);
	}
	if (p.proto == IPPROTO_ICMP || p.proto == IPPROTO_ICMPV6)
		rc = revnat_icmp_error(ctx, &p);
	else
		rc = revnat_reply(ctx, &p);
	if (rc < 0) {
		drop_inc(DROP_REWRITE);
		return tc_verdict(HOOK_TC_EGRESS, TC_ACT_SHOT);
	}
	stat_inc(HOOK_TC_EGRESS, rc ? STAT_REVNAT : STAT_NON_SERVICE);
	return tc_verdict(HOOK_TC_EGRESS, TC_ACT_OK);
}

int tc_ingress(struct __sk_buff *ctx)
{
	struct pkt p = {};

	if (parse_packet_pull(ctx, &p) != PARSE_OK) {
		stat_inc(HOOK_TC_INGRESS, STAT_UNPARSED);
		return tc_verdict(HOOK_TC_INGRESS, TC_ACT_OK);
	}
	stat_inc(HOOK_TC_INGRESS, dsr_record(ctx, &p) ? STAT_DSR_RECORD : STAT_NON_SERVICE);
	return tc_verdict(HOOK_TC_INGRESS, TC_ACT_OK);
}
