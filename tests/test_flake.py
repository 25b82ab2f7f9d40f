"""flake.nix follows the current kernel-builder: genKernelFlakeOutputs { inherit self; path = ./.; }.

Nix cannot build here (no network to its caches), so the flake is checked the way Nix itself reads
it: `nix-instantiate --parse`, then an evaluation of `outputs` against a stand-in for the
kernel-builder input whose genKernelFlakeOutputs returns its argument. .ci/run installs Debian's
nix-bin; a missing nix-instantiate is a failure, not a skip.
"""
import json
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FLAKE = REPO / "flake.nix"

pytestmark = pytest.mark.fast


@pytest.fixture(scope="module")
def nix_instantiate():
    exe = shutil.which("nix-instantiate")
    if exe is None:
        pytest.fail("nix-instantiate not found: `apt-get install -y nix-bin` (.ci/run does)",
                    pytrace=False)
    return exe


def nix_eval(exe, expr):
    out = subprocess.run([exe, "--eval", "--strict", "--json", "-E", expr], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_flake_parses(nix_instantiate):
    out = subprocess.run([nix_instantiate, "--parse", str(FLAKE)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_flake_input_is_the_kernels_monorepo(nix_instantiate):
    url = nix_eval(nix_instantiate, "(import ./flake.nix).inputs.kernel-builder.url")
    # kernel-builder now lives in the huggingface/kernels monorepo; the old
    # huggingface/kernel-builder repository is outdated.
    assert url == "github:huggingface/kernels"


def test_outputs_pass_self_and_repo_path_to_genKernelFlakeOutputs(nix_instantiate):
    # genFlakeOutputs throws without `self` now; `path` must be the repository itself, so that
    # the builder sees build.toml and every source it lists.
    expr = """
      let
        flake = import ./flake.nix;
        fakeSelf = { outPath = "/nonexistent"; marker = "the-self-argument"; };
        standIn = { lib.genKernelFlakeOutputs = args: args; };
        out = flake.outputs { self = fakeSelf; kernel-builder = standIn; };
      in {
        selfMarker = out.self.marker or null;
        path = if out ? path then toString out.path else null;
        args = builtins.attrNames out;
      }
    """
    got = nix_eval(nix_instantiate, expr)
    assert got["selfMarker"] == "the-self-argument", got
    assert got["path"] == str(REPO), got
    assert {"self", "path"} <= set(got["args"]), got


def test_outputs_use_genKernelFlakeOutputs_not_the_removed_genFlakeOutputs(nix_instantiate):
    # A stand-in with only the old function must fail to evaluate.
    expr = """
      let out = (import ./flake.nix).outputs {
        self = { };
        kernel-builder = { lib.genFlakeOutputs = args: args; };
      };
      in builtins.attrNames out
    """
    out = subprocess.run([nix_instantiate, "--eval", "--strict", "-E", expr], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode != 0
    assert "genKernelFlakeOutputs" in out.stderr
