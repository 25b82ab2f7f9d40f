"""Bad input gets a clear Python exception (RuntimeError or ValueError) whose message names the
offending argument: never a crash, a hang or a silent wrong answer (issue 2, item 8)."""
import pytest
import torch

from conftest import device_params
from helpers import cu_seqlens, names, qkv, randn


def raises_naming(fn, *args_named):
    """fn() must raise RuntimeError/ValueError naming one of args_named (whole word)."""
    with pytest.raises((RuntimeError, ValueError)) as info:
        fn()
    msg = str(info.value)
    assert any(names(a).search(msg) for a in args_named), (
        f"message does not name {' or '.join(args_named)}: {msg!r}")


def host_only(device):
    """Index tensor contents are checked only on the host: the op never syncs a CUDA device
    (docs/design.md), so these checks cannot run on CUDA tensors."""
    if device == "cuda":
        pytest.skip("index contents are checked only for host tensors (docs/design.md)")


def _qkv(device, dtype=None, **kw):
    dtype = dtype or (torch.float32 if device == "cpu" else torch.float16)
    shape = dict(b=2, sq=9, sk=11, h=4, hk=2, d=32)
    shape.update(kw)
    return qkv(shape["b"], shape["sq"], shape["sk"], shape["h"], shape["hk"], shape["d"],
               dtype=dtype, device=device)


def _varlen(device, lens_q=(3, 0, 5), lens_k=(4, 2, 6), dtype=None):
    dtype = dtype or (torch.float32 if device == "cpu" else torch.float16)
    q = randn(sum(lens_q), 2, 32, dtype=dtype, device=device)
    k = randn(sum(lens_k), 2, 32, dtype=dtype, device=device)
    v = randn(sum(lens_k), 2, 32, dtype=dtype, device=device)
    return q, k, v, cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)


# ---------------------------------------------------------------------------------------------
# Devices, dtypes, shapes


@pytest.mark.fast
def test_bad_mismatched_devices_cpu_and_meta(flash):
    q, k, v = _qkv("cpu")
    raises_naming(lambda: flash.flash_attn_func(q, k.to("meta"), v), "k")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bad_mismatched_devices_cuda_and_cpu(flash):
    q, k, v = _qkv("cuda")
    raises_naming(lambda: flash.flash_attn_func(q, k, v.cpu()), "v")


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
def test_bad_mismatched_dtypes(flash, device):
    q, k, v = _qkv(device, dtype=torch.float16)
    raises_naming(lambda: flash.flash_attn_func(q, k.to(torch.bfloat16), v), "k")


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
def test_bad_unsupported_dtype_int32(flash, device):
    q, k, v = (torch.ones(1, 4, 2, 32, dtype=torch.int32, device=device) for _ in range(3))
    raises_naming(lambda: flash.flash_attn_func(q, k, v), "q")


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("d", [0, 264])
def test_bad_head_dim_zero_or_above_256(flash, device, d):
    """Regression (d = 0): the default softmax_scale 1/sqrt(d) raised ZeroDivisionError before
    the head-dim check ran (fixed in ef5425a)."""
    q, k, v = _qkv(device, d=d)
    raises_naming(lambda: flash.flash_attn_func(q, k, v), "q", "head_dim", "head dim",
                  "headdim")


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
def test_bad_head_dim_differs_between_q_and_k(flash, device):
    q, _, _ = _qkv(device, d=64)
    _, k, v = _qkv(device, d=32)
    raises_naming(lambda: flash.flash_attn_func(q, k, v), "k")


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
def test_bad_nheads_not_divisible_by_nheads_k(flash, device):
    q, k, v = _qkv(device, h=4, hk=3)
    raises_naming(lambda: flash.flash_attn_func(q, k, v), "nheads_k", "k")


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
def test_bad_last_dim_not_contiguous_at_the_op(ops, device):
    """The Python API copies such inputs like FA2; the op itself must refuse them."""
    q, k, v = _qkv(device)
    q_t = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    raises_naming(lambda: ops.fwd(q_t, k, v, None, 0.0, 0.2, False, -1, -1, 0.0, False, None),
                  "q")


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
def test_bad_wrong_rank(flash, device):
    q, k, v = _qkv(device)
    raises_naming(lambda: flash.flash_attn_func(q[0], k, v), "q")


# ---------------------------------------------------------------------------------------------
# Varlen


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
def test_bad_cu_seqlens_not_int32(flash, device):
    q, k, v, cu_q, cu_k = _varlen(device)
    raises_naming(lambda: flash.flash_attn_varlen_func(q, k, v, cu_q.long(), cu_k, 5, 6),
                  "cu_seqlens_q")


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
def test_bad_cu_seqlens_wrong_length(flash, device):
    q, k, v, cu_q, cu_k = _varlen(device)
    cu_k = torch.cat([cu_k, cu_k[-1:]])  # batch + 2 entries
    raises_naming(lambda: flash.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 6),
                  "cu_seqlens_k")


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
def test_bad_cu_seqlens_decreasing(flash, device):
    host_only(device)
    q, k, v, _, cu_k = _varlen(device)
    cu_q = torch.tensor([0, 6, 3, 8], dtype=torch.int32, device=device)
    raises_naming(lambda: flash.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 6, 6),
                  "cu_seqlens_q")


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
def test_bad_cu_seqlens_inconsistent_with_token_count(flash, device):
    host_only(device)
    q, k, v, cu_q, _ = _varlen(device)
    cu_k = torch.tensor([0, 4, 6, 40], dtype=torch.int32, device=device)  # k has 12 rows
    raises_naming(lambda: flash.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 34),
                  "cu_seqlens_k")


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
def test_bad_max_seqlen_smaller_than_a_sequence(flash, device):
    host_only(device)
    q, k, v, cu_q, cu_k = _varlen(device)
    raises_naming(lambda: flash.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 2, 6),
                  "max_seqlen_q")


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
def test_bad_seqused_k_wrong_length(flash, device):
    q, k, v, cu_q, cu_k = _varlen(device)
    used = torch.tensor([1, 1], dtype=torch.int32, device=device)
    raises_naming(lambda: flash.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 6,
                                                       seqused_k=used), "seqused_k")


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
def test_bad_block_table_out_of_range(flash, device):
    host_only(device)
    q, _, _, cu_q, cu_k = _varlen(device)
    pool = randn(4, 3, 2, 32, dtype=q.dtype, device=device)
    table = torch.tensor([[0, 1], [2, 3], [3, 4]], dtype=torch.int32, device=device)  # 4 >= 4
    raises_naming(lambda: flash.flash_attn_varlen_func(q, pool, pool, cu_q, cu_k, 5, 6,
                                                       block_table=table), "block_table")


# ---------------------------------------------------------------------------------------------
# Score modifiers


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
def test_bad_window_below_minus_one(flash, device):
    q, k, v = _qkv(device)
    raises_naming(lambda: flash.flash_attn_func(q, k, v, window_size=(-2, 0)),
                  "window_size", "window_size_left")


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("window", [128, (None, 0), (0, None), (64,), (1, 2, 3), (1.5, 0)],
                         ids=["int", "none-left", "none-right", "one", "three", "float"])
def test_bad_window_not_a_pair_of_ints(flash, device, window):
    """Regression: window_size=128 raised "TypeError: object of type 'int' has no len()" and
    (None, 0) a TypeError from int(); both must be a flash_attn: error naming window_size."""
    q, k, v = _qkv(device)
    with pytest.raises(RuntimeError, match=r"^flash_attn: window_size") as info:
        flash.flash_attn_func(q, k, v, window_size=window)
    if window == 128:
        assert "(left, right)" in str(info.value)


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
def test_bad_negative_softcap(flash, device):
    q, k, v = _qkv(device)
    raises_naming(lambda: flash.flash_attn_func(q, k, v, softcap=-1.0), "softcap")


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_bad_dropout_outside_0_1(flash, device, p):
    q, k, v = _qkv(device)
    raises_naming(lambda: flash.flash_attn_func(q, k, v, dropout_p=p), "dropout_p")


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("bad", ["shape", "batch_shape", "dtype"])
def test_bad_alibi_slopes(flash, device, bad):
    q, k, v = _qkv(device)  # batch 2, 4 heads
    slopes = {"shape": torch.rand(5, device=device),
              "batch_shape": torch.rand(3, 4, device=device),
              "dtype": torch.rand(4, device=device, dtype=torch.float16)}[bad]
    raises_naming(lambda: flash.flash_attn_func(q, k, v, alibi_slopes=slopes), "alibi_slopes")


# ---------------------------------------------------------------------------------------------
# KV cache


def _cache(device, *, cache_len=16, n_new=2, hk=2, d=32):
    dtype = torch.float32 if device == "cpu" else torch.float16
    q = randn(2, n_new, 4, d, dtype=dtype, device=device)
    kc = randn(2, cache_len, hk, d, dtype=dtype, device=device)
    vc = randn(2, cache_len, hk, d, dtype=dtype, device=device)
    k = randn(2, n_new, hk, d, dtype=dtype, device=device)
    v = randn(2, n_new, hk, d, dtype=dtype, device=device)
    return q, kc, vc, k, v


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
def test_bad_cache_too_small_for_the_append(flash, device):
    host_only(device)
    q, kc, vc, k, v = _cache(device)
    lens = torch.tensor([3, 15], dtype=torch.int32, device=device)  # 15 + 2 > 16
    raises_naming(lambda: flash.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens),
                  "cache_seqlens", "k_cache")


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
def test_bad_kvcache_block_table_out_of_range(flash, device):
    host_only(device)
    q, _, _, k, v = _cache(device)
    pool = randn(6, 5, 2, 32, dtype=q.dtype, device=device)
    # sequence 1 holds 4 + 2 keys: it reads table entries 0 and 1, and entry 1 is out of range
    table = torch.tensor([[0, 1, 2, 3], [4, 6, 5, 0]], dtype=torch.int32, device=device)
    lens = torch.tensor([3, 4], dtype=torch.int32, device=device)
    raises_naming(lambda: flash.flash_attn_with_kvcache(q, pool, pool.clone(), k, v,
                                                        cache_seqlens=lens, block_table=table),
                  "block_table")


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
def test_bad_cache_batch_idx_out_of_range(flash, device):
    host_only(device)
    q, kc, vc, k, v = _cache(device)
    idx = torch.tensor([1, 2], dtype=torch.int32, device=device)
    lens = torch.tensor([3, 4], dtype=torch.int32, device=device)
    raises_naming(lambda: flash.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens,
                                                        cache_batch_idx=idx), "cache_batch_idx")


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("bad", ["too_short", "rotary_dim_over_d", "cos_sin_differ"])
def test_bad_rotary_tables_that_do_not_fit(flash, device, bad):
    q, kc, vc, k, v = _cache(device)
    lens = torch.tensor([3, 10], dtype=torch.int32, device=device)
    rows, half = {"too_short": (8, 8), "rotary_dim_over_d": (16, 20),
                  "cos_sin_differ": (16, 8)}[bad]
    cos = torch.rand(rows, half, device=device).to(q.dtype)
    sin = cos.clone() if bad != "cos_sin_differ" else cos[:, :4].clone()
    if bad == "too_short" and device == "cuda":
        # Whether the tables are long enough depends on cache_seqlens, which CUDA never reads on
        # the host: positions past the tables are left unrotated instead (docs/design.md).
        flash.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, rotary_cos=cos,
                                      rotary_sin=sin)
        assert torch.equal(kc[1, 10:12], k[1]), "keys past the tables must stay unrotated"
        return
    raises_naming(lambda: flash.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens,
                                                        rotary_cos=cos, rotary_sin=sin),
                  "rotary_cos", "rotary_sin")
