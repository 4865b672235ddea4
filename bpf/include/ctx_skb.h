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
/* The whole packet's length (linear head + fragments; a GSO packet's whole super-packet). */
static __always_inline __u32 ctx_len(const struct __sk_buff *ctx) { return ctx->len; }
static __always_inline int ctx_has(const struct __sk_buff *ctx, __u32 n) { return n <= ctx->len; }

/* Make the first len bytes linear (and writable), so direct packet access sees the headers;
 * the payload stays in its fragments (Cilium: ctx_pull_data / revalidate_data_pull). Every
 * packet pointer must be reloaded afterwards. */
static __always_inline int ctx_pull(struct __sk_buff *ctx, __u32 len)
{
	return bpf_skb_pull_data(ctx, len);
}

static __always_inline int ctx_store(struct __sk_buff *ctx, __u32 off, const void *from, __u32 len)
{
	return bpf_skb_store_bytes(ctx, off, (void *)from, len, 0);
}
#define ctx_l3_csum_replace(ctx, off, from, to, size) bpf_l3_csum_replace(ctx, off, from, to, size)
#define ctx_l4_csum_replace(ctx, off, from, to, flags) bpf_l4_csum_replace(ctx, off, from, to, flags)
