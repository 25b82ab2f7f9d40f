"""The kernel loads the way users load it: kernels.get_local_kernel, LOCAL_KERNELS +
get_kernel(version=1), and an offline Hub cache built from exactly the tree we upload.
Each alternative route runs in a fresh interpreter (an ops namespace registers once)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kernel_loader
from conftest import CUDA_NOT_IMPLEMENTED, CUDA_NOT_IMPLEMENTED_MSG
from helpers import cu_seqlens, qkv

API = ["flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func",
       "flash_attn_varlen_func", "flash_attn_varlen_qkvpacked_func",
       "flash_attn_varlen_kvpacked_func", "flash_attn_with_kvcache"]
TESTS_DIR = Path(__file__).resolve().parent


@pytest.mark.fast
def test_flash_fixture_comes_from_a_build_variant_through_kernels(flash, ops):
    import kernels

    path = Path(flash.__file__).resolve()
    assert "torch-ext" not in path.parts, "the tests must not import the source tree"
    assert path.parent.name.startswith("torch-stable-abi210-")
    # the loader's own record (metadata.json as read at load time: a rebuild during the run
    # may rewrite the file on disk)
    loaded = [lk for lk in kernels.get_loaded_kernels() if lk.module is flash]
    assert len(loaded) == 1, "loaded through kernels"
    assert flash.__name__ == loaded[0].metadata.id, "kernels imports it under the ops name"
    assert loaded[0].metadata.name.python_name == "flash_attn"
    for name in API:
        assert callable(getattr(flash, name)), name
    for op in ("fwd", "varlen_fwd", "bwd", "varlen_bwd", "fwd_kvcache"):
        assert hasattr(ops, op), op


_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    import kernel_loader, reference
    route = {route!r}
    if route == "local-env":
        mod = kernel_loader.load_local_env()
    else:
        mod = kernel_loader.load_hub_cache({cache!r})
    q, k, v = (torch.randn(2, 37, 4, 64) for _ in range(3))
    out, lse, _ = mod.flash_attn_func(q, k[:, :, :2], v[:, :, :2], causal=True,
                                      return_attn_probs=True)
    ref, lse_ref, _ = reference.attention_ref(q, k[:, :, :2], v[:, :, :2], causal=True)
    err = (out.double() - ref).abs().max().item()
    assert err < 1e-5, err
    assert (lse.double() - lse_ref).abs().max().item() < 1e-5
    print("LOADED", mod.__file__)
""")


@pytest.mark.fast
@pytest.mark.parametrize("route", ["local-env", "hub-cache"])
def test_load_route_in_fresh_process(route, tmp_path):
    """LOCAL_KERNELS=<repo-id>=build/ and the offline cache
    $HF_HUB_CACHE/kernels--<org>--<repo>/{refs/v1, snapshots/<sha>/build/<variant>} both give
    a working kernel through kernels.get_kernel(<repo-id>, version=1)."""
    try:
        kernel_loader.require_build()
    except kernel_loader.BuildMissing as e:
        pytest.fail(str(e), pytrace=False)
    script = _SCRIPT.format(tests=str(TESTS_DIR), route=route, cache=str(tmp_path / "hub"))
    env = {k: v for k, v in os.environ.items()
           if k not in ("LOCAL_KERNELS", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "KERNELS_CACHE")}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    loaded = res.stdout.split("LOADED", 1)[1].strip()
    if route == "hub-cache":
        assert str(tmp_path / "hub") in loaded and "snapshots" in loaded
    else:
        assert str(kernel_loader.BUILD_DIR) in loaded


@pytest.mark.fast
def test_missing_build_fails_with_the_build_command(tmp_path):
    with pytest.raises(kernel_loader.BuildMissing, match="tools/build_local.py --variant cpu"):
        kernel_loader.require_build(tmp_path / "build")


# ---------------------------------------------------------------------------------------------
# CUDA ops that have not landed yet: a clear error, never a crash. Flip by removing the op
# from conftest.CUDA_NOT_IMPLEMENTED when its kernel lands.


def _call_on_cuda(flash, op):
    dev = "cuda"
    if op == "bwd":
        q, k, v = qkv(1, 8, 8, 2, 2, 64, dtype=torch.float16, device=dev, requires_grad=True)
        flash.flash_attn_func(q, k, v).sum().backward()
    elif op == "varlen_bwd":
        cu = cu_seqlens([3, 5], dev)
        q, k, v = (torch.randn(8, 2, 64, device=dev, dtype=torch.float16, requires_grad=True)
                   for _ in range(3))
        flash.flash_attn_varlen_func(q, k, v, cu, cu, 5, 5).sum().backward()
    elif op == "fwd_kvcache":
        q = torch.randn(1, 1, 2, 64, device=dev, dtype=torch.float16)
        kc = torch.randn(1, 8, 2, 64, device=dev, dtype=torch.float16)
        flash.flash_attn_with_kvcache(q, kc, kc.clone())
    elif op == "rotary":
        x = torch.randn(1, 4, 2, 16, device=dev, dtype=torch.float16)
        cos = torch.ones(8, 4, device=dev, dtype=torch.float16)
        flash.layers.rotary.apply_rotary_emb(x, cos, torch.zeros_like(cos))
    else:
        raise AssertionError(op)
    torch.cuda.synchronize()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("op", sorted(CUDA_NOT_IMPLEMENTED))
def test_cuda_unimplemented_op_raises_clear_error(flash, op):
    with pytest.raises(RuntimeError, match=CUDA_NOT_IMPLEMENTED_MSG):
        _call_on_cuda(flash, op)
