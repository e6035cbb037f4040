// CUDA kernels of the sigec runtime ops.
//
// Registered as the CUDA implementations of torch.ops.sigec.*: gather, gather_cat (the gather of a
// skip concatenation, never materialized), scatter_, scatter_gather_, residual_add and affine_act
// (schemas, fakes and pure-PyTorch references in runtime/ops.py), and
// token_gather and token_scatter_ (runtime/token_ops.py). The conventions (block-major blocks,
// windows, padding modes, dropped edge pixels) are documented in runtime/ops.py; the references
// are the oracle these kernels are tested against (tests/runtime/test_cuda.py).
//
// * fp32, fp16 and bf16 (and fp64); arithmetic in float (double for fp64).
// * Active-block and token indices are read on the device. Nothing here copies them to the host
//   or synchronizes, and every kernel runs on the current stream, so the ops can be captured in
//   a CUDA graph and queued ahead of the host.
// * One thread per element of the compact side (blocks, windows, tokens), numbered so that
//   neighbouring threads touch neighbouring addresses: along the window width for NCHW tensors,
//   along the channels for channels-last ones. Where rows are aligned, threads move 16 bytes at
//   a time (block writes, residual adds, affine, token rows).
// * Index arithmetic is 32-bit when every tensor involved has fewer than 2^31 elements.
//
// Compiled with -DSIGEC_CUDA_EMULATE by a host compiler, the same element functions run in a
// host loop and register under the namespace `sigec_cuda_emulated`: tests check the kernels'
// index arithmetic and numerics against the references on machines without a GPU.
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/ScalarType.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include "kernel_common.h"

#ifndef SIGEC_CUDA_EMULATE
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

namespace sigec {
namespace {

using at::Tensor;

// V consecutive elements moved as one aligned load or store.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <int V, typename T>
C10_HOST_DEVICE inline void copy_pack(T* dst, const T* src) {
  *reinterpret_cast<Pack<T, V>*>(dst) = *reinterpret_cast<const Pack<T, V>*>(src);
}

// An out-of-range token index is a caller's bug that would write outside the tensor: stop.
#ifdef SIGEC_CUDA_EMULATE
#define SIGEC_DEVICE_CHECK(cond, msg) TORCH_CHECK_INDEX(cond, msg)
#else
#define SIGEC_DEVICE_CHECK(cond, msg) CUDA_KERNEL_ASSERT(cond)
#endif

// gather: out[(b * N + s), channel0 + ch, r, j] = act(x[s, ch, row, col] * scale + shift), or the
// pad value. `out` has out_c channels: more than x's C when sources are concatenated along the
// channels (gather_cat), each source written by its own launch. Threads run along j (NCHW
// source) or ch (channels-last source) so that source reads coalesce.
template <typename scalar_t, typename index_t, bool kChannelsLast>
struct GatherOp {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* C10_RESTRICT x;
  scalar_t* C10_RESTRICT out;
  const int64_t* C10_RESTRICT idx;
  const acc_t* C10_RESTRICT scale;  // (N, out_c) or null
  const acc_t* C10_RESTRICT shift;
  index_t n, c, out_c, channel0, h, w, wh, ww, sh, sw, oh, ow;
  Pad pad;
  Act act;
  scalar_t pad_value;
  acc_t slope;

  C10_HOST_DEVICE void operator()(index_t e) const {
    index_t j, r, ch, s, b, t;
    if constexpr (kChannelsLast) {
      ch = e % c, t = e / c;
      j = t % ww, t /= ww;
      r = t % wh, t /= wh;
      s = t % n, b = t / n;
    } else {
      j = e % ww, t = e / ww;
      r = t % wh, t /= wh;
      ch = t % c, t /= c;
      s = t % n, b = t / n;
    }
    const index_t oc = channel0 + ch;
    const index_t o = (((b * n + s) * out_c + oc) * wh + r) * ww + j;
    const index_t row = resolve<index_t>(static_cast<index_t>(idx[2 * b]) * sh + oh + r, h, pad);
    const index_t col = resolve<index_t>(static_cast<index_t>(idx[2 * b + 1]) * sw + ow + j, w, pad);
    if (row < 0 || col < 0) {
      out[o] = pad_value;
      return;
    }
    const index_t src = kChannelsLast ? ((s * h + row) * w + col) * c + ch : ((s * c + ch) * h + row) * w + col;
    acc_t v = static_cast<acc_t>(x[src]);
    if (scale != nullptr) v = v * scale[s * out_c + oc] + shift[s * out_c + oc];
    out[o] = static_cast<scalar_t>(activate<acc_t>(v, act, slope));
  }
};

// scatter_: base[s, ch, row, col] = blocks[(b * N + s), ch, r, j] inside the tensor. With V > 1
// (NCHW, block and tensor widths multiples of V) each thread moves V pixels of one row.
template <typename scalar_t, typename index_t, bool kChannelsLast, int V>
struct ScatterOp {
  const scalar_t* C10_RESTRICT blocks;
  scalar_t* C10_RESTRICT base;
  const int64_t* C10_RESTRICT idx;
  index_t n, c, h, w, bh, bw;

  C10_HOST_DEVICE void operator()(index_t e) const {
    index_t j, r, ch, s, b, t;
    if constexpr (kChannelsLast) {
      ch = e % c, t = e / c;
      j = t % bw, t /= bw;
    } else {
      const index_t packs = bw / V;
      j = (e % packs) * V, t = e / packs;
    }
    r = t % bh, t /= bh;
    if constexpr (!kChannelsLast) ch = t % c, t /= c;
    s = t % n, b = t / n;
    const index_t row = static_cast<index_t>(idx[2 * b]) * bh + r;
    const index_t col = static_cast<index_t>(idx[2 * b + 1]) * bw + j;
    if (row < 0 || row >= h || col < 0 || col >= w) return;  // past the edge: dropped
    const index_t src = (((b * n + s) * c + ch) * bh + r) * bw + j;
    if constexpr (kChannelsLast) {
      base[((s * h + row) * w + col) * c + ch] = blocks[src];
    } else {
      copy_pack<V>(base + ((s * c + ch) * h + row) * w + col, blocks + src);
    }
  }
};

// residual_add: out = blocks + the matching blocks of `residual` (zero past the edge).
template <typename scalar_t, typename index_t, bool kChannelsLast, int V>
struct ResidualOp {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* C10_RESTRICT blocks;
  const scalar_t* C10_RESTRICT residual;
  scalar_t* C10_RESTRICT out;
  const int64_t* C10_RESTRICT idx;
  index_t n, c, h, w, bh, bw;

  C10_HOST_DEVICE void operator()(index_t e) const {
    const index_t packs = bw / V;
    const index_t j = (e % packs) * V;
    index_t t = e / packs;
    const index_t r = t % bh;
    t /= bh;
    const index_t ch = t % c;
    t /= c;
    const index_t s = t % n, b = t / n;
    const index_t row = static_cast<index_t>(idx[2 * b]) * bh + r;
    const index_t col = static_cast<index_t>(idx[2 * b + 1]) * bw + j;
    const index_t k = e * V;
    Pack<scalar_t, V> in = *reinterpret_cast<const Pack<scalar_t, V>*>(blocks + k);
    // past the edge the residual reads its zero padding; with V > 1 the tensor width is a
    // multiple of V, so a pack is wholly inside or wholly outside
    if (row >= 0 && row < h && col >= 0 && col < w) {
      for (int q = 0; q < V; ++q) {
        const scalar_t skip = kChannelsLast ? residual[((s * h + row) * w + col + q) * c + ch]
                                            : residual[((s * c + ch) * h + row) * w + col + q];
        in.v[q] = static_cast<scalar_t>(static_cast<acc_t>(in.v[q]) + static_cast<acc_t>(skip));
      }
    }
    *reinterpret_cast<Pack<scalar_t, V>*>(out + k) = in;
  }
};

// affine_act: out = act(x * scale[s, ch] + shift[s, ch]); rows of x cycle through the samples.
template <typename scalar_t, typename index_t, bool kChannelsLast, int V>
struct AffineOp {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* C10_RESTRICT x;
  scalar_t* C10_RESTRICT out;
  const acc_t* C10_RESTRICT scale;
  const acc_t* C10_RESTRICT shift;
  index_t n, c, plane;  // plane = H * W
  Act act;
  acc_t slope;

  C10_HOST_DEVICE void operator()(index_t e) const {
    const index_t k = e * V;
    // NCHW: a pack stays inside one (row, channel) plane (plane % V == 0)
    const index_t ch = kChannelsLast ? k % c : (k / plane) % c;
    const index_t s = (k / (plane * c)) % n;  // the row of x, then its sample
    const acc_t a = scale[s * c + ch], b = shift[s * c + ch];
    Pack<scalar_t, V> p = *reinterpret_cast<const Pack<scalar_t, V>*>(x + k);
    for (int q = 0; q < V; ++q) p.v[q] = static_cast<scalar_t>(activate<acc_t>(static_cast<acc_t>(p.v[q]) * a + b, act, slope));
    *reinterpret_cast<Pack<scalar_t, V>*>(out + k) = p;
  }
};

// token_gather: out[s, t, ch] = x[s, idx[t], ch] (x strided, out contiguous).
template <typename scalar_t, typename index_t, int V>
struct TokenGatherOp {
  const scalar_t* C10_RESTRICT x;
  scalar_t* C10_RESTRICT out;
  const int64_t* C10_RESTRICT idx;
  index_t nt, length, c, sx0, sx1, sx2;

  C10_HOST_DEVICE void operator()(index_t e) const {
    const index_t packs = c / V;
    const index_t ch = (e % packs) * V, t = (e / packs) % nt, s = e / (packs * nt);
    const int64_t token = idx[t];
    SIGEC_DEVICE_CHECK(token >= 0 && token < length, "sigec.token_gather: token index out of range");
    const scalar_t* src = x + s * sx0 + static_cast<index_t>(token) * sx1;
    if constexpr (V > 1) {
      copy_pack<V>(out + e * V, src + ch);  // sx2 == 1
    } else {
      out[e] = src[ch * sx2];
    }
  }
};

// token_scatter_: base[s, idx[t], ch] = tokens[s, t, ch] (base strided, tokens contiguous).
template <typename scalar_t, typename index_t, int V>
struct TokenScatterOp {
  const scalar_t* C10_RESTRICT tokens;
  scalar_t* C10_RESTRICT base;
  const int64_t* C10_RESTRICT idx;
  index_t nt, length, c, sb0, sb1, sb2;

  C10_HOST_DEVICE void operator()(index_t e) const {
    const index_t packs = c / V;
    const index_t ch = (e % packs) * V, t = (e / packs) % nt, s = e / (packs * nt);
    const int64_t token = idx[t];
    SIGEC_DEVICE_CHECK(token >= 0 && token < length, "sigec.token_scatter_: token index out of range");
    scalar_t* dst = base + s * sb0 + static_cast<index_t>(token) * sb1;
    if constexpr (V > 1) {
      copy_pack<V>(dst + ch, tokens + e * V);  // sb2 == 1
    } else {
      dst[ch * sb2] = tokens[e];
    }
  }
};

// ------------------------------------------------------------------------------------------
// launching

constexpr int kThreads = 256;

#ifndef SIGEC_CUDA_EMULATE
template <typename index_t, typename Op>
__global__ void __launch_bounds__(kThreads) elementwise_kernel(index_t total, Op op) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i < total) op(static_cast<index_t>(i));
}
#endif

// `total` threads of `op`, on the current stream (a host loop in the emulation build).
template <typename index_t, typename Op>
void launch(int64_t total, const Op& op) {
  if (total <= 0) return;
#ifdef SIGEC_CUDA_EMULATE
  for (int64_t i = 0; i < total; ++i) op(static_cast<index_t>(i));
#else
  const int64_t grid = (total + kThreads - 1) / kThreads;
  TORCH_CHECK(grid <= std::numeric_limits<int32_t>::max(), "sigec: too many elements for one launch");
  elementwise_kernel<index_t, Op><<<static_cast<unsigned>(grid), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      static_cast<index_t>(total), op);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

// Largest tensor size handled with 32-bit index arithmetic (lowered by the emulation tests to
// cover the 64-bit path).
int64_t g_index32_limit = std::numeric_limits<int32_t>::max();

// Calls f(index_t{}) with int32_t when every size fits, int64_t otherwise.
template <typename F>
void with_index_type(std::initializer_list<int64_t> sizes, const F& f) {
  for (const int64_t size : sizes) {
    if (size > g_index32_limit) {
      f(int64_t{0});
      return;
    }
  }
  f(int32_t{0});
}

// Elements per 16-byte pack.
template <typename scalar_t>
constexpr int pack_width() {
  return static_cast<int>(16 / sizeof(scalar_t));
}

bool aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % static_cast<std::uintptr_t>(bytes) == 0;
}

struct DeviceScope {
#ifdef SIGEC_CUDA_EMULATE
  explicit DeviceScope(const Tensor&) {}
#else
  explicit DeviceScope(const Tensor& t) : guard(t.device()) {
    TORCH_CHECK_VALUE(t.is_cuda(), "sigec: the CUDA kernels take CUDA tensors, got one on ", t.device());
  }
  c10::cuda::CUDAGuard guard;
#endif
};

// ------------------------------------------------------------------------------------------
// argument checks (shapes and devices only: nothing reads tensor data on the host)

struct Window {
  int64_t wh, ww, sh, sw, oh, ow;
};

Window window_of(at::IntArrayRef window, at::IntArrayRef stride, at::IntArrayRef offset) {
  TORCH_CHECK_VALUE(window.size() == 2 && stride.size() == 2 && offset.size() == 2,
                    "sigec: window, stride and offset take two values (rows, columns)");
  TORCH_CHECK_VALUE(window[0] >= 0 && window[1] >= 0, "sigec: window sizes must be non-negative, got ", window);
  return {window[0], window[1], stride[0], stride[1], offset[0], offset[1]};
}

void check_indices(const Tensor& indices, const Tensor& like, const char* op) {
  TORCH_CHECK_VALUE(indices.dim() == 2 && indices.size(1) == 2 && indices.scalar_type() == at::kLong,
                    op, ": indices must be an (nb, 2) int64 tensor of (row, col) block positions");
  TORCH_CHECK_VALUE(indices.device() == like.device(), op, ": indices are on ", indices.device(),
                    " but the tensor is on ", like.device(), "; keep the block indices on the tensor's device");
}

void check_same_device(const Tensor& t, const Tensor& like, const char* op, const char* what) {
  TORCH_CHECK_VALUE(t.device() == like.device(), op, ": ", what, " is on ", t.device(), " but the tensor is on ",
                    like.device());
}

bool channels_last(const Tensor& t) {
  return !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// (N, C) affine parameters in the op-math dtype, contiguous, on the tensor's device; undefined
// when absent.
Tensor affine_param(const c10::optional<Tensor>& t, const Tensor& x, int64_t n, int64_t c, const char* op) {
  if (!t.has_value()) return Tensor();
  TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) == n && t->size(1) == c, op, ": scale and shift must be (N, C) = (",
                    n, ", ", c, "), got ", t->sizes());
  check_same_device(*t, x, op, "scale or shift");
  return t->to(at::toOpMathType(x.scalar_type())).contiguous();
}

template <typename T>
const T* data_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

void check_blocks(const Tensor& base, const Tensor& blocks, const Tensor& indices, at::IntArrayRef block,
                  const char* op) {
  TORCH_CHECK_VALUE(base.dim() == 4 && blocks.dim() == 4, op, ": the full tensor and the blocks must be 4-D");
  TORCH_CHECK_VALUE(block.size() == 2, op, ": block takes two values (rows, columns)");
  check_indices(indices, base, op);
  check_same_device(blocks, base, op, "blocks");
  TORCH_CHECK_VALUE(blocks.size(0) == indices.size(0) * base.size(0) && blocks.size(1) == base.size(1) &&
                        blocks.size(2) == block[0] && blocks.size(3) == block[1],
                    op, ": blocks must be (nb * N, C, block rows, block columns) = (", indices.size(0) * base.size(0),
                    ", ", base.size(1), ", ", block[0], ", ", block[1], "), got ", blocks.sizes());
}

// ------------------------------------------------------------------------------------------
// ops

// The windows of the channel concatenation of `sources` (one source: a plain gather), without
// materializing the concatenation: one launch per source.
Tensor gather_sources(at::TensorList sources, const Tensor& indices, at::IntArrayRef window, at::IntArrayRef stride,
                      at::IntArrayRef offset, const std::string& pad_mode, double pad_value,
                      const c10::optional<Tensor>& scale, const c10::optional<Tensor>& shift,
                      const std::string& activation, double slope, const char* op) {
  TORCH_CHECK_VALUE(!sources.empty(), op, ": give at least one source");
  const Tensor& first = sources[0];
  int64_t channels = 0;
  for (const Tensor& x : sources) {
    TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be 4-D (N, C, H, W)");
    TORCH_CHECK_VALUE(x.size(0) == first.size(0) && x.size(2) == first.size(2) && x.size(3) == first.size(3) &&
                          x.scalar_type() == first.scalar_type(),
                      op, ": sources must share batch, height, width and dtype");
    check_same_device(x, first, op, "a source");
    channels += x.size(1);
  }
  check_indices(indices, first, op);
  TORCH_CHECK_VALUE(scale.has_value() == shift.has_value(), op, ": give both scale and shift, or neither");
  DeviceScope scope(first);
  const Tensor idx = indices.contiguous();
  const Window win = window_of(window, stride, offset);
  const Pad pad = parse_pad(pad_mode);
  const Act act = parse_act(activation);
  const int64_t n = first.size(0), nb = idx.size(0);
  Tensor out = at::empty({nb * n, channels, win.wh, win.ww}, first.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const Tensor sc = affine_param(scale, first, n, channels, op), sh = affine_param(shift, first, n, channels, op);
  int64_t channel0 = 0;
  for (const Tensor& source : sources) {
    const Tensor x = (source.is_contiguous() || channels_last(source)) ? source : source.contiguous();
    const bool cl = channels_last(x);
    const int64_t total = nb * n * x.size(1) * win.wh * win.ww;  // this source's share of `out`
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sigec_gather_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      with_index_type({x.numel(), out.numel()}, [&](auto zero) {
        using index_t = decltype(zero);
        const auto run = [&](auto layout) {
          constexpr bool kCL = decltype(layout)::value;
          launch<index_t>(total, GatherOp<scalar_t, index_t, kCL>{
              x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(),
              data_or_null<acc_t>(sc), data_or_null<acc_t>(sh), static_cast<index_t>(n),
              static_cast<index_t>(x.size(1)), static_cast<index_t>(channels), static_cast<index_t>(channel0),
              static_cast<index_t>(x.size(2)), static_cast<index_t>(x.size(3)), static_cast<index_t>(win.wh),
              static_cast<index_t>(win.ww), static_cast<index_t>(win.sh), static_cast<index_t>(win.sw),
              static_cast<index_t>(win.oh), static_cast<index_t>(win.ow), pad, act,
              static_cast<scalar_t>(pad_value), static_cast<acc_t>(slope)});
        };
        if (cl) run(std::true_type{}); else run(std::false_type{});
      });
    });
    channel0 += x.size(1);
  }
  return out;
}

Tensor gather(const Tensor& x, const Tensor& indices, at::IntArrayRef window, at::IntArrayRef stride,
              at::IntArrayRef offset, std::string pad_mode, double pad_value, const c10::optional<Tensor>& scale,
              const c10::optional<Tensor>& shift, std::string activation, double slope) {
  return gather_sources({x}, indices, window, stride, offset, pad_mode, pad_value, scale, shift, activation, slope,
                        "sigec.gather");
}

Tensor gather_cat(at::TensorList sources, const Tensor& indices, at::IntArrayRef window, at::IntArrayRef stride,
                  at::IntArrayRef offset, std::string pad_mode, double pad_value, const c10::optional<Tensor>& scale,
                  const c10::optional<Tensor>& shift, std::string activation, double slope) {
  return gather_sources(sources, indices, window, stride, offset, pad_mode, pad_value, scale, shift, activation, slope,
                        "sigec.gather_cat");
}

void scatter_(Tensor base, const Tensor& blocks_in, const Tensor& indices, at::IntArrayRef block) {
  check_blocks(base, blocks_in, indices, block, "sigec.scatter_");
  TORCH_CHECK_VALUE(base.is_contiguous() || channels_last(base),
                    "sigec.scatter_ writes into NCHW-contiguous or channels-last tensors; got strides ", base.strides());
  if (indices.size(0) == 0 || blocks_in.numel() == 0) return;
  DeviceScope scope(base);
  const Tensor blocks = blocks_in.to(base.scalar_type()).contiguous();
  const Tensor idx = indices.contiguous();
  const bool cl = channels_last(base);
  const int64_t n = base.size(0), c = base.size(1), h = base.size(2), w = base.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base.scalar_type(), "sigec_scatter_cuda", [&] {
    constexpr int kPack = pack_width<scalar_t>();
    with_index_type({base.numel(), blocks.numel()}, [&](auto zero) {
      using index_t = decltype(zero);
      const auto run = [&](auto layout, auto pack) {
        constexpr bool kCL = decltype(layout)::value;
        constexpr int V = decltype(pack)::value;
        launch<index_t>(blocks.numel() / V, ScatterOp<scalar_t, index_t, kCL, V>{
            blocks.const_data_ptr<scalar_t>(), base.mutable_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(),
            static_cast<index_t>(n), static_cast<index_t>(c), static_cast<index_t>(h), static_cast<index_t>(w),
            static_cast<index_t>(block[0]), static_cast<index_t>(block[1])});
      };
      const bool packed = !cl && block[1] % kPack == 0 && w % kPack == 0 &&
                          aligned(base.const_data_ptr(), 16) && aligned(blocks.const_data_ptr(), 16);
      if (cl) run(std::true_type{}, std::integral_constant<int, 1>{});
      else if (packed) run(std::false_type{}, std::integral_constant<int, kPack>{});
      else run(std::false_type{}, std::integral_constant<int, 1>{});
    });
  });
}

Tensor scatter_gather_(Tensor base, const Tensor& blocks, const Tensor& indices, at::IntArrayRef block,
                       const Tensor& gather_indices, at::IntArrayRef window, at::IntArrayRef stride,
                       at::IntArrayRef offset, std::string pad_mode, double pad_value) {
  // two launches on one stream: the gather reads pixels the scatter writes
  scatter_(base, blocks, indices, block);
  return gather(base, gather_indices, window, stride, offset, std::move(pad_mode), pad_value, c10::nullopt,
                c10::nullopt, "none", 0.0);
}

Tensor residual_add(const Tensor& blocks_in, const Tensor& residual_in, const Tensor& indices, at::IntArrayRef block) {
  check_blocks(residual_in, blocks_in, indices, block, "sigec.residual_add");
  DeviceScope scope(residual_in);
  const auto dtype = c10::promoteTypes(blocks_in.scalar_type(), residual_in.scalar_type());
  Tensor residual = residual_in.scalar_type() == dtype ? residual_in : residual_in.to(dtype);
  if (!residual.is_contiguous() && !channels_last(residual)) residual = residual.contiguous();
  const Tensor blocks = blocks_in.to(dtype).contiguous();
  Tensor out = at::empty_like(blocks, at::MemoryFormat::Contiguous);
  if (out.numel() == 0) return out;
  const Tensor idx = indices.contiguous();
  const bool cl = channels_last(residual);
  const int64_t n = residual.size(0), c = residual.size(1), h = residual.size(2), w = residual.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "sigec_residual_add_cuda", [&] {
    constexpr int kPack = pack_width<scalar_t>();
    with_index_type({residual.numel(), out.numel()}, [&](auto zero) {
      using index_t = decltype(zero);
      const auto run = [&](auto layout, auto pack) {
        constexpr bool kCL = decltype(layout)::value;
        constexpr int V = decltype(pack)::value;
        launch<index_t>(out.numel() / V, ResidualOp<scalar_t, index_t, kCL, V>{
            blocks.const_data_ptr<scalar_t>(), residual.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
            idx.const_data_ptr<int64_t>(), static_cast<index_t>(n), static_cast<index_t>(c), static_cast<index_t>(h),
            static_cast<index_t>(w), static_cast<index_t>(block[0]), static_cast<index_t>(block[1])});
      };
      // packs read the residual as whole rows: NCHW, and widths that keep them aligned
      const bool packed = !cl && block[1] % kPack == 0 && w % kPack == 0 && aligned(residual.const_data_ptr(), 16) &&
                          aligned(blocks.const_data_ptr(), 16) && aligned(out.const_data_ptr(), 16);
      if (cl) run(std::true_type{}, std::integral_constant<int, 1>{});
      else if (packed) run(std::false_type{}, std::integral_constant<int, kPack>{});
      else run(std::false_type{}, std::integral_constant<int, 1>{});
    });
  });
  return out;
}

Tensor affine_act(const Tensor& x_in, const Tensor& scale, const Tensor& shift, std::string activation, double slope) {
  TORCH_CHECK_VALUE(x_in.dim() == 4, "sigec.affine_act: x must be 4-D");
  TORCH_CHECK_VALUE(scale.dim() == 2 && scale.size(0) > 0, "sigec.affine_act: scale must be (N, C)");
  const int64_t n = scale.size(0), c = x_in.size(1);
  TORCH_CHECK_VALUE(x_in.size(0) % n == 0, "sigec.affine_act: rows of x must be a multiple of the batch");
  DeviceScope scope(x_in);
  const Act act = parse_act(activation);
  const Tensor x = (x_in.is_contiguous() || channels_last(x_in)) ? x_in : x_in.contiguous();
  const Tensor sc = affine_param(scale, x, n, c, "sigec.affine_act"), sh = affine_param(shift, x, n, c, "sigec.affine_act");
  Tensor out = at::empty_like(x);  // same memory format as x, as the reference
  if (out.numel() == 0) return out;
  const bool cl = channels_last(x);
  const int64_t plane = x.size(2) * x.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sigec_affine_act_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kPack = pack_width<scalar_t>();
    with_index_type({x.numel()}, [&](auto zero) {
      using index_t = decltype(zero);
      const auto run = [&](auto layout, auto pack) {
        constexpr bool kCL = decltype(layout)::value;
        constexpr int V = decltype(pack)::value;
        launch<index_t>(x.numel() / V, AffineOp<scalar_t, index_t, kCL, V>{
            x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), sc.const_data_ptr<acc_t>(),
            sh.const_data_ptr<acc_t>(), static_cast<index_t>(n), static_cast<index_t>(c),
            static_cast<index_t>(plane), act, static_cast<acc_t>(slope)});
      };
      const bool packed = !cl && plane % kPack == 0 && aligned(x.const_data_ptr(), 16) && aligned(out.const_data_ptr(), 16);
      if (cl) run(std::true_type{}, std::integral_constant<int, 1>{});
      else if (packed) run(std::false_type{}, std::integral_constant<int, kPack>{});
      else run(std::false_type{}, std::integral_constant<int, 1>{});
    });
  });
  return out;
}

void check_tokens(const Tensor& full, const Tensor& indices, const char* op) {
  TORCH_CHECK_VALUE(full.dim() == 3, op, ": the token tensor must be 3-D (N, L, C), got ", full.sizes());
  TORCH_CHECK_VALUE(indices.dim() == 1 && indices.scalar_type() == at::kLong, op,
                    ": indices must be a 1-D int64 tensor of token positions");
  check_same_device(indices, full, op, "indices");
}

// 16-byte packs along the channels: unit channel stride, and every row start aligned.
template <typename scalar_t>
bool token_rows_packed(const Tensor& full, const Tensor& compact) {
  constexpr int kPack = pack_width<scalar_t>();
  return full.stride(2) == 1 && full.size(2) % kPack == 0 && full.stride(0) % kPack == 0 &&
         full.stride(1) % kPack == 0 && aligned(full.const_data_ptr(), 16) && aligned(compact.const_data_ptr(), 16);
}

Tensor token_gather(const Tensor& x, const Tensor& indices) {
  check_tokens(x, indices, "sigec.token_gather");
  DeviceScope scope(x);
  const Tensor idx = indices.contiguous();
  const int64_t n = x.size(0), length = x.size(1), c = x.size(2), nt = idx.size(0);
  Tensor out = at::empty({n, nt, c}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sigec_token_gather_cuda", [&] {
    const int64_t span = (n - 1) * x.stride(0) + (length - 1) * x.stride(1) + (c - 1) * x.stride(2) + 1;
    with_index_type({span, out.numel()}, [&](auto zero) {
      using index_t = decltype(zero);
      const auto run = [&](auto pack) {
        constexpr int V = decltype(pack)::value;
        launch<index_t>(out.numel() / V, TokenGatherOp<scalar_t, index_t, V>{
            x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(),
            static_cast<index_t>(nt), static_cast<index_t>(length), static_cast<index_t>(c),
            static_cast<index_t>(x.stride(0)), static_cast<index_t>(x.stride(1)), static_cast<index_t>(x.stride(2))});
      };
      if (token_rows_packed<scalar_t>(x, out)) run(std::integral_constant<int, pack_width<scalar_t>()>{});
      else run(std::integral_constant<int, 1>{});
    });
  });
  return out;
}

void token_scatter_(Tensor base, const Tensor& tokens_in, const Tensor& indices) {
  check_tokens(base, indices, "sigec.token_scatter_");
  check_same_device(tokens_in, base, "sigec.token_scatter_", "tokens");
  TORCH_CHECK_VALUE(tokens_in.dim() == 3 && tokens_in.size(0) == base.size(0) && tokens_in.size(1) == indices.size(0) &&
                        tokens_in.size(2) == base.size(2),
                    "sigec.token_scatter_: tokens must be (N, nt, C) = (", base.size(0), ", ", indices.size(0), ", ",
                    base.size(2), "), got ", tokens_in.sizes());
  TORCH_CHECK_VALUE(at::has_internal_overlap(base) != at::MemOverlap::Yes,
                    "sigec.token_scatter_: the token tensor has overlapping memory; write into a dense tensor");
  if (tokens_in.numel() == 0) return;
  DeviceScope scope(base);
  const Tensor tokens = tokens_in.to(base.scalar_type()).contiguous();
  const Tensor idx = indices.contiguous();
  const int64_t n = base.size(0), length = base.size(1), c = base.size(2), nt = idx.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base.scalar_type(), "sigec_token_scatter_cuda", [&] {
    const int64_t span = (n - 1) * base.stride(0) + (length - 1) * base.stride(1) + (c - 1) * base.stride(2) + 1;
    with_index_type({span, tokens.numel()}, [&](auto zero) {
      using index_t = decltype(zero);
      const auto run = [&](auto pack) {
        constexpr int V = decltype(pack)::value;
        launch<index_t>(tokens.numel() / V, TokenScatterOp<scalar_t, index_t, V>{
            tokens.const_data_ptr<scalar_t>(), base.mutable_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(),
            static_cast<index_t>(nt), static_cast<index_t>(length), static_cast<index_t>(c),
            static_cast<index_t>(base.stride(0)), static_cast<index_t>(base.stride(1)),
            static_cast<index_t>(base.stride(2))});
      };
      if (token_rows_packed<scalar_t>(base, tokens)) run(std::integral_constant<int, pack_width<scalar_t>()>{});
      else run(std::integral_constant<int, 1>{});
    });
  });
}

}  // namespace
}  // namespace sigec

#ifdef SIGEC_CUDA_EMULATE
namespace {
void set_index32_limit(int64_t limit) { sigec::g_index32_limit = limit; }
}  // namespace

// Schemas inferred from the C++ signatures: enough to call the kernels directly in tests.
TORCH_LIBRARY(sigec_cuda_emulated, m) {
  m.def("gather", TORCH_FN(sigec::gather));
  m.def("gather_cat", TORCH_FN(sigec::gather_cat));
  m.def("scatter_", TORCH_FN(sigec::scatter_));
  m.def("scatter_gather_", TORCH_FN(sigec::scatter_gather_));
  m.def("residual_add", TORCH_FN(sigec::residual_add));
  m.def("affine_act", TORCH_FN(sigec::affine_act));
  m.def("token_gather", TORCH_FN(sigec::token_gather));
  m.def("token_scatter_", TORCH_FN(sigec::token_scatter_));
  m.def("set_index32_limit", TORCH_FN(set_index32_limit));
}
#else
TORCH_LIBRARY_IMPL(sigec, CUDA, m) {
  m.impl("gather", &sigec::gather);
  m.impl("gather_cat", &sigec::gather_cat);
  m.impl("scatter_", &sigec::scatter_);
  m.impl("scatter_gather_", &sigec::scatter_gather_);
  m.impl("residual_add", &sigec::residual_add);
  m.impl("affine_act", &sigec::affine_act);
  m.impl("token_gather", &sigec::token_gather);
  m.impl("token_scatter_", &sigec::token_scatter_);
}
#endif
