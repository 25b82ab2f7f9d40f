"""The grid machinery itself: the pairwise covering really covers every pair, and every axis
value of every grid appears in the default (CPU) tier."""
import itertools

import pytest

import grid
import test_dropout
import test_fwd
import test_kvcache
import test_varlen

GRIDS = {"fwd": test_fwd.FWD_AXES, "varlen": test_varlen.VARLEN_AXES,
         "paged": test_varlen.PAGED_AXES, "kvcache": test_kvcache.KV_AXES,
         "dropout": test_dropout.DROPOUT_AXES}


@pytest.mark.fast
@pytest.mark.parametrize("name", list(GRIDS))
def test_pairwise_covers_every_pair_of_axis_values(name):
    axes = GRIDS[name]
    cases = grid.pairwise(axes)
    for a, b in itertools.combinations(axes, 2):
        seen = {(repr(c[a]), repr(c[b])) for c in cases}
        for va, vb in itertools.product(axes[a], axes[b]):
            assert (repr(va), repr(vb)) in seen, f"{name}: pair {a}={va}, {b}={vb} missing"
    assert len({grid.case_id(c) for c in cases}) == len(cases), "test ids must be unique"
    assert len(cases) < len(grid.product(axes)) or len(axes) <= 2


@pytest.mark.fast
def test_full_grid_crosses_the_core_axes_completely():
    cases = grid.combine(test_kvcache.KV_AXES, full=True)
    core = [a for a in test_kvcache.KV_AXES if a in grid.CORE_AXES]
    combos = {tuple(repr(c[a]) for a in core) for c in cases}
    assert len(combos) == len(grid.product({a: test_kvcache.KV_AXES[a] for a in core}))
