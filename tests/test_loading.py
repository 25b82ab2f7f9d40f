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
