// Driver for tests/test_common_numerics.py: checks common/mask.h's block-level answers against
// its element-wise definition (Mask::visible), exhaustively over small shapes, windows, tile
// widths and row ranges:
//   full_tiles  a tile is in the range iff every key of it is visible from every row of the
//               range (rows past seqlen_q ignored; no row left: every tile)
//   kv_range    with and without a split range: every visible key of the rows inside the
//               split lies in the range, and the range stays inside the split and [0, seqlen_k]
// Prints each mismatch and exits with 1 if there is one.
#include <climits>
#include <cstdio>

#include "kernel_src/common/mask.h"

using namespace FLASH_NAMESPACE;

namespace {

int failures = 0;

void fail(const char* what, int sq, int sk, int wl, int wr, int a, int b, int c, int d) {
  if (++failures <= 20) {
    std::printf("%s: seqlen_q=%d seqlen_k=%d window=(%d,%d) args=%d %d %d %d\n", what, sq, sk, wl,
                wr, a, b, c, d);
  }
}

void check_full_tiles(const Mask& m, int wl, int wr, int rb, int re, int bn) {
  int nb, ne;
  m.full_tiles(rb, re, bn, &nb, &ne);
  const int rows_end = re < m.seqlen_q ? re : m.seqlen_q;
  for (int n = 0; n * bn < m.seqlen_k + 2 * bn; ++n) {
    bool full = true;
    for (int r = rb; r < rows_end; ++r)
      for (int c = n * bn; c < (n + 1) * bn; ++c) full = full && m.visible(r, c);
    if (full != (n >= nb && n < ne)) fail("full_tiles", m.seqlen_q, m.seqlen_k, wl, wr, rb, re, bn, n);
  }
}

void check_kv_range(const Mask& m, int wl, int wr, int rb, int re, int sb, int se) {
  int b, e;
  if (sb == 0 && se == INT_MAX) {
    m.kv_range(rb, re, &b, &e);
  } else {
    m.kv_range(rb, re, &b, &e, sb, se);
  }
  const bool empty = e <= b;
  if (!empty && (b < 0 || e > m.seqlen_k || b < sb || e > se)) {
    fail("kv_range bounds", m.seqlen_q, m.seqlen_k, wl, wr, rb, re, sb, se);
  }
  for (int r = rb; r < re && r < m.seqlen_q; ++r)
    for (int c = sb; c < se && c < m.seqlen_k; ++c)
      if (m.visible(r, c) && (empty || c < b || c >= e)) {
        fail("kv_range misses a key", m.seqlen_q, m.seqlen_k, wl, wr, rb, re, sb, c);
      }
}

}  // namespace

int main() {
  const int lens[] = {0, 1, 2, 3, 5, 8, 13};
  const int windows[] = {-1, 0, 1, 4};
  const int block_ns[] = {1, 2, 4};
  long checks = 0;
  for (int sq : lens)
    for (int sk : lens)
      for (int wl : windows)
        for (int wr : windows) {
          const Mask m(sq, sk, wl, wr);
          for (int rb = -3; rb <= sq + 1; ++rb)
            for (int re = rb; re <= sq + 3; ++re) {
              for (int bn : block_ns) check_full_tiles(m, wl, wr, rb, re, bn), ++checks;
              if (rb < 0) continue;  // kv_range takes row_begin >= 0
              check_kv_range(m, wl, wr, rb, re, 0, INT_MAX);
              for (int sb = 0; sb <= sk; sb += 2)
                for (int se = sb; se <= sk + 1; se += 3) check_kv_range(m, wl, wr, rb, re, sb, se);
              ++checks;
            }
        }
  std::printf("%ld checks, %d failures\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
