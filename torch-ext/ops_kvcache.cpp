// Owns: the decode op `fwd_kvcache` (flash_attn_with_kvcache): argument checks, then three backend
// steps in order: append the new k/v to the cache in place (rotating k when rotary tables are
// given), rotate q out of place, and attend over the updated cache.
//
// CPU tensors: the index tensors' contents are checked on the host (clear errors). CUDA tensors:
// their contents are never read on the host, so a decode step has no synchronisation and can be
// captured in a CUDA graph; the kernels make bad contents harmless instead (params.h: appends
// outside the cache are dropped, a bad page id or cache_batch_idx gives no keys, positions past
// the rotary tables stay unrotated), and the key counts after the append are written on the
// device by the append kernel.
#include <algorithm>
#include <vector>

#include "ops_common.h"
#include "torch_binding.h"

FLASH_NAMESPACE_BEGIN

using namespace binding;

namespace {

// Host-side checks of the index tensors' contents; returns the per-sequence key count after the
// append (cache_seqlens[b] + seqlen_new, or the whole cache when cache_seqlens is absent).
std::vector<int> check_cache_contents(const OptTensor& seqlens, const OptTensor& batch_idx,
                                      const OptTensor& leftpad, const OptTensor& table,
                                      int64_t batch, int64_t seqlen_new, int64_t capacity,
                                      int64_t cache_rows, int64_t page_size, int64_t num_blocks) {
  std::vector<int> len_k(batch);
  const int32_t* cs = seqlens ? seqlens->const_data_ptr<int32_t>() : nullptr;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t have = cs ? cs[b] : capacity - seqlen_new;
    FLASH_CHECK(have >= 0, "cache_seqlens[", b, "] = ", have, " is negative");
    FLASH_CHECK(have + seqlen_new <= capacity, "the KV cache is too small: sequence ", b,
                " holds ", have, " keys and appends ", seqlen_new, ", but k_cache has room for ",
                capacity, table ? " (pages per sequence x page_block_size)" : " (seqlen_cache)");
    len_k[b] = static_cast<int>(have + seqlen_new);
  }
  if (batch_idx) {
    const int32_t* idx = batch_idx->const_data_ptr<int32_t>();
    for (int64_t b = 0; b < batch; ++b) {
      FLASH_CHECK(idx[b] >= 0 && idx[b] < cache_rows, "cache_batch_idx[", b, "] = ", idx[b],
                  " is out of range; k_cache has ", cache_rows, " rows");
    }
  }
  if (leftpad) {
    const int32_t* lp = leftpad->const_data_ptr<int32_t>();
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t have = cs ? cs[b] : capacity;
      FLASH_CHECK(lp[b] >= 0 && lp[b] <= have, "cache_leftpad[", b, "] = ", lp[b],
                  " must be in [0, cache_seqlens[", b, "] = ", have, "]");
    }
  }
  if (table) check_block_table_host(*table, len_k, page_size, num_blocks);
  return len_k;
}

}  // namespace

std::tuple<Tensor, Tensor> mha_fwd_kvcache(
    const Tensor& q, Tensor k_cache, Tensor v_cache, const OptTensor& k, const OptTensor& v,
    const OptTensor& cache_seqlens, const OptTensor& rotary_cos, const OptTensor& rotary_sin,
    const OptTensor& cache_batch_idx, const OptTensor& cache_leftpad,
    const OptTensor& block_table, const OptTensor& alibi_slopes, double softmax_scale,
    bool is_causal, int64_t window_size_left, int64_t window_size_right, double softcap,
    bool rotary_interleaved, int64_t num_splits) {
  const bool on_host = q.is_cpu();
  const bool paged = block_table.has_value();
  const char* cache_layout = paged ? "(num_blocks, page_block_size, nheads_k, head_dim) since "
                                     "block_table is given"
                                   : "(batch_cache, seqlen_cache, nheads_k, head_dim)";

  // Tensor checks: q and the cache.
  check_rank(q, "q", 4, "(batch, seqlen_q, nheads, head_dim)");
  check_rank(k_cache, "k_cache", 4, cache_layout);
  check_rank(v_cache, "v_cache", 4, cache_layout);
  const DType dtype = check_kv_like_q(q, k_cache, "k_cache", v_cache, "v_cache");
  const int64_t batch = q.size(0), seqlen_q = q.size(1), nheads = q.size(2);
  const int64_t nheads_k = k_cache.size(2);
  const int head_dim = check_head_dim(q);
  check_k_head_dim(k_cache, "k_cache", head_dim);
  check_shape(v_cache, "v_cache",
              {k_cache.size(0), k_cache.size(1), k_cache.size(2), k_cache.size(3)},
              "matching k_cache");
  check_nheads(nheads, nheads_k);
  // The cache is updated in place, so a contiguous copy would not do.
  check_qkv_last_dim_contiguous(q, k_cache, "k_cache", v_cache, "v_cache");

  // The new keys/values.
  FLASH_CHECK(k.has_value() == v.has_value(), "k and v must be given together (both or neither)");
  int64_t seqlen_new = 0;
  if (k) {
    check_rank(*k, "k", 4, "(batch, seqlen_new, nheads_k, head_dim)");
    seqlen_new = k->size(1);
    for (const auto& [t, name] : {std::pair{&*k, "k"}, std::pair{&*v, "v"}}) {
      check_device(*t, name, q);
      check_same_dtype(*t, name, q);
      check_shape(*t, name, {batch, seqlen_new, nheads_k, head_dim},
                  "(batch, seqlen_new, nheads_k, head_dim) matching q and k_cache");
      check_last_dim_contiguous(*t, name);
    }
    FLASH_CHECK(cache_seqlens.has_value(),
                "cache_seqlens is required when k and v are given: it says where to append them");
  }

  // Index tensors.
  OptTensor seqlens, batch_idx, leftpad, table;
  if (cache_seqlens) seqlens = check_index_vector(*cache_seqlens, "cache_seqlens", batch, q, "(batch,)");
  if (cache_batch_idx) {
    FLASH_CHECK(!paged, "cache_batch_idx cannot be combined with block_table (a paged cache is "
                        "indexed through block_table)");
    batch_idx = check_index_vector(*cache_batch_idx, "cache_batch_idx", batch, q, "(batch,)");
  } else if (!paged) {
    FLASH_CHECK(k_cache.size(0) >= batch, "k_cache has ", k_cache.size(0),
                " rows but q has batch ", batch, "; pass cache_batch_idx to map sequences to rows");
  }
  if (cache_leftpad) leftpad = check_index_vector(*cache_leftpad, "cache_leftpad", batch, q, "(batch,)");
  int64_t page_size = 0, num_blocks = 0, capacity = k_cache.size(1);
  if (paged) {
    PagedKv pk = check_paged_kv(*block_table, k_cache, "k_cache", batch, q);
    table = pk.table;
    num_blocks = pk.num_blocks;
    page_size = pk.page_size;
    capacity = table->size(1) * page_size;
  }

  // Rotary tables: (seqlen_ro, rotary_dim / 2) each, q's dtype.
  FLASH_CHECK(rotary_cos.has_value() == rotary_sin.has_value(),
              "rotary_cos and rotary_sin must be given together (both or neither)");
  OptTensor cos, sin;
  int rotary_dim = 0;
  if (rotary_cos) {
    // Wider than FlashAttention-2, which also demands k/v: without them only q is rotated.
    FLASH_CHECK(seqlens.has_value(), "rotary_cos/rotary_sin need cache_seqlens: it gives the "
                                     "rotary positions of the queries and new keys");
    check_rank(*rotary_cos, "rotary_cos", 2, "(seqlen_ro, rotary_dim / 2)");
    for (const auto& [t, name] : {std::pair{&*rotary_cos, "rotary_cos"},
                                  std::pair{&*rotary_sin, "rotary_sin"}}) {
      check_device(*t, name, q);
      check_same_dtype(*t, name, q);
    }
    check_shape(*rotary_sin, "rotary_sin", {rotary_cos->size(0), rotary_cos->size(1)},
                "matching rotary_cos");
    const int64_t rd = 2 * rotary_cos->size(1);
    FLASH_CHECK(rd >= 2 && rd <= head_dim, "rotary_cos has ", rotary_cos->size(1),
                " columns, so rotary_dim = ", rd, ", which must be in [2, head_dim = ", head_dim,
                "]");
    rotary_dim = static_cast<int>(rd);
    cos = torch::stable::contiguous(*rotary_cos);
    sin = torch::stable::contiguous(*rotary_sin);
  }

  // Scalars.
  check_scalars(0.0, softmax_scale, softcap, window_size_left, window_size_right);
  FLASH_CHECK(num_splits >= 0, "num_splits must be >= 0 (0: the backend chooses), got ",
              num_splits);
  const Window window = normalize_window(window_size_left, window_size_right, is_causal, capacity);
  // FA2: queries take consecutive rotary positions only when the attention is causal or local.
  const bool positions_per_row = window.left >= 0 || window.right >= 0;

  // Index tensors' contents, on the host only (see the top of the file).
  std::vector<int> len_k;
  if (on_host) {
    len_k = check_cache_contents(seqlens, batch_idx, leftpad, table, batch, seqlen_new, capacity,
                                 k_cache.size(0), page_size, num_blocks);
  }
  if (cos && on_host) {
    const int32_t* cs = seqlens->const_data_ptr<int32_t>();
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t q_rows = positions_per_row ? cs[b] + seqlen_q : cs[b] + 1;
      const int64_t k_rows = seqlen_new > 0 ? cs[b] + seqlen_new : 0;
      const int64_t need = std::max<int64_t>(k_rows, seqlen_q > 0 ? q_rows : 0);
      FLASH_CHECK(cos->size(0) >= need, "rotary_cos has ", cos->size(0),
                  " rows, but sequence ", b, " needs rotary positions up to ", need - 1);
    }
  }
  // Keys per sequence after the append, as the backend's seqused_k: on the host from len_k;
  // on CUDA cache_seqlens itself without new keys, else written by the append kernel.
  OptTensor used;
  if (seqlens) {
    const bool appends = k && seqlen_new > 0 && batch > 0;
    if (on_host) {
      used = alloc(q, {batch}, ScalarType::Int);
      int32_t* u = used->mutable_data_ptr<int32_t>();
      for (int64_t b = 0; b < batch; ++b) u[b] = len_k[b];
    } else {
      used = appends ? alloc(q, {batch}, ScalarType::Int) : *seqlens;
    }
  }

  // 1. Append k/v (rotating k) in place.
  if (k && seqlen_new > 0 && batch > 0) {
    KvAppendParams a;
    a.dtype = dtype;
    a.batch = to_int(batch, "batch");
    a.nheads_k = to_int(nheads_k, "nheads_k");
    a.head_dim = head_dim;
    a.seqlen_new = to_int(seqlen_new, "seqlen_new");
    a.k_new_ptr = k->const_data_ptr();
    a.v_new_ptr = v->const_data_ptr();
    a.knew_batch_stride = k->stride(0);
    a.knew_row_stride = k->stride(1);
    a.knew_head_stride = k->stride(2);
    a.vnew_batch_stride = v->stride(0);
    a.vnew_row_stride = v->stride(1);
    a.vnew_head_stride = v->stride(2);
    a.k_cache_ptr = k_cache.mutable_data_ptr();
    a.v_cache_ptr = v_cache.mutable_data_ptr();
    a.k_batch_stride = k_cache.stride(0);
    a.k_row_stride = k_cache.stride(1);
    a.k_head_stride = k_cache.stride(2);
    a.v_batch_stride = v_cache.stride(0);
    a.v_row_stride = v_cache.stride(1);
    a.v_head_stride = v_cache.stride(2);
    a.cache_seqlens = seqlens->const_data_ptr<int32_t>();
    a.cache_batch_idx = batch_idx ? batch_idx->const_data_ptr<int32_t>() : nullptr;
    if (paged) set_block_table(a, *table, page_size);
    if (cos) {
      a.rotary_cos_ptr = cos->const_data_ptr();
      a.rotary_sin_ptr = sin->const_data_ptr();
      a.rotary_dim = rotary_dim;
      a.rotary_seqlen = to_int(cos->size(0), "seqlen_ro");
      a.rotary_interleaved = rotary_interleaved;
    }
    a.capacity = capacity;
    a.kv_num_rows = paged ? num_blocks : k_cache.size(0);
    if (on_host) {
      run_kv_append_cpu(a);
    } else {
      a.seqused_out = used->mutable_data_ptr<int32_t>();
      FLASH_RUN_CUDA(run_kv_append_cuda, a, q);
    }
  }

  // 2. Rotate q out of place (q itself is never modified).
  Tensor q_attn = q;
  if (cos && q.numel() > 0) {
    q_attn = alloc(q, {batch, seqlen_q, nheads, head_dim}, q.scalar_type());
    RotaryQParams r;
    r.dtype = dtype;
    r.batch = to_int(batch, "batch");
    r.seqlen_q = to_int(seqlen_q, "seqlen_q");
    r.nheads = to_int(nheads, "nheads");
    r.head_dim = head_dim;
    r.q_ptr = q.const_data_ptr();
    r.q_batch_stride = q.stride(0);
    r.q_row_stride = q.stride(1);
    r.q_head_stride = q.stride(2);
    r.q_out_ptr = q_attn.mutable_data_ptr();
    r.cache_seqlens = seqlens->const_data_ptr<int32_t>();
    r.rotary_cos_ptr = cos->const_data_ptr();
    r.rotary_sin_ptr = sin->const_data_ptr();
    r.rotary_dim = rotary_dim;
    r.rotary_seqlen = to_int(cos->size(0), "seqlen_ro");
    r.rotary_interleaved = rotary_interleaved;
    r.positions_per_row = positions_per_row;
    if (on_host) {
      run_rotary_q_cpu(r);
    } else {
      FLASH_RUN_CUDA(run_rotary_q_cuda, r, q);
    }
  }

  // 3. Attend over the updated cache.
  Tensor out = alloc(q, {batch, seqlen_q, nheads, head_dim}, q.scalar_type());
  Tensor lse = alloc(q, {batch, nheads, seqlen_q}, ScalarType::Float);
  FwdParams p;
  p.dtype = dtype;
  set_qkv(p, q_attn, k_cache, v_cache);
  set_fwd_outputs(p, out, lse);
  set_sizes(p, batch, nheads, nheads_k, head_dim, seqlen_q, "seqlen_q", capacity, "seqlen_cache");
  p.seqused_k = used ? used->const_data_ptr<int32_t>() : nullptr;
  p.leftpad_k = leftpad ? leftpad->const_data_ptr<int32_t>() : nullptr;
  p.cache_batch_idx = batch_idx ? batch_idx->const_data_ptr<int32_t>() : nullptr;
  if (paged) set_block_table(p, *table, page_size);
  p.kv_num_blocks = paged ? num_blocks : k_cache.size(0);  // bounds page ids / cache_batch_idx
  set_score_params(p, softmax_scale, softcap, window, Dropout{});
  set_alibi(p, alibi_slopes, q, batch, nheads);
  p.num_splits = to_int(num_splits, "num_splits");

  if (out.numel() == 0) return {out, lse};
  if (k_cache.numel() == 0) {
    fill_no_keys(out, lse);
  } else {
    run_fwd_kvcache(p, q);
  }
  return {out, lse};
}

FLASH_NAMESPACE_END
