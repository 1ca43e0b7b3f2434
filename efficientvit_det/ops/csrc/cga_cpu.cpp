// Fused windowed cascaded group attention (EfficientViT), CPU forward and backward.
//
// One task per (image, window), run with at::parallel_for. Each task reads its window straight
// from the NCHW map (implicit zero padding), runs every head (1x1 qkv conv, depthwise conv on q,
// scores + relative bias, softmax, P @ V, cascade into the next head), the ReLU and the 1x1
// projection in thread-local buffers, and writes only the tokens the crop keeps. Nothing per
// window is stored between forward and backward: the backward recomputes a window's forward in
// its thread-local buffers and back-propagates it; weight gradients are accumulated per thread
// and reduced at the end.
//
// Vector code is written with GCC vector extensions and compiled three times (AVX-512, AVX2+FMA,
// baseline) under `#pragma GCC target`, the float32 forward a fourth time for AVX-512 with
// AVX512-BF16; the widest one the CPU supports is picked at run time (cpuid), so the build stays
// portable (no -march=native). EVIT_CGA_ISA=avx512bf16|avx512|avx2|base forces one.
//
// bfloat16: x (and grad_y) may be bfloat16 with float32 or bfloat16 weights. The kernels then
// read and write bf16 and compute in float32 inside the window (weights packed to float32, weight
// gradients accumulated in float32, each output rounded once). On a CPU with AVX512-BF16 (the
// "avx512bf16" ISA) the inference forward instead runs its four matmuls (qkv 1x1 conv, q @ k^T,
// P @ V, projection: 70-90% of the time in float32) with `vdpbf16ps` on bf16-rounded operands and
// float32 accumulation, as autocast rounds them; depthwise conv, softmax, cascade sums and the
// backward stay float32. benchmarks/cga_cpu_bf16.py measures both schemes against float32.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#ifdef CGA_PROFILE  // developer build: per-section cycle counters (-DCGA_PROFILE)
#include <x86intrin.h>
#endif

namespace cga {
#ifdef CGA_PROFILE
unsigned long long cga_prof[16];  // single-threaded use only
#endif

struct WinType {
  int index = 0, hv = 0, wv = 0, nvalid = 0;
  const int* off = nullptr;  // token -> offset (ry * W + rx) inside the map from the window origin
  const int* gp = nullptr;   // token -> position on the zero-bordered (G x G) grid
  const int* tok = nullptr;  // window position (row * ws + col) -> token
};

template <typename T>
struct Problem {
  int B, C, H, W, heads, cin, kd, vd, K, R, ws, N, NP, nh, nw, G;
  int cinp, kdp, vdp, Dq, HVp, Cp;
  WinType types[4];
  const int* rad;  // per head: radius of the non-zero part of the (zero-embedded) dw kernel
  const T *WT, *Wr, *bq, *dw, *dwf, *dwb, *biasmat, *WpT, *Wpr, *bp;
  const T* x;
  T* y;
  const T* gy;
  T* gx;
  // bfloat16 storage of x / y / grad_y / grad_x (T = float only): bit patterns, used instead of
  // the T pointers above when bf16_io is set
  bool bf16_io = false;
  const uint16_t *xh = nullptr, *gyh = nullptr;
  uint16_t *yh = nullptr, *gxh = nullptr;
  // AVX512-BF16 inference: qkv / projection weights as bf16 pairs along the reduction dim
  // (uint32 = {w[2k][j], w[2k+1][j]}): WT16[h][cinp/2][Dq], WpT16[HVp/2][Cp]; null: not used
  const uint32_t *WT16 = nullptr, *WpT16 = nullptr;
};

// bfloat16 <-> float on bit patterns: widening is exact; narrowing rounds to nearest even and
// keeps NaN a quiet NaN, like c10::BFloat16.
static inline float bf16_to_f32(uint16_t h) {
  const uint32_t u = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static inline uint16_t f32_to_bf16(float f) {
  if (std::isnan(f)) return 0x7FC0;
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

template <typename T>
struct Grads {
  T *gWT, *gbq, *gdw, *gdwb, *gbm, *gWpT, *gbp;
};

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define CGA_X86 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,bmi,bmi2,popcnt")
namespace isa_avx512 {
#define CGA_VBYTES 64
#include "cga_cpu_kernel.inc"
#undef CGA_VBYTES
}  // namespace isa_avx512
#pragma GCC pop_options
// AVX-512 plus AVX512-BF16: only the float32-compute entry points (bf16 dot products in the
// bf16 inference forward); float64 runs isa_avx512's code
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx512bf16,avx2,fma,bmi,bmi2,popcnt")
namespace isa_avx512bf16 {
#define CGA_VBYTES 64
#define CGA_BF16DOT 1
#include "cga_cpu_kernel.inc"
#undef CGA_BF16DOT
#undef CGA_VBYTES
}  // namespace isa_avx512bf16
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi,bmi2,popcnt")
namespace isa_avx2 {
#define CGA_VBYTES 32
#include "cga_cpu_kernel.inc"
#undef CGA_VBYTES
}  // namespace isa_avx2
#pragma GCC pop_options
#endif

namespace isa_base {
#define CGA_VBYTES 16
#include "cga_cpu_kernel.inc"
#undef CGA_VBYTES
}  // namespace isa_base

// ---------------------------------------------------------------------------------------------
struct Isa {
  std::string name;
  int vbytes;
  bool bf16dot;  // the float32 entry points run bf16 inference with vdpbf16ps
  long (*scratch_f)(const Problem<float>&, bool);
  long (*scratch_d)(const Problem<double>&, bool);
  void (*fwd_f)(const Problem<float>&, long, long, long, float*, long);
  void (*fwd_d)(const Problem<double>&, long, long, long, double*, long);
  void (*bwd_f)(const Problem<float>&, long, long, long, float*, long, const Grads<float>&);
  void (*bwd_d)(const Problem<double>&, long, long, long, double*, long, const Grads<double>&);
};

#define CGA_ISA(ns, nm)                                                                   \
  Isa {                                                                                   \
    nm, ns::kVectorBytes, false, ns::scratch_size_f, ns::scratch_size_d, ns::forward_range_f, \
        ns::forward_range_d, ns::backward_range_f, ns::backward_range_d                   \
  }

#ifdef CGA_X86
// cpuid leaf 7 sub-leaf 1, EAX bit 5: AVX512_BF16 (the compiler's __builtin_cpu_supports does
// not know it before GCC 13); also needs the OS to save the AVX-512 state (XCR0 bits 1,2,5,6,7)
static bool cpu_has_avx512bf16() {
  unsigned a, b, c, d;
  __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(0), "c"(0));
  if (a < 7) return false;
  __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(1));
  if (!((a >> 5) & 1)) return false;
  __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(1), "c"(0));
  if (!((c >> 27) & 1)) return false;  // OSXSAVE
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (lo & 0xE6) == 0xE6;
}
// cpuid leaf 7 sub-leaf 0, EDX bit 22: AMX-BF16 (with XCR0 tile state bits 17, 18)
static bool cpu_has_amx_bf16() {
  unsigned a, b, c, d;
  __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(0), "c"(0));
  if (a < 7) return false;
  __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
  if (!((d >> 22) & 1)) return false;
  __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(1), "c"(0));
  if (!((c >> 27) & 1)) return false;
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return ((lo >> 17) & 3) == 3;
}
#endif

static Isa pick_isa(std::string want) {
#ifdef CGA_X86
  __builtin_cpu_init();
  const bool has512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  const bool has2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (has512 && cpu_has_avx512bf16() && (want.empty() || want == "avx512bf16")) {
    Isa r = CGA_ISA(isa_avx512, "avx512bf16");
    r.bf16dot = true;
    r.scratch_f = isa_avx512bf16::scratch_size_f;
    r.fwd_f = isa_avx512bf16::forward_range_f;  // the backward is isa_avx512's
    return r;
  }
  if (has512 && (want.empty() || want == "avx512bf16" || want == "avx512"))
    return CGA_ISA(isa_avx512, "avx512");
  if (has2 && (want.empty() || want == "avx512bf16" || want == "avx512" || want == "avx2"))
    return CGA_ISA(isa_avx2, "avx2");
#endif
  return CGA_ISA(isa_base, "base");
}

static Isa& isa_slot() {
  static Isa chosen = [] {
    const char* env = std::getenv("EVIT_CGA_ISA");
    return pick_isa(env ? env : "");
  }();
  return chosen;
}
static const Isa& isa() { return isa_slot(); }

template <typename T>
static inline T* dp(const at::Tensor& t) { return t.data_ptr<T>(); }

static inline int rup(int v, int m) { return (v + m - 1) / m * m; }

// Host-side packing of the (BN-folded) weights into the kernel's padded layouts (ATen ops; no
// copy at all where no padding is needed). `bwd` selects what the backward needs.
template <typename T>
struct Packed {
  Problem<T> P;
  at::Tensor WT, Wr, bq, dw, dwf, dwb, biasmat, WpT, Wpr, bp, WT16, WpT16;
  std::vector<int> rad, off[4], gp[4], tok[4], ry[4], rx[4];
};

// copy src (rows x cols) into the top-left of a zero (rows_p x cols_p) matrix, per leading index
static at::Tensor pad_last2(const at::Tensor& src, int64_t rows_p, int64_t cols_p) {
  const int64_t rows = src.size(-2), cols = src.size(-1);
  if (rows == rows_p && cols == cols_p) return src.contiguous();
  auto sizes = src.sizes().vec();
  sizes[sizes.size() - 2] = rows_p;
  sizes[sizes.size() - 1] = cols_p;
  at::Tensor out = at::zeros(sizes, src.options());
  out.narrow(-2, 0, rows).narrow(-1, 0, cols).copy_(src);
  return out;
}

// (..., R, 2K) float -> (..., K, R) int32 holding the bf16 pairs {w[r][2k], w[r][2k+1]}: the B
// operand layout of the bf16 dot products, rounded to nearest even (as autocast rounds the
// weights of a bf16 conv). One cache-blocked pass: this runs on every call, and ATen's
// convert-then-transpose took ~1.5x as long here (a float transposed copy ~4x).
static at::Tensor bf16_pairs_t(const at::Tensor& w_) {
  const at::Tensor w = w_.to(at::kFloat).contiguous();
  const int64_t R = w.size(-2), K = w.size(-1) / 2, nb = R * K ? w.numel() / (R * 2 * K) : 0;
  auto sizes = w.sizes().vec();
  sizes[sizes.size() - 2] = K;
  sizes[sizes.size() - 1] = R;
  at::Tensor out = at::empty(sizes, w.options().dtype(at::kInt));
  const float* src = w.data_ptr<float>();
  uint32_t* dst = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  constexpr int64_t BS = 16;
  for (int64_t b = 0; b < nb; ++b, src += R * 2 * K, dst += R * K)
    for (int64_t r0 = 0; r0 < R; r0 += BS)
      for (int64_t k0 = 0; k0 < K; k0 += BS)
        for (int64_t r = r0; r < std::min(R, r0 + BS); ++r)
          for (int64_t k = k0; k < std::min(K, k0 + BS); ++k)
            dst[k * R + r] = (uint32_t)f32_to_bf16(src[r * 2 * K + 2 * k]) |
                             ((uint32_t)f32_to_bf16(src[r * 2 * K + 2 * k + 1]) << 16);
  return out;
}

template <typename T>
static void build(Packed<T>& pk, const std::vector<at::Tensor>& in, int64_t key_dim, int64_t ws,
                  double scale, bool bwd) {
  const at::Tensor &x = in[0], &qkv_w = in[1], &qkv_b = in[2], &dw_w = in[3], &dw_b = in[4],
                   &attn_bias = in[5], &proj_w = in[6], &proj_b = in[7];
  Problem<T>& P = pk.P;
  const int VW = isa().vbytes / (int)sizeof(T);
  P.B = x.size(0); P.C = x.size(1); P.H = x.size(2); P.W = x.size(3);
  P.heads = qkv_w.size(0); P.cin = qkv_w.size(2); P.kd = key_dim;
  P.vd = qkv_w.size(1) - 2 * key_dim;
  P.K = dw_w.size(2); P.R = P.K / 2; P.ws = ws; P.N = ws * ws;
  P.NP = rup(P.N, VW); P.G = ws + 2 * P.R;
  P.nh = (P.H + ws - 1) / ws; P.nw = (P.W + ws - 1) / ws;
  P.cinp = rup(P.cin, VW); P.kdp = rup(P.kd, VW); P.vdp = rup(P.vd, VW);
  P.Dq = 2 * P.kdp + P.vdp; P.HVp = P.heads * P.vdp; P.Cp = rup(P.C, VW);
  const int heads = P.heads, kd = P.kd, vd = P.vd, D = 2 * kd + vd, K = P.K, N = P.N,
            NP = P.NP, C = P.C;
  auto opt = x.options().dtype(c10::CppTypeToScalarType<T>::value);
  // bf16 inference on an AVX512-BF16 CPU: the 1x1 conv weights only as bf16 pairs
  const bool dot16 = x.scalar_type() == at::kBFloat16 && !bwd && isa().bf16dot;

  // qkv 1x1: Wr[h][d'][c] (d' = [q kdp | k kdp | v vdp]), WT = Wr^T per head
  {
    at::Tensor q = pad_last2(qkv_w.narrow(1, 0, kd), P.kdp, P.cinp);
    at::Tensor k = pad_last2(qkv_w.narrow(1, kd, kd), P.kdp, P.cinp);
    at::Tensor v = pad_last2(qkv_w.narrow(1, 2 * kd, vd), P.vdp, P.cinp);
    at::Tensor Wr = (P.kdp == kd && P.vdp == vd) ? pad_last2(qkv_w, D, P.cinp)
                                                  : at::cat({q, k, v}, 1);
    if (dot16) pk.WT16 = bf16_pairs_t(Wr);
    else pk.WT = Wr.transpose(1, 2).contiguous();
    if (bwd) pk.Wr = Wr;
    auto padb = [&](int64_t off, int64_t n, int64_t np) {
      return pad_last2(qkv_b.narrow(1, off, n).unsqueeze(1), 1, np).squeeze(1);
    };
    pk.bq = at::cat({padb(0, kd, P.kdp), padb(kd, kd, P.kdp), padb(2 * kd, vd, P.vdp)}, 1)
                .contiguous();
  }
  // depthwise: dw[h][tap][j] = scale * w[h][j][ky][kx]; effective radius per head
  {
    at::Tensor w = dw_w.permute({0, 2, 3, 1}).reshape({heads, K * K, kd}) * scale;
    pk.dw = pad_last2(w, K * K, P.kdp);
    pk.dwb = pad_last2((dw_b * scale).unsqueeze(1), 1, P.kdp).squeeze(1).contiguous();
    if (bwd) pk.dwf = pk.dw.view({heads, K, K, P.kdp}).flip({1, 2}).contiguous();
    // radius of the non-zero part of each head's (zero-embedded) kernel
    at::Tensor nz = (dw_w != 0).any(1);  // (heads, K, K)
    auto a = nz.accessor<bool, 3>();
    pk.rad.assign(heads, 0);
    for (int h = 0; h < heads; ++h)
      for (int ky = 0; ky < K; ++ky)
        for (int kx = 0; kx < K; ++kx)
          if (a[h][ky][kx])
            pk.rad[h] = std::max(pk.rad[h], std::max(std::abs(ky - P.R), std::abs(kx - P.R)));
  }
  P.rad = pk.rad.data();
  // window types: (bottom partial?) x (right partial?); token order: valid tokens first
  pk.biasmat = at::empty({4, heads, N, NP}, opt);
  {
    at::Tensor abc = attn_bias.contiguous();
    const T* ab = abc.data_ptr<T>();
    T* bm = dp<T>(pk.biasmat);
    const T ninf = -std::numeric_limits<T>::infinity();
    for (int t = 0; t < 4; ++t) {
      WinType& wt = P.types[t];
      wt.index = t;
      wt.hv = (t & 2) ? P.H - (P.nh - 1) * P.ws : P.ws;
      wt.wv = (t & 1) ? P.W - (P.nw - 1) * P.ws : P.ws;
      wt.nvalid = wt.hv * wt.wv;
      auto& ry = pk.ry[t];
      auto& rx = pk.rx[t];
      ry.clear(); rx.clear();
      for (int pass = 0; pass < 2; ++pass)
        for (int r = 0; r < ws; ++r)
          for (int c = 0; c < ws; ++c) {
            const bool valid = r < wt.hv && c < wt.wv;
            if (valid == (pass == 0)) { ry.push_back(r); rx.push_back(c); }
          }
      pk.off[t].resize(N);
      pk.gp[t].resize(N);
      pk.tok[t].resize(N);
      for (int n = 0; n < N; ++n) {
        pk.off[t][n] = ry[n] * P.W + rx[n];
        pk.gp[t][n] = (ry[n] + P.R) * P.G + rx[n] + P.R;
        pk.tok[t][ry[n] * ws + rx[n]] = n;
      }
      wt.off = pk.off[t].data();
      wt.gp = pk.gp[t].data();
      wt.tok = pk.tok[t].data();
      const bool occurs = (!(t & 2) || P.H % P.ws) && (!(t & 1) || P.W % P.ws) &&
                          ((t & 2) || P.H >= P.ws || P.nh > 1) && ((t & 1) || P.W >= P.ws || P.nw > 1);
      if (!occurs) continue;  // no window of this type: its bias matrix is never read
      for (int h = 0; h < heads; ++h)
        for (int n = 0; n < N; ++n) {
          T* row = bm + (((long)t * heads + h) * N + n) * NP;
          const T* abh = ab + (long)h * ws * ws;
          for (int m = 0; m < N; ++m)
            row[m] = abh[std::abs(ry[n] - ry[m]) * ws + std::abs(rx[n] - rx[m])];
          for (int m = N; m < NP; ++m) row[m] = ninf;
        }
    }
  }
  // projection: Wpr[o][h*vdp+e] = Wp[o][h*vd+e] (backward), WpT = Wpr^T (forward)
  {
    at::Tensor Wpr = pad_last2(proj_w.view({C, heads, vd}), heads, P.vdp).view({C, P.HVp});
    Wpr = pad_last2(Wpr, P.Cp, P.HVp);
    if (bwd) pk.Wpr = Wpr;
    else if (dot16) pk.WpT16 = bf16_pairs_t(Wpr);
    else pk.WpT = Wpr.t().contiguous();
    pk.bp = pad_last2(proj_b.unsqueeze(0), 1, P.Cp).squeeze(0).contiguous();
  }
  auto ptr = [](const at::Tensor& t) -> const T* { return t.defined() ? t.data_ptr<T>() : nullptr; };
  P.WT = ptr(pk.WT); P.Wr = ptr(pk.Wr); P.bq = ptr(pk.bq);
  P.dw = ptr(pk.dw); P.dwf = ptr(pk.dwf); P.dwb = ptr(pk.dwb); P.biasmat = ptr(pk.biasmat);
  P.WpT = ptr(pk.WpT); P.Wpr = ptr(pk.Wpr); P.bp = ptr(pk.bp);
  P.y = nullptr; P.gy = nullptr; P.gx = nullptr;
  if (x.scalar_type() == at::kBFloat16) {
    P.bf16_io = true;
    P.x = nullptr;
    P.xh = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
    if (dot16) {
      P.WT16 = reinterpret_cast<const uint32_t*>(pk.WT16.data_ptr());
      P.WpT16 = reinterpret_cast<const uint32_t*>(pk.WpT16.data_ptr());
    }
  } else {
    P.x = x.data_ptr<T>();
  }
}

static void check_inputs(const std::vector<at::Tensor>& ts, int64_t key_dim, int64_t ws) {
  static const char* names[] = {"x", "qkv_weight", "qkv_bias", "dw_weight", "dw_bias",
                                "attn_bias", "proj_weight", "proj_bias"};
  const auto dt = ts[0].scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16,
              "cga cpu: x must be float32, float64 or bfloat16, got ", dt);
  for (size_t i = 0; i < ts.size(); ++i) {
    const auto& t = ts[i];
    TORCH_CHECK(t.device().is_cpu(), "cga cpu: all tensors must be on the CPU (", names[i],
                " is on ", t.device(), ")");
    if (dt == at::kBFloat16) {
      TORCH_CHECK(t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kFloat,
                  "cga cpu: with a bfloat16 x every weight must be bfloat16 or float32; ",
                  names[i], " is ", t.scalar_type());
    } else {
      TORCH_CHECK(t.scalar_type() == dt, "cga cpu: all tensors must have x's dtype (", dt,
                  "); ", names[i], " is ", t.scalar_type(), " (a bfloat16 x allows float32 "
                  "weights, not the other way round)");
    }
  }
  TORCH_CHECK(ts[0].dim() == 4, "cga cpu: x must be (B, C, H, W)");
  TORCH_CHECK(key_dim >= 1 && ws >= 1, "cga cpu: bad key_dim / window_size");
  const int64_t heads = ts[1].size(0), D = ts[1].size(1), cin = ts[1].size(2);
  TORCH_CHECK(ts[0].size(1) == heads * cin, "cga cpu: C != heads * (C // heads)");
  TORCH_CHECK(D > 2 * key_dim, "cga cpu: qkv out dim too small");
  TORCH_CHECK(heads == 1 || D - 2 * key_dim == cin, "cga cpu: cascade needs val_dim == C // heads");
  TORCH_CHECK(ts[3].size(2) == ts[3].size(3) && ts[3].size(2) % 2 == 1, "cga cpu: dw kernel must be odd KxK");
  TORCH_CHECK(ts[5].size(1) == ws * ws, "cga cpu: attn_bias must be (heads, ws*ws)");
}

template <typename T>
static long scratch_elems(const Problem<T>& P, bool train);
template <>
long scratch_elems<float>(const Problem<float>& P, bool train) { return isa().scratch_f(P, train); }
template <>
long scratch_elems<double>(const Problem<double>& P, bool train) { return isa().scratch_d(P, train); }

static void run_fwd(const Problem<float>& P, long sl, long ns, long nt, float* s, long n) { isa().fwd_f(P, sl, ns, nt, s, n); }
static void run_fwd(const Problem<double>& P, long sl, long ns, long nt, double* s, long n) { isa().fwd_d(P, sl, ns, nt, s, n); }
static void run_bwd(const Problem<float>& P, long sl, long ns, long nt, float* s, long n, const Grads<float>& g) { isa().bwd_f(P, sl, ns, nt, s, n, g); }
static void run_bwd(const Problem<double>& P, long sl, long ns, long nt, double* s, long n, const Grads<double>& g) { isa().bwd_d(P, sl, ns, nt, s, n, g); }

template <typename T>
static at::Tensor forward_impl(const std::vector<at::Tensor>& in, int64_t key_dim, int64_t ws,
                               double scale) {
  Packed<T> pk;
  build<T>(pk, in, key_dim, ws, scale, false);
  Problem<T>& P = pk.P;
  at::Tensor y = at::empty_like(in[0]);
  if (P.bf16_io) P.yh = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  else P.y = y.data_ptr<T>();
  const auto opt = in[0].options().dtype(c10::CppTypeToScalarType<T>::value);
  const long size = scratch_elems<T>(P, false);
  const long ntask = (long)P.B * P.nh * P.nw;
  const long nslots = std::max(1L, std::min<long>(at::get_num_threads(), ntask));
  at::Tensor scratch = at::empty({nslots * size}, opt);
  T* sbase = scratch.data_ptr<T>();
  at::parallel_for(0, nslots, 1, [&](int64_t begin, int64_t end) {
    for (int64_t slot = begin; slot < end; ++slot)
      run_fwd(P, slot, nslots, ntask, sbase + slot * size, size);
  });
  return y;
}

template <typename T>
static std::vector<at::Tensor> backward_impl(const at::Tensor& gy, const std::vector<at::Tensor>& in,
                                             int64_t key_dim, int64_t ws, double scale) {
  Packed<T> pk;
  build<T>(pk, in, key_dim, ws, scale, true);
  Problem<T>& P = pk.P;
  at::Tensor gx = at::empty_like(in[0]);
  if (P.bf16_io) {
    P.gyh = reinterpret_cast<const uint16_t*>(gy.data_ptr<at::BFloat16>());
    P.gxh = reinterpret_cast<uint16_t*>(gx.data_ptr<at::BFloat16>());
  } else {
    P.gy = gy.data_ptr<T>();
    P.gx = gx.data_ptr<T>();
  }
  const auto opt = in[0].options().dtype(c10::CppTypeToScalarType<T>::value);
  const int heads = P.heads, N = P.N, NP = P.NP, KK = P.K * P.K;
  // per-thread gradient accumulators, one flat block per thread
  const long n_gWT = (long)heads * P.cinp * P.Dq, n_gbq = (long)heads * P.Dq,
             n_gdw = (long)heads * KK * P.kdp, n_gdwb = (long)heads * P.kdp,
             n_gbm = 4L * heads * N * NP, n_gWpT = (long)P.HVp * P.Cp, n_gbp = P.Cp;
  auto r16 = [](long v) { return (v + 15) / 16 * 16; };
  const long gsize = r16(n_gWT) + r16(n_gbq) + r16(n_gdw) + r16(n_gdwb) + r16(n_gbm) +
                     r16(n_gWpT) + r16(n_gbp);
  const long size = scratch_elems<T>(P, true);
  const long ntask = (long)P.B * P.nh * P.nw;
  const long nslots = std::max(1L, std::min<long>(at::get_num_threads(), ntask));
  at::Tensor scratch = at::empty({nslots * size}, opt);
  at::Tensor tgrads = at::zeros({nslots, gsize}, opt);
  T* sbase = scratch.data_ptr<T>();
  T* gbase = tgrads.data_ptr<T>();
  at::parallel_for(0, nslots, 1, [&](int64_t begin, int64_t end) {
   for (int64_t slot = begin; slot < end; ++slot) {
    T* g = gbase + slot * gsize;
    Grads<T> G;
    G.gWT = g; g += r16(n_gWT);
    G.gbq = g; g += r16(n_gbq);
    G.gdw = g; g += r16(n_gdw);
    G.gdwb = g; g += r16(n_gdwb);
    G.gbm = g; g += r16(n_gbm);
    G.gWpT = g; g += r16(n_gWpT);
    G.gbp = g;
    run_bwd(P, slot, nslots, ntask, sbase + slot * size, size, G);
   }
  });
  for (long t = 1; t < nslots; ++t) tgrads[0].add_(tgrads[t]);  // reduce in place
  at::Tensor gsum = tgrads[0];
  long o = 0;
  auto take = [&](long n) { at::Tensor v = gsum.narrow(0, o, n); o += r16(n); return v; };
  at::Tensor gWT = take(n_gWT).view({heads, P.cinp, P.Dq});
  at::Tensor gbq = take(n_gbq).view({heads, P.Dq});
  at::Tensor gdw = take(n_gdw).view({heads, P.K, P.K, P.kdp});
  at::Tensor gdwb = take(n_gdwb).view({heads, P.kdp});
  at::Tensor gbm = take(n_gbm).view({4, heads, N, NP});
  at::Tensor gWpT = take(n_gWpT).view({P.HVp, P.Cp});
  at::Tensor gbp = take(n_gbp);
  // unpack into the callers' layouts
  const int kd = P.kd, vd = P.vd, cin = P.cin, C = P.C;
  auto qkv_cols = [&](const at::Tensor& t) {  // [..., Dq] -> [..., D] (drop padding)
    return at::cat({t.narrow(-1, 0, kd), t.narrow(-1, P.kdp, kd), t.narrow(-1, 2 * P.kdp, vd)}, -1);
  };
  at::Tensor g_qkv_w = qkv_cols(gWT.narrow(1, 0, cin)).transpose(1, 2).contiguous();
  at::Tensor g_qkv_b = qkv_cols(gbq).contiguous();
  at::Tensor g_dw_w = (gdw.narrow(3, 0, kd).permute({0, 3, 1, 2}) * scale).contiguous();
  at::Tensor g_dw_b = (gdwb.narrow(1, 0, kd) * scale).contiguous();
  at::Tensor g_pw = gWpT.view({heads, P.vdp, P.Cp}).narrow(1, 0, vd).narrow(2, 0, C)
                        .permute({2, 0, 1}).reshape({C, heads * vd}).contiguous();
  at::Tensor g_pb = gbp.narrow(0, 0, C).clone();
  at::Tensor g_ab = at::zeros({heads, (long)ws * ws}, opt);
  for (int t = 0; t < 4; ++t) {
    std::vector<int64_t> idx(N * N);
    for (int n = 0; n < N; ++n)
      for (int m = 0; m < N; ++m)
        idx[n * N + m] = std::abs(pk.ry[t][n] - pk.ry[t][m]) * ws + std::abs(pk.rx[t][n] - pk.rx[t][m]);
    at::Tensor it = at::from_blob(idx.data(), {(long)N * N}, at::kLong).clone();
    g_ab.index_add_(1, it, gbm[t].narrow(2, 0, N).reshape({heads, (long)N * N}));
  }
  return {gx, g_qkv_w, g_qkv_b, g_dw_w, g_dw_b, g_ab, g_pw, g_pb};
}

static std::vector<at::Tensor> prep(const std::vector<at::Tensor>& in) {
  std::vector<at::Tensor> out;
  for (const auto& t : in) out.push_back(t.contiguous());
  return out;
}

// x as it is, the weights as float32 (a bf16 x computes in float32; the packing copies the
// weights anyway)
static std::vector<at::Tensor> float_weights(std::vector<at::Tensor> in) {
  for (size_t i = 1; i < in.size(); ++i) in[i] = in[i].to(at::kFloat);
  return in;
}

at::Tensor cga_forward(const at::Tensor& x, const at::Tensor& qkv_w, const at::Tensor& qkv_b,
                       const at::Tensor& dw_w, const at::Tensor& dw_b, const at::Tensor& attn_bias,
                       const at::Tensor& proj_w, const at::Tensor& proj_b, int64_t key_dim,
                       int64_t window_size, double scale) {
  auto in = prep({x, qkv_w, qkv_b, dw_w, dw_b, attn_bias, proj_w, proj_b});
  check_inputs(in, key_dim, window_size);
  if (in[0].scalar_type() == at::kDouble) return forward_impl<double>(in, key_dim, window_size, scale);
  return forward_impl<float>(float_weights(in), key_dim, window_size, scale);
}

std::vector<at::Tensor> cga_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                     const at::Tensor& qkv_w, const at::Tensor& qkv_b,
                                     const at::Tensor& dw_w, const at::Tensor& dw_b,
                                     const at::Tensor& attn_bias, const at::Tensor& proj_w,
                                     const at::Tensor& proj_b, int64_t key_dim,
                                     int64_t window_size, double scale) {
  auto in = prep({x, qkv_w, qkv_b, dw_w, dw_b, attn_bias, proj_w, proj_b});
  check_inputs(in, key_dim, window_size);
  at::Tensor gy = grad_y.contiguous().to(in[0].scalar_type());
  TORCH_CHECK(gy.sizes() == in[0].sizes(), "cga cpu: grad_y shape mismatch");
  if (in[0].scalar_type() == at::kDouble) return backward_impl<double>(gy, in, key_dim, window_size, scale);
  auto grads = backward_impl<float>(gy, float_weights(in), key_dim, window_size, scale);
  for (size_t i = 1; i < grads.size(); ++i)  // each weight's grad in that weight's dtype
    if (grads[i].scalar_type() != in[i].scalar_type()) grads[i] = grads[i].to(in[i].scalar_type());
  return grads;
}

std::string cga_isa() { return isa().name; }

// Whether this CPU computes bfloat16 natively (AVX512-BF16 dot products or AMX-BF16 tiles), by
// cpuid and the OS-enabled register state: the kernel's view for a `--precision auto` choice.
bool cga_cpu_bf16_native() {
#ifdef CGA_X86
  return cpu_has_avx512bf16() || cpu_has_amx_bf16();
#else
  return false;
#endif
}

// Select the instruction set ('' = widest supported); returns the one in use. Not thread-safe:
// for tests and benchmarks only.
std::string cga_set_isa(const std::string& want) {
  isa_slot() = pick_isa(want);
  return isa().name;
}

}  // namespace cga

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused windowed cascaded group attention (EfficientViT), CPU kernels";
  m.def("forward", &cga::cga_forward, "CGA forward (CPU)");
  m.def("backward", &cga::cga_backward, "CGA backward (CPU): grads of x and all weights");
  m.def("isa", &cga::cga_isa, "instruction set the kernels run with");
  m.def("set_isa", &cga::cga_set_isa,
        "force an instruction set (avx512bf16, avx512, avx2, base; '' = best)");
  m.def("cpu_bf16_native", &cga::cga_cpu_bf16_native,
        "whether the CPU has native bfloat16 compute (AVX512-BF16 or AMX-BF16), by cpuid");
#ifdef CGA_PROFILE
  m.def("prof", []() {
    std::vector<unsigned long long> v(cga::cga_prof, cga::cga_prof + 16);
    std::fill(cga::cga_prof, cga::cga_prof + 16, 0ULL);
    return v;
  });
#endif
}
