/* ctx_skb.h: the context shim for tc (cls_bpf, direct-action). See ctx_xdp.h.
 * Stores and checksum updates go through the skb helpers, which also keep a
 * CHECKSUM_PARTIAL packet (locally generated, offloaded) correct. */
#pragma once
#define CTX struct __sk_buff
#define CTX_IS_SKB 1
#define CTX_OK TC_ACT_OK
#define CTX_DROP TC_ACT_SHOT

static __always_inline void *ctx_data(const struct __sk_buff *ctx) { return (void *)(long)ctx->data; }
static __always_inline void *ctx_data_end(const struct __sk_buff *ctx) { return (void *)(long)ctx->data_end; }
static __always_inline __u32 ctx_len(const struct __sk_buff *ctx) { return ctx->len; }

/* Make the headers linear so direct packet access sees them (GSO packets stay unlinearised). */
static __always_inline void ctx_pull(struct __sk_buff *ctx)
{
	__u32 linear = ctx->data_end - ctx->data;
	if (linear < 128 && ctx->len > linear)
		bpf_skb_pull_data(ctx, ctx->len < 128 ? ctx->len : 128);
}

static __always_inline int ctx_store(struct __sk_buff *ctx, __u32 off, const void *from, __u32 len)
{
	return bpf_skb_store_bytes(ctx, off, (void *)from, len, 0);
}
#define ctx_l3_csum_replace(ctx, off, from, to, size) bpf_l3_csum_replace(ctx, off, from, to, size)
#define ctx_l4_csum_replace(ctx, off, from, to, flags) bpf_l4_csum_replace(ctx, off, from, to, flags)
