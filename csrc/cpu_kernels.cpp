// Native CPU kernels of the sigec runtime ops (OpenMP through ATen's parallel_for).
//
// Each kernel is registered as the CPU implementation of the matching torch.ops.sigec.* op,
// whose schema, fake implementation and pure-PyTorch reference live in runtime/ops.py. The
// conventions (block-major blocks, windows, padding modes, dropped edge pixels) are documented
// there; the reference is the oracle these kernels are tested against.
//
// Layouts: a full tensor is read and written either NCHW-contiguous or channels-last (any other
// layout is made contiguous first, or refused for in-place writes, as the reference does).
// Blocks and windows are NCHW-contiguous.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/scaled_dot_product_attention.h>
#include <c10/core/ScalarType.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include "kernel_common.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

namespace sigec {
namespace {

using at::Tensor;

struct Window {
  int64_t wh, ww, sh, sw, oh, ow;
};

Window window_of(at::IntArrayRef window, at::IntArrayRef stride, at::IntArrayRef offset) {
  TORCH_CHECK_VALUE(window.size() == 2 && stride.size() == 2 && offset.size() == 2,
              "sigec: window, stride and offset take two values (rows, columns)");
  return {window[0], window[1], stride[0], stride[1], offset[0], offset[1]};
}

void check_indices(const Tensor& indices) {
  TORCH_CHECK_VALUE(indices.dim() == 2 && indices.size(1) == 2 && indices.scalar_type() == at::kLong,
              "sigec: indices must be an (nb, 2) int64 tensor of (row, col) block positions");
}

bool channels_last(const Tensor& t) {
  return !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// ------------------------------------------------------------------------------------------
// output memory
//
// An incremental graph allocates the same large outputs call after call (windows of tens of MB
// at 256x256), and the C library hands allocations that large back to the system when they are
// freed. Memory fresh from the system costs a page fault per 4 KiB on first write: 9 ms to fill
// 36 MB against 0.6 ms for memory already mapped. So outputs of kPooledMinBytes or more come
// from a cache of freed buffers, by size class (eighths of a power of two, so an edit of a
// slightly different size reuses them), which keeps at most SIGEC_OUTPUT_POOL_MIB MiB (default
// 512; 0 turns it off) of buffers no tensor uses.
class OutputPool {
 public:
  static OutputPool& instance() {
    static OutputPool* pool = new OutputPool();  // never destroyed: tensors may outlive static destructors
    return *pool;
  }

  Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    const size_t bytes = c10::multiply_integers(sizes) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
    if (bytes < kPooledMinBytes || limit_ == 0) return at::empty(sizes, options);
    const size_t size = size_class(bytes);
    void* data = take(size);
    if (data == nullptr) data = c10::alloc_cpu(size);
    return at::from_blob(data, sizes, [size](void* p) { OutputPool::instance().give(p, size); },
                         options.memory_format(c10::nullopt));
  }

 private:
  static constexpr size_t kPooledMinBytes = size_t(1) << 20;

  OutputPool() {
    const char* mib = std::getenv("SIGEC_OUTPUT_POOL_MIB");
    limit_ = (mib != nullptr ? std::strtoull(mib, nullptr, 10) : 512) << 20;
  }

  static size_t size_class(size_t bytes) {
    size_t step = size_t(1) << 17;  // bytes >= 1 MiB: steps of at least an eighth of it
    while (step * 16 <= bytes) step <<= 1;
    return (bytes + step - 1) / step * step;
  }

  void* take(size_t size) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.find(size);
    if (it == free_.end() || it->second.empty()) return nullptr;
    void* data = it->second.back();
    it->second.pop_back();
    cached_ -= size;
    return data;
  }

  void give(void* data, size_t size) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_ + size <= limit_) {
        free_[size].push_back(data);
        cached_ += size;
        return;
      }
    }
    c10::free_cpu(data);
  }

  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  size_t cached_ = 0, limit_ = 0;
};

Tensor new_output(at::IntArrayRef sizes, const Tensor& like) {
  return OutputPool::instance().empty(sizes, like.options());
}

// Per-(sample, channel) affine parameters as float, or empty when absent.
std::vector<float> affine_table(const c10::optional<Tensor>& t, int64_t n, int64_t c) {
  if (!t.has_value()) return {};
  TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) == n && t->size(1) == c,
              "sigec: scale and shift must be (N, C) = (", n, ", ", c, ")");
  Tensor f = t->to(at::kFloat).contiguous();
  return std::vector<float>(f.data_ptr<float>(), f.data_ptr<float>() + n * c);
}

// ------------------------------------------------------------------------------------------
// the affine + activation prologue on contiguous float runs

// exp(x) without calls or branches, so that loops over it vectorize: Cephes' range reduction
// and polynomial (about 1 ulp; the argument is clamped to the finite range of float).
inline float exp_vectorizable(float x) {
  x = x < -87.3f ? -87.3f : x;  // selects, not calls: they vectorize (with -fno-trapping-math)
  x = x > 88.7f ? 88.7f : x;
  // rounded to nearest by adding and removing 1.5 * 2^23 (no call, no branch)
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  x = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * x + 1.3981999507e-3f;
  p = p * x + 8.3334519073e-3f;
  p = p * x + 4.1665795894e-2f;
  p = p * x + 1.6666665459e-1f;
  p = p * x + 5.0000001201e-1f;
  const float y = p * x * x + x + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

// act(v * a + b) over n contiguous floats, in place. With GCC on x86-64 Linux, one clone per
// instruction set, chosen when the library loads, so the loops run at the machine's vector width
// without -march flags; elsewhere the compiler's default target.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define SIGEC_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SIGEC_VECTOR_CLONES
#endif

SIGEC_VECTOR_CLONES
void transform_floats(float* v, int64_t n, float a, float b, Act act, float slope) {
  switch (act) {
    case Act::kNone:
      for (int64_t k = 0; k < n; ++k) v[k] = v[k] * a + b;
      return;
    case Act::kSilu:
      for (int64_t k = 0; k < n; ++k) {
        const float x = v[k] * a + b;
        v[k] = x / (1.0f + exp_vectorizable(-x));
      }
      return;
    case Act::kSigmoid:
      for (int64_t k = 0; k < n; ++k) v[k] = 1.0f / (1.0f + exp_vectorizable(-(v[k] * a + b)));
      return;
    case Act::kRelu:
      for (int64_t k = 0; k < n; ++k) {
        const float x = v[k] * a + b;
        v[k] = x < 0.0f ? 0.0f : x;  // NaN stays NaN
      }
      return;
    case Act::kLeakyRelu:
      for (int64_t k = 0; k < n; ++k) {
        const float x = v[k] * a + b;
        v[k] = x > 0.0f ? x : x * slope;
      }
      return;
    default:
      for (int64_t k = 0; k < n; ++k) v[k] = activate(v[k] * a + b, act, slope);
  }
}

// bfloat16 <-> float as bit operations (round to nearest even, NaN kept quiet: c10::BFloat16's
// rounding), written so that the loops vectorize.
SIGEC_VECTOR_CLONES
void bf16_to_floats(const uint16_t* in, float* out, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    const uint32_t bits = static_cast<uint32_t>(in[k]) << 16;
    std::memcpy(out + k, &bits, sizeof(float));
  }
}

SIGEC_VECTOR_CLONES
void floats_to_bf16(const float* in, uint16_t* out, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    uint32_t bits;
    std::memcpy(&bits, in + k, sizeof(float));
    const uint16_t rounded = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
    out[k] = in[k] != in[k] ? uint16_t(0x7FC0) : rounded;
  }
}

// act(v * a + b) over n contiguous values of any floating type, in place. Narrow types go through
// a float buffer, so the vectorized float loops do the arithmetic (a scalar loop over bf16 values
// took most of a bf16 model's gather time).
template <typename scalar_t>
void transform_run(scalar_t* v, int64_t n, float a, float b, Act act, float slope) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    transform_floats(v, n, a, b, act, slope);
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    for (int64_t k = 0; k < n; ++k) v[k] = activate(v[k] * a + b, act, static_cast<double>(slope));
  } else {
    constexpr int64_t kChunk = 512;
    float buffer[kChunk];
    for (int64_t start = 0; start < n; start += kChunk) {
      const int64_t m = std::min(kChunk, n - start);
      scalar_t* run = v + start;
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        bf16_to_floats(reinterpret_cast<const uint16_t*>(run), buffer, m);
      } else {
        for (int64_t k = 0; k < m; ++k) buffer[k] = static_cast<float>(run[k]);
      }
      transform_floats(buffer, m, a, b, act, slope);
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        floats_to_bf16(buffer, reinterpret_cast<uint16_t*>(run), m);
      } else {
        for (int64_t k = 0; k < m; ++k) run[k] = static_cast<scalar_t>(buffer[k]);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------
// gather

// Channels per task of the gather and scatter kernels: a task copies a run of channels of one
// (block, sample), so its row and column sources are resolved once, and a channels-last source
// is read in contiguous runs of channels. (One task per channel plane spent more time on index
// arithmetic than on copying the 2x2 and 4x4 blocks of low resolutions.)
constexpr int64_t kChannelRun = 16;

// Copies n values; a short run as a plain loop (window rows are often 2-10 values), a long one
// with memcpy.
template <typename scalar_t>
inline void copy_run(scalar_t* out, const scalar_t* in, int64_t n) {
  if (n >= 16) {
    std::memcpy(out, in, n * sizeof(scalar_t));
  } else {
    for (int64_t k = 0; k < n; ++k) out[k] = in[k];
  }
}

// Writes the windows of `x` into channels [channel0, channel0 + C) of `out`, which has
// `out_channels` channels (more than C when several sources are concatenated along channels).
// `scale`/`shift` hold `out_channels` values per sample.
template <typename scalar_t>
void gather_kernel(const Tensor& x, const int64_t* idx, int64_t nb, const Window& win, Pad pad,
                   float pad_value, const std::vector<float>& scale, const std::vector<float>& shift,
                   Act act, float slope, Tensor& out, int64_t channel0) {
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t out_channels = out.size(1);
  const bool cl = channels_last(x);
  const scalar_t* src = x.data_ptr<scalar_t>();
  scalar_t* dst = out.data_ptr<scalar_t>();
  const bool affine = !scale.empty();
  const bool transform = affine || act != Act::kNone;
  const scalar_t pad_s = static_cast<scalar_t>(pad_value);
  const int64_t plane = win.wh * win.ww;
  // row and column sources are the same for every channel and sample of one block (-1: padding)
  std::vector<int64_t> row_src(nb * win.wh), col_src(nb * win.ww);
  std::vector<char> block_padded(nb, 0);
  for (const auto b : c10::irange(nb)) {
    for (const auto r : c10::irange(win.wh)) {
      row_src[b * win.wh + r] = resolve(idx[2 * b] * win.sh + win.oh + r, h, pad);
      block_padded[b] |= row_src[b * win.wh + r] < 0;
    }
    for (const auto j : c10::irange(win.ww)) {
      col_src[b * win.ww + j] = resolve(idx[2 * b + 1] * win.sw + win.ow + j, w, pad);
      block_padded[b] |= col_src[b * win.ww + j] < 0;
    }
  }
  const int64_t runs = (c + kChannelRun - 1) / kChannelRun;
  at::parallel_for(0, nb * n * runs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (n * runs), s = (task / runs) % n;
      const int64_t ch0 = (task % runs) * kChannelRun, ch1 = std::min(c, ch0 + kChannelRun);
      const int64_t* rows = row_src.data() + b * win.wh;
      const int64_t* cols = col_src.data() + b * win.ww;
      const int64_t col0 = idx[2 * b + 1] * win.sw + win.ow;
      scalar_t* const first_plane = dst + ((b * n + s) * out_channels + channel0 + ch0) * plane;
      if (cl) {
        // a source pixel holds the run's channels contiguously; they go to one value of each plane
        const int64_t run = ch1 - ch0;
        for (int64_t r = 0; r < win.wh; ++r) {
          scalar_t* o = first_plane + r * win.ww;
          if (rows[r] < 0) {
            for (int64_t k = 0; k < run; ++k) std::fill(o + k * plane, o + k * plane + win.ww, pad_s);
            continue;
          }
          const scalar_t* line = src + (s * h + rows[r]) * w * c + ch0;
          for (int64_t j = 0; j < win.ww; ++j) {
            if (cols[j] < 0) {
              for (int64_t k = 0; k < run; ++k) o[k * plane + j] = pad_s;
            } else {
              const scalar_t* pixel = line + cols[j] * c;
              for (int64_t k = 0; k < run; ++k) o[k * plane + j] = pixel[k];
            }
          }
        }
      } else {
        // a row of NCHW in-image columns is one contiguous run
        const bool straight = col0 >= 0 && col0 + win.ww <= w;
        for (int64_t ch = ch0; ch < ch1; ++ch) {
          scalar_t* o = first_plane + (ch - ch0) * plane;
          const scalar_t* source_plane = src + (s * c + ch) * h * w;
          for (int64_t r = 0; r < win.wh; ++r, o += win.ww) {
            if (rows[r] < 0) {
              std::fill(o, o + win.ww, pad_s);
            } else if (straight) {
              copy_run(o, source_plane + rows[r] * w + col0, win.ww);
            } else {
              const scalar_t* line = source_plane + rows[r] * w;
              for (int64_t j = 0; j < win.ww; ++j) o[j] = cols[j] < 0 ? pad_s : line[cols[j]];
            }
          }
        }
      }
      if (!transform) continue;
      // constant padding (the only padding that leaves -1 sources) keeps its value: only in-image
      // rows and columns [j0, j1) are transformed
      const bool padded = block_padded[b];
      const int64_t j0 = padded ? std::clamp<int64_t>(-col0, 0, win.ww) : 0;
      const int64_t j1 = padded ? std::clamp<int64_t>(w - col0, j0, win.ww) : win.ww;
      for (int64_t ch = ch0; ch < ch1; ++ch) {
        const int64_t oc = channel0 + ch;
        const float a = affine ? scale[s * out_channels + oc] : 1.0f, sh = affine ? shift[s * out_channels + oc] : 0.0f;
        scalar_t* o = first_plane + (ch - ch0) * plane;
        if (!padded) {  // the common case: one run over the whole plane
          transform_run(o, plane, a, sh, act, slope);
          continue;
        }
        for (int64_t r = 0; r < win.wh; ++r, o += win.ww) {
          if (rows[r] >= 0) transform_run(o + j0, j1 - j0, a, sh, act, slope);
        }
      }
    }
  });
}

// The windows of the channel concatenation of `sources` (one source: a plain gather), without
// materializing the concatenation.
Tensor gather_sources(at::TensorList sources, const Tensor& indices, at::IntArrayRef window, at::IntArrayRef stride,
                      at::IntArrayRef offset, const std::string& pad_mode, double pad_value,
                      const c10::optional<Tensor>& scale, const c10::optional<Tensor>& shift,
                      const std::string& activation, double slope) {
  TORCH_CHECK_VALUE(!sources.empty(), "sigec.gather_cat: give at least one source");
  const Tensor& first = sources[0];
  int64_t channels = 0;
  for (const Tensor& x : sources) {
    TORCH_CHECK_VALUE(x.dim() == 4, "sigec.gather: x must be 4-D (N, C, H, W)");
    TORCH_CHECK_VALUE(x.size(0) == first.size(0) && x.size(2) == first.size(2) && x.size(3) == first.size(3) &&
                          x.scalar_type() == first.scalar_type(),
                      "sigec.gather_cat: sources must share batch, height, width and dtype");
    channels += x.size(1);
  }
  check_indices(indices);
  const Tensor idx = indices.contiguous();
  const Window win = window_of(window, stride, offset);
  const int64_t n = first.size(0), nb = idx.size(0);
  Tensor out = new_output({nb * n, channels, win.wh, win.ww}, first);
  if (out.numel() == 0) return out;
  const auto sc = affine_table(scale, n, channels), sh = affine_table(shift, n, channels);
  TORCH_CHECK_VALUE(sc.size() == sh.size(), "sigec.gather: give both scale and shift, or neither");
  const Pad pad = parse_pad(pad_mode);
  const Act act = parse_act(activation);
  int64_t channel0 = 0;
  for (const Tensor& source : sources) {
    const Tensor x = (source.is_contiguous() || channels_last(source)) ? source : source.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sigec_gather", [&] {
      gather_kernel<scalar_t>(x, idx.data_ptr<int64_t>(), nb, win, pad, static_cast<float>(pad_value), sc, sh, act,
                              static_cast<float>(slope), out, channel0);
    });
    channel0 += x.size(1);
  }
  return out;
}

Tensor gather(const Tensor& x, const Tensor& indices, at::IntArrayRef window, at::IntArrayRef stride,
              at::IntArrayRef offset, std::string pad_mode, double pad_value,
              const c10::optional<Tensor>& scale, const c10::optional<Tensor>& shift,
              std::string activation, double slope) {
  return gather_sources({x}, indices, window, stride, offset, pad_mode, pad_value, scale, shift, activation, slope);
}

Tensor gather_cat(at::TensorList sources, const Tensor& indices, at::IntArrayRef window, at::IntArrayRef stride,
                  at::IntArrayRef offset, std::string pad_mode, double pad_value,
                  const c10::optional<Tensor>& scale, const c10::optional<Tensor>& shift,
                  std::string activation, double slope) {
  return gather_sources(sources, indices, window, stride, offset, pad_mode, pad_value, scale, shift, activation, slope);
}

// ------------------------------------------------------------------------------------------
// scatter (in place)

template <typename scalar_t>
void scatter_kernel(Tensor& base, const Tensor& blocks, const int64_t* idx, int64_t nb, int64_t bh, int64_t bw) {
  const int64_t n = base.size(0), c = base.size(1), h = base.size(2), w = base.size(3);
  const bool cl = channels_last(base);
  scalar_t* dst = base.data_ptr<scalar_t>();
  const scalar_t* src = blocks.data_ptr<scalar_t>();
  const int64_t plane = bh * bw, runs = (c + kChannelRun - 1) / kChannelRun;
  at::parallel_for(0, nb * n * runs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (n * runs), s = (task / runs) % n;
      const int64_t ch0 = (task % runs) * kChannelRun, ch1 = std::min(c, ch0 + kChannelRun);
      const int64_t row0 = idx[2 * b] * bh, col0 = idx[2 * b + 1] * bw;
      const int64_t rows = std::min(bh, h - row0), cols = std::min(bw, w - col0);  // blocks past the edge
      const scalar_t* first_plane = src + ((b * n + s) * c + ch0) * plane;
      if (cl) {
        const int64_t run = ch1 - ch0;
        for (int64_t r = 0; r < rows; ++r) {
          scalar_t* line = dst + ((s * h + row0 + r) * w + col0) * c + ch0;
          const scalar_t* in = first_plane + r * bw;
          for (int64_t j = 0; j < cols; ++j) {
            for (int64_t k = 0; k < run; ++k) line[j * c + k] = in[k * plane + j];
          }
        }
      } else {
        for (int64_t ch = ch0; ch < ch1; ++ch) {
          const scalar_t* in = first_plane + (ch - ch0) * plane;
          scalar_t* out = dst + ((s * c + ch) * h + row0) * w + col0;
          for (int64_t r = 0; r < rows; ++r, in += bw, out += w) copy_run(out, in, cols);
        }
      }
    }
  });
}

void check_blocks(const Tensor& base, const Tensor& blocks, const Tensor& indices, at::IntArrayRef block) {
  TORCH_CHECK_VALUE(base.dim() == 4 && blocks.dim() == 4, "sigec.scatter_: base and blocks must be 4-D");
  TORCH_CHECK_VALUE(block.size() == 2, "sigec.scatter_: block takes two values (rows, columns)");
  check_indices(indices);
  TORCH_CHECK_VALUE(blocks.size(0) == indices.size(0) * base.size(0) && blocks.size(1) == base.size(1) &&
                  blocks.size(2) == block[0] && blocks.size(3) == block[1],
              "sigec.scatter_: blocks must be (nb * N, C, block rows, block columns)");
}

// Channels-last blocks into a channels-last base (token values, LayerNorm and linear on NHWC
// views): each block row is one run of cols * C values in both, so it is copied with memcpy.
template <typename scalar_t>
void scatter_rows_kernel(Tensor& base, const Tensor& blocks, const int64_t* idx, int64_t nb, int64_t bh, int64_t bw) {
  const int64_t n = base.size(0), c = base.size(1), h = base.size(2), w = base.size(3);
  scalar_t* dst = base.data_ptr<scalar_t>();
  const scalar_t* src = blocks.data_ptr<scalar_t>();
  at::parallel_for(0, nb * n * bh, 16, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (n * bh), s = (task / bh) % n, r = task % bh;
      const int64_t row = idx[2 * b] * bh + r, col0 = idx[2 * b + 1] * bw;
      if (row >= h) continue;
      const int64_t cols = std::min(bw, w - col0);
      std::memcpy(dst + ((s * h + row) * w + col0) * c, src + (((b * n + s) * bh + r) * bw) * c,
                  cols * c * sizeof(scalar_t));
    }
  });
}

void scatter_(Tensor base, const Tensor& blocks_in, const Tensor& indices, at::IntArrayRef block) {
  check_blocks(base, blocks_in, indices, block);
  TORCH_CHECK_VALUE(base.is_contiguous() || channels_last(base),
              "sigec.scatter_ writes into NCHW-contiguous or channels-last tensors; got strides ", base.strides());
  if (indices.size(0) == 0) return;
  const Tensor idx = indices.contiguous();
  const bool rows = channels_last(base) && channels_last(blocks_in) && blocks_in.scalar_type() == base.scalar_type();
  const Tensor blocks = rows ? blocks_in : blocks_in.to(base.scalar_type()).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base.scalar_type(), "sigec_scatter_", [&] {
    if (rows) {
      scatter_rows_kernel<scalar_t>(base, blocks, idx.data_ptr<int64_t>(), idx.size(0), block[0], block[1]);
    } else {
      scatter_kernel<scalar_t>(base, blocks, idx.data_ptr<int64_t>(), idx.size(0), block[0], block[1]);
    }
  });
}

Tensor scatter_gather_(Tensor base, const Tensor& blocks, const Tensor& indices, at::IntArrayRef block,
                       const Tensor& gather_indices, at::IntArrayRef window, at::IntArrayRef stride,
                       at::IntArrayRef offset, std::string pad_mode, double pad_value) {
  scatter_(base, blocks, indices, block);
  return gather(base, gather_indices, window, stride, offset, std::move(pad_mode), pad_value, c10::nullopt,
                c10::nullopt, "none", 0.0);
}

// ------------------------------------------------------------------------------------------
// residual add and affine + activation

template <typename scalar_t>
void residual_kernel(const Tensor& blocks, const Tensor& residual, const int64_t* idx, int64_t nb, int64_t bh,
                     int64_t bw, Tensor& out) {
  const int64_t n = residual.size(0), c = residual.size(1), h = residual.size(2), w = residual.size(3);
  const bool cl = channels_last(residual);
  const scalar_t* res = residual.data_ptr<scalar_t>();
  const scalar_t* in = blocks.data_ptr<scalar_t>();
  scalar_t* dst = out.data_ptr<scalar_t>();
  at::parallel_for(0, nb * n * c, 16, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (n * c), s = (task / c) % n, ch = task % c;
      const int64_t row0 = idx[2 * b] * bh, col0 = idx[2 * b + 1] * bw;
      const int64_t base = task * bh * bw;
      for (int64_t r = 0; r < bh; ++r) {
        const int64_t row = row0 + r;
        for (int64_t j = 0; j < bw; ++j) {
          const int64_t col = col0 + j, k = base + r * bw + j;
          if (row >= h || col >= w) {
            dst[k] = in[k];  // past the edge: the residual reads its zero padding
          } else {
            const scalar_t skip = cl ? res[((s * h + row) * w + col) * c + ch] : res[((s * c + ch) * h + row) * w + col];
            dst[k] = static_cast<scalar_t>(static_cast<float>(in[k]) + static_cast<float>(skip));
          }
        }
      }
    }
  });
}

Tensor residual_add(const Tensor& blocks_in, const Tensor& residual_in, const Tensor& indices, at::IntArrayRef block) {
  check_blocks(residual_in, blocks_in, indices, block);
  const Tensor residual =
      (residual_in.is_contiguous() || channels_last(residual_in)) ? residual_in : residual_in.contiguous();
  const auto dtype = c10::promoteTypes(blocks_in.scalar_type(), residual.scalar_type());
  const Tensor blocks = blocks_in.to(dtype).contiguous();
  const Tensor res = residual.scalar_type() == dtype ? residual : residual.to(dtype);
  Tensor out = new_output(blocks.sizes(), blocks);
  if (out.numel() == 0) return out;
  const Tensor idx = indices.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "sigec_residual_add", [&] {
    residual_kernel<scalar_t>(blocks, res, idx.data_ptr<int64_t>(), idx.size(0), block[0], block[1], out);
  });
  return out;
}

template <typename scalar_t>
void affine_kernel(const Tensor& x, const std::vector<float>& scale, const std::vector<float>& shift, int64_t n,
                   Act act, float slope, Tensor& out) {
  const int64_t rows = x.size(0), c = x.size(1), plane = x.size(2) * x.size(3);
  const scalar_t* src = x.data_ptr<scalar_t>();
  scalar_t* dst = out.data_ptr<scalar_t>();
  at::parallel_for(0, rows * c, 4, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / c, ch = task % c, s = row % n;  // block-major rows cycle through samples
      const float a = scale[s * c + ch], b = shift[s * c + ch];
      scalar_t* o = dst + task * plane;
      std::memcpy(o, src + task * plane, plane * sizeof(scalar_t));
      transform_run(o, plane, a, b, act, slope);
    }
  });
}

Tensor affine_act(const Tensor& x_in, const Tensor& scale, const Tensor& shift, std::string activation, double slope) {
  TORCH_CHECK_VALUE(x_in.dim() == 4, "sigec.affine_act: x must be 4-D");
  const int64_t n = scale.size(0), c = x_in.size(1);
  TORCH_CHECK_VALUE(x_in.size(0) % n == 0, "sigec.affine_act: rows of x must be a multiple of the batch");
  const Tensor x = x_in.contiguous();
  const auto sc = affine_table(scale, n, c), sh = affine_table(shift, n, c);
  Tensor out = new_output(x.sizes(), x);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sigec_affine_act", [&] {
    affine_kernel<scalar_t>(x, sc, sh, n, parse_act(activation), static_cast<float>(slope), out);
  });
  // the reference keeps the input's memory format; so do we
  return x_in.is_contiguous() ? out : out.contiguous(x_in.suggest_memory_format());
}

// ------------------------------------------------------------------------------------------
// im2col of gathered windows (the GEMM path of sigec.conv_windows)

// Rows are output positions (block, row, column) and columns (channel, kernel row, kernel column),
// the order of a convolution weight reshaped to (C_out, C * kh * kw). One task per output row of
// a block: its window planes stay in cache while the rows are written front to back.
// KH and KW are the kernel size when known at compile time (3x3 and 1x1: fully unrolled), else 0.
template <typename scalar_t, int KH, int KW>
void im2col_kernel(const Tensor& windows, int64_t kh_, int64_t kw_, int64_t sh, int64_t sw, int64_t oh, int64_t ow,
                   Tensor& cols) {
  const int64_t kh = KH ? KH : kh_, kw = KW ? KW : kw_;
  const int64_t nb = windows.size(0), c = windows.size(1), wh = windows.size(2), ww = windows.size(3);
  const int64_t plane = wh * ww, row_len = c * kh * kw;
  const scalar_t* src = windows.data_ptr<scalar_t>();
  scalar_t* dst = cols.data_ptr<scalar_t>();
  at::parallel_for(0, nb * oh, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / oh, oy = task % oh;
      const scalar_t* window = src + b * c * plane + oy * sh * ww;
      scalar_t* row = dst + task * ow * row_len;
      for (int64_t ox = 0; ox < ow; ++ox) {
        const scalar_t* corner = window + ox * sw;
        for (int64_t ch = 0; ch < c; ++ch, corner += plane) {
          for (int64_t ky = 0; ky < kh; ++ky) {
            const scalar_t* line = corner + ky * ww;
            for (int64_t kx = 0; kx < kw; ++kx) *row++ = line[kx];
          }
        }
      }
    }
  });
}

Tensor im2col(const Tensor& windows_in, at::IntArrayRef kernel, at::IntArrayRef stride) {
  TORCH_CHECK_VALUE(windows_in.dim() == 4, "sigec.im2col: windows must be 4-D (nb, C, rows, columns)");
  TORCH_CHECK_VALUE(kernel.size() == 2 && stride.size() == 2, "sigec.im2col: kernel and stride take two values");
  TORCH_CHECK_VALUE(kernel[0] >= 1 && kernel[1] >= 1 && stride[0] >= 1 && stride[1] >= 1,
                    "sigec.im2col: kernel and stride must be positive");
  const Tensor windows = windows_in.contiguous();
  const int64_t oh = (windows.size(2) - kernel[0]) / stride[0] + 1, ow = (windows.size(3) - kernel[1]) / stride[1] + 1;
  TORCH_CHECK_VALUE(oh >= 1 && ow >= 1, "sigec.im2col: windows of ", windows.size(2), "x", windows.size(3),
                    " are smaller than the kernel ", kernel[0], "x", kernel[1]);
  Tensor cols = new_output({windows.size(0) * oh * ow, windows.size(1) * kernel[0] * kernel[1]}, windows);
  if (cols.numel() == 0) return cols;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, windows.scalar_type(), "sigec_im2col", [&] {
    if (kernel[0] == 3 && kernel[1] == 3) {
      im2col_kernel<scalar_t, 3, 3>(windows, 3, 3, stride[0], stride[1], oh, ow, cols);
    } else if (kernel[0] == 1 && kernel[1] == 1) {
      im2col_kernel<scalar_t, 1, 1>(windows, 1, 1, stride[0], stride[1], oh, ow, cols);
    } else {
      im2col_kernel<scalar_t, 0, 0>(windows, kernel[0], kernel[1], stride[0], stride[1], oh, ow, cols);
    }
  });
  return cols;
}

// ------------------------------------------------------------------------------------------
// matrix products with few rows: out = a * w^T + bias

// The sparse convolutions of low resolutions multiply a few dozen window rows by a weight of up
// to 59 MB (a 1280-channel 3x3 convolution), which streams from memory once per call. The
// library GEMM packs the weight on every call; these kernels read it once, in the layout it is
// stored in (C_out, C_in * kh * kw), and threads split the output channels.
// * With AVX-512: the rows of `a`, transposed into panels of depth x (16 * MV) floats (one per
//   chunk of 16 MV rows), are broadcast-multiplied by weight values: NR weight rows times MV
//   vectors of rows accumulate in registers along the depth (no horizontal sums), over chunks of
//   the depth that keep the panels in L2. With more rows than one chunk (up to a few hundred: the
//   products of mid resolutions, where MKL's GEMM on an AMD CPU runs well below the FMA rate),
//   every chunk reads the same few weight values from L1.
// * Elsewhere: 4 x 4 tiles of 16-wide dot products along the depth.
constexpr int64_t kTileRows = 4, kTileCols = 4, kDepthChunk = 2048;

typedef float float16v __attribute__((vector_size(64)));

inline float16v load16(const float* p) {
  float16v v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store16(float* p, float16v v) { std::memcpy(p, &v, sizeof(v)); }

inline float sum16(float16v v) {
  float total = 0.0f;
  for (int i = 0; i < 16; ++i) total += v[i];
  return total;
}

// Where product element (row m, column c) goes: `group` consecutive rows are one block's
// output positions, stored (block, column, position), i.e. a convolution's (nb, C_out, oh, ow);
// group 1 is the row-major (rows, n) matrix.
struct ProductLayout {
  int64_t n, group;
  int64_t at(int64_t m, int64_t c) const { return (m / group) * n * group + c * group + m % group; }
};

// out[m][c] += dot(a[m][k0:k1], w[c][k0:k1]) for the rows and columns of one tile (up to 4 x 4).
SIGEC_VECTOR_CLONES
void small_rows_tile(const float* a, const float* w, int64_t lda, int64_t ldw, int64_t r0, int64_t rows, int64_t c0,
                     int64_t cols, int64_t depth, float* out, ProductLayout layout) {
  float16v acc[kTileRows][kTileCols] = {};
  const int64_t vec_depth = depth / 16 * 16;
  const float* ar[kTileRows];
  const float* wr[kTileCols];
  for (int64_t r = 0; r < kTileRows; ++r) ar[r] = a + std::min(r, rows - 1) * lda;  // repeats: discarded
  for (int64_t c = 0; c < kTileCols; ++c) wr[c] = w + std::min(c, cols - 1) * ldw;
  for (int64_t k = 0; k < vec_depth; k += 16) {
    const float16v a0 = load16(ar[0] + k), a1 = load16(ar[1] + k), a2 = load16(ar[2] + k), a3 = load16(ar[3] + k);
    for (int64_t c = 0; c < kTileCols; ++c) {
      const float16v wc = load16(wr[c] + k);
      acc[0][c] += a0 * wc;
      acc[1][c] += a1 * wc;
      acc[2][c] += a2 * wc;
      acc[3][c] += a3 * wc;
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      float tail = 0.0f;
      for (int64_t k = vec_depth; k < depth; ++k) tail += ar[r][k] * wr[c][k];
      out[layout.at(r0 + r, c0 + c)] += sum16(acc[r][c]) + tail;
    }
  }
}

void dot_tiles_product(const float* pa, int64_t rows, int64_t depth, const float* pw, int64_t n, float* po,
                       ProductLayout layout) {
  const int64_t col_tiles = (n + kTileCols - 1) / kTileCols;
  at::parallel_for(0, col_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k0 = 0; k0 < depth; k0 += kDepthChunk) {
      const int64_t chunk = std::min(kDepthChunk, depth - k0);
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t c0 = tile * kTileCols, cols = std::min(kTileCols, n - c0);
        for (int64_t r0 = 0; r0 < rows; r0 += kTileRows) {
          small_rows_tile(pa + r0 * depth + k0, pw + c0 * depth + k0, depth, depth, r0, std::min(kTileRows, rows - r0),
                          c0, cols, chunk, po, layout);
        }
      }
    }
  });
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SIGEC_BROADCAST_PRODUCT 1

// For each chunk of 16 MV rows: part[chunk] (NR x 16 MV) = w[0:NR][0:depth] (rows ldw apart)
// times panel[chunk][0:depth] (rows of 16 MV floats, chunks panel_stride apart), set on the first
// depth chunk and added to after: one weight value broadcast against MV vectors of rows per
// multiply-add. The chunks run inside each block of kSumBlock depth values, so the NR x kSumBlock
// weight values stay in L1 while every chunk of rows reads them. The registers are summed into
// `part` every kSumBlock values of the depth, so rounding grows as in a blocked sum (about the
// library GEMM's), not along one chain of 2048 products.
constexpr int64_t kSumBlock = 256;

template <int MV, int NR>
__attribute__((target("avx512f")))
void broadcast_tile(const float* panel, int64_t chunks, int64_t panel_stride, const float* w, int64_t ldw,
                    int64_t depth, float* part, bool first) {
  constexpr int64_t kLanes = MV * 16;
  for (int64_t k0 = 0; k0 < depth; k0 += kSumBlock) {
    const int64_t k1 = std::min(depth, k0 + kSumBlock);
    const bool set = first && k0 == 0;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      const float* rows_at = panel + chunk * panel_stride;
      float16v acc[NR][MV] = {};
      for (int64_t k = k0; k < k1; ++k) {
        float16v rows[MV];
        for (int v = 0; v < MV; ++v) rows[v] = load16(rows_at + k * kLanes + v * 16);
        for (int r = 0; r < NR; ++r) {
          const float weight = w[r * ldw + k];
          for (int v = 0; v < MV; ++v) acc[r][v] += rows[v] * weight;
        }
      }
      float* chunk_part = part + chunk * NR * kLanes;
      for (int r = 0; r < NR; ++r) {
        for (int v = 0; v < MV; ++v) {
          float* p = chunk_part + r * kLanes + v * 16;
          store16(p, set ? acc[r][v] : load16(p) + acc[r][v]);
        }
      }
    }
  }
}

// a (rows x depth, row-major) transposed into chunks of `lanes` rows, each a panel of depth x lanes
// floats (chunk c at panel + c * depth * lanes); lanes past `rows` are zero.
void pack_rows_panel(const float* a, int64_t rows, int64_t depth, int64_t lanes, float* panel) {
  constexpr int64_t kBlock = 64;  // depth rows per task: their panel lines stay in L1 while rows are read
  const int64_t chunks = (rows + lanes - 1) / lanes, blocks = (depth + kBlock - 1) / kBlock;
  at::parallel_for(0, chunks * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t chunk = task / blocks, k0 = (task % blocks) * kBlock, k1 = std::min(depth, k0 + kBlock);
      const int64_t m0 = chunk * lanes, m1 = std::min(rows, m0 + lanes);
      float* out = panel + chunk * depth * lanes;
      for (int64_t k = k0; k < k1; ++k) std::fill(out + k * lanes + (m1 - m0), out + (k + 1) * lanes, 0.0f);
      for (int64_t m = m0; m < m1; ++m) {
        const float* src = a + m * depth;
        for (int64_t k = k0; k < k1; ++k) out[k * lanes + (m - m0)] = src[k];
      }
    }
  });
}

// Depth values per pass over the weight: the panel's slice of them (all chunks of rows) stays in
// L2, about 640 KB, and a whole number of kSumBlock.
int64_t panel_depth_chunk(int64_t chunks, int64_t lanes) {
  const int64_t fit = (int64_t{640} * 1024 / 4) / (chunks * lanes);
  return std::max(kSumBlock, fit / kSumBlock * kSumBlock);
}

template <int MV, int NR>
void broadcast_product(const float* pa, int64_t rows, int64_t depth, const float* pw, int64_t n, const float* bias,
                       float* po, ProductLayout layout) {
  constexpr int64_t kLanes = MV * 16;
  const int64_t chunks = (rows + kLanes - 1) / kLanes, panel_stride = depth * kLanes;
  const int64_t depth_chunk = panel_depth_chunk(chunks, kLanes);
  // uninitialized: pack_rows_panel writes every value (a vector would zero 1.5 MB first)
  const std::unique_ptr<float[]> panel(new float[chunks * panel_stride]);
  pack_rows_panel(pa, rows, depth, kLanes, panel.get());
  const int64_t tiles = (n + NR - 1) / NR, tile_part = chunks * NR * kLanes;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    // uninitialized, as the panel: each tile's first chunk sets its part
    const std::unique_ptr<float[]> parts(new float[(end - begin) * tile_part]);
    std::vector<float> edge;  // the last tile's weight rows, padded to NR by repeating its last row
    for (int64_t k0 = 0; k0 < depth; k0 += depth_chunk) {
      const int64_t chunk = std::min(depth_chunk, depth - k0);
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t c0 = tile * NR, cols = std::min<int64_t>(NR, n - c0);
        const float* w = pw + c0 * depth + k0;
        int64_t ldw = depth;
        if (cols < NR) {
          edge.resize(NR * chunk);
          for (int64_t r = 0; r < NR; ++r) std::memcpy(edge.data() + r * chunk, w + std::min<int64_t>(r, cols - 1) * depth,
                                                       chunk * sizeof(float));
          w = edge.data();
          ldw = chunk;
        }
        broadcast_tile<MV, NR>(panel.get() + k0 * kLanes, chunks, panel_stride, w, ldw, chunk,
                               parts.get() + (tile - begin) * tile_part, k0 == 0);
      }
    }
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t c0 = tile * NR, cols = std::min<int64_t>(NR, n - c0);
      const float* part = parts.get() + (tile - begin) * tile_part;
      for (int64_t c = 0; c < cols; ++c) {
        const float b = bias ? bias[c0 + c] : 0.0f;
        for (int64_t m = 0; m < rows; ++m) {
          po[layout.at(m, c0 + c)] = part[(m / kLanes) * NR * kLanes + c * kLanes + m % kLanes] + b;
        }
      }
    }
  });
}

// Vectors of 16 rows per chunk (MV, 1 to 5) that pad `rows` the least, the most on ties.
int vectors_per_chunk(int64_t rows) {
  int best = 5;
  int64_t best_lanes = (rows + 79) / 80 * 80;
  for (int mv = 4; mv >= 1; --mv) {
    const int64_t lanes = (rows + 16 * mv - 1) / (16 * mv) * (16 * mv);
    if (lanes < best_lanes) best = mv, best_lanes = lanes;
  }
  return best;
}

// SIGEC_NATIVE_NO_AVX512=1 takes the dot-product tiles on any machine (how tests cover them).
bool has_avx512() {
  static const bool supported = __builtin_cpu_supports("avx512f") && !std::getenv("SIGEC_NATIVE_NO_AVX512");
  return supported;
}
#endif

// Rows up to which conv_windows and linear take these kernels instead of the library GEMM, as
// measured against MKL's GEMM (weights cold, 2 threads):
// * the broadcast kernel on an AMD EPYC (Zen 4, AVX-512): faster up to about 320 rows (1.2-1.5x
//   at 91-192 rows, where MKL runs its GEMM at 15-20 ps per multiply-add), slower from 400;
// * the broadcast kernel on an Intel Xeon: faster up to about 80 rows (MKL's own AVX-512 GEMM);
// * the dot-product tiles on an AMD EPYC: up to 96 rows or more.
int64_t small_rows_max() {
#ifdef SIGEC_BROADCAST_PRODUCT
  if (has_avx512()) {
    static const int64_t most = __builtin_cpu_is("amd") ? 256 : 80;
    return most;
  }
#endif
  return 96;
}

// out = a (rows, depth) * w (n, depth)^T + bias, placed by `layout`; a and w row-major
// contiguous float, 1 <= rows <= small_rows_max().
void small_rows_matmul(const Tensor& a, const Tensor& w, const c10::optional<Tensor>& bias, Tensor& out,
                       int64_t group = 1) {
  const int64_t rows = a.size(0), depth = a.size(1), n = w.size(0);
  const ProductLayout layout{n, group};
  const float* pa = a.data_ptr<float>();
  const float* pw = w.data_ptr<float>();
  float* po = out.data_ptr<float>();
  Tensor b;
  if (bias.has_value() && bias->defined()) b = bias->contiguous();
  const float* pb = b.defined() ? b.data_ptr<float>() : nullptr;
#ifdef SIGEC_BROADCAST_PRODUCT
  if (has_avx512()) {
    // MV vectors of rows times NR weight rows: at most 25 accumulators of the 32 registers, and
    // at most 16 weight rows read side by side (24 ran at half the speed: too many streams)
    switch (vectors_per_chunk(rows)) {
      case 1: return broadcast_product<1, 16>(pa, rows, depth, pw, n, pb, po, layout);
      case 2: return broadcast_product<2, 12>(pa, rows, depth, pw, n, pb, po, layout);
      case 3: return broadcast_product<3, 8>(pa, rows, depth, pw, n, pb, po, layout);
      case 4: return broadcast_product<4, 6>(pa, rows, depth, pw, n, pb, po, layout);
      default: return broadcast_product<5, 5>(pa, rows, depth, pw, n, pb, po, layout);
    }
  }
#endif
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t c = 0; c < n; ++c) po[layout.at(m, c)] = pb ? pb[c] : 0.0f;
  }
  dot_tiles_product(pa, rows, depth, pw, n, po, layout);
}

// ------------------------------------------------------------------------------------------
// convolution of gathered windows

// Output positions up to which the convolution runs as im2col and one matrix product against the
// weight as stored; above, oneDNN (whose per-call weight reorder no longer dominates). Same as
// GEMM_MAX_OUTPUTS in runtime/ops.py.
constexpr int64_t kGemmMaxOutputs = 1024;

Tensor conv_windows(const Tensor& windows, const Tensor& weight, const c10::optional<Tensor>& bias,
                    at::IntArrayRef stride, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK_VALUE(windows.dim() == 4 && weight.dim() == 4, "sigec.conv_windows: windows and weight must be 4-D");
  TORCH_CHECK_VALUE(stride.size() == 2 && dilation.size() == 2, "sigec.conv_windows: stride and dilation take two values");
  const int64_t nb = windows.size(0), co = weight.size(0), kh = weight.size(2), kw = weight.size(3);
  const int64_t oh = (windows.size(2) - dilation[0] * (kh - 1) - 1) / stride[0] + 1;
  const int64_t ow = (windows.size(3) - dilation[1] * (kw - 1) - 1) / stride[1] + 1;
  if (groups != 1 || dilation[0] != 1 || dilation[1] != 1 || nb * oh * ow > kGemmMaxOutputs) {
    const int64_t no_padding[2] = {0, 0};
    return at::conv2d(windows, weight, bias, stride, at::IntArrayRef(no_padding), dilation, groups).contiguous();
  }
  const Tensor cols = im2col(windows, {kh, kw}, stride);
  if (cols.scalar_type() == at::kFloat && cols.size(0) <= small_rows_max() && weight.is_contiguous()) {
    Tensor out = new_output({nb, co, oh, ow}, cols);
    small_rows_matmul(cols, weight.reshape({co, -1}), bias, out, oh * ow);
    return out;
  }
  const Tensor matrix = weight.reshape({co, -1}).t();
  Tensor product = new_output({cols.size(0), co}, cols);
  if (bias.has_value() && bias->defined()) {
    at::addmm_out(product, *bias, cols, matrix);
  } else {
    at::mm_out(product, cols, matrix);
  }
  Tensor out = new_output({nb, co, oh, ow}, product);
  out.copy_(product.view({nb, oh, ow, co}).permute({0, 3, 1, 2}));
  return out;
}

// ------------------------------------------------------------------------------------------
// linear

// F.linear; a float product with at most small_rows_max() rows (the tokens of a few active blocks)
// reads the weight once, as stored (N, K), with the few-rows kernel above.
Tensor linear(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias) {
  const bool has_bias = bias.has_value() && bias->defined();
  const int64_t depth = x.dim() > 0 ? x.size(-1) : 0;
  const int64_t rows = depth > 0 ? x.numel() / depth : 0;
  const bool few_rows = x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && weight.dim() == 2 &&
                        weight.is_contiguous() && weight.size(1) == depth && rows >= 1 && rows <= small_rows_max() &&
                        (!has_bias || (bias->scalar_type() == at::kFloat && bias->numel() == weight.size(0)));
  if (!few_rows) return at::linear(x, weight, bias);
  const Tensor a = x.reshape({rows, depth}).contiguous();
  Tensor out = new_output({rows, weight.size(0)}, a);
  small_rows_matmul(a, weight, bias, out);
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = weight.size(0);
  return out.view(sizes);
}

// ------------------------------------------------------------------------------------------
// attention over tokens: softmax(q k^T * scale) v, head by head

// The library's flash attention runs small GEMMs whose depth is the head's channels: 20+ ps per
// multiply-add on SD 1.x's heads of 40 channels (the 64x64 self-attention, 4096 keys), and some
// 180 on a DDPM UNet's 64 heads of 8. Here a task takes 16 or 32 queries of one head through
// every key: the scores come from key values broadcast against the queries' panel (16 queries per
// vector, accumulated in registers), the softmax runs along the keys with no horizontal sums, and
// the values are weighted the same way, each value broadcast against vectors of probabilities.
#ifdef SIGEC_BROADCAST_PRODUCT
constexpr int64_t kKeyTile = 8, kValueTile = 8;

// out[i][j] (rows ldo apart) for the `queries` (at most 16 MV) query rows of q (ldq apart) against
// `keys` rows of k (ldk apart, d channels) and v (ldv apart, dv >= kValueTile channels). Each
// broadcast key or value feeds MV vectors of queries. scores: keys x 16 MV floats of scratch;
// panel: d x 16 MV.
template <int MV>
__attribute__((target("avx512f")))
void attend_queries(const float* q, const float* k, const float* v, int64_t ldq, int64_t ldk, int64_t ldv,
                    int64_t queries, int64_t keys, int64_t d, int64_t dv, float scale, float* scores, float* panel,
                    float* out, int64_t ldo) {
  constexpr int64_t kLanes = 16 * MV;
  for (int64_t c = 0; c < d; ++c) {
    for (int64_t i = 0; i < kLanes; ++i) panel[c * kLanes + i] = i < queries ? q[i * ldq + c] * scale : 0.0f;
  }
  float16v top[MV];  // the running maximum of each query's scores
  for (int m = 0; m < MV; ++m) {
    for (int i = 0; i < 16; ++i) top[m][i] = -std::numeric_limits<float>::infinity();
  }
  for (int64_t s0 = 0; s0 < keys; s0 += kKeyTile) {
    const float* key[kKeyTile];
    for (int64_t r = 0; r < kKeyTile; ++r) key[r] = k + std::min(s0 + r, keys - 1) * ldk;  // repeats: discarded
    float16v acc[kKeyTile][MV] = {};
    for (int64_t c = 0; c < d; ++c) {
      float16v p[MV];
      for (int m = 0; m < MV; ++m) p[m] = load16(panel + c * kLanes + m * 16);
      for (int64_t r = 0; r < kKeyTile; ++r) {
        const float value = key[r][c];
        for (int m = 0; m < MV; ++m) acc[r][m] += p[m] * value;
      }
    }
    const int64_t n = std::min(kKeyTile, keys - s0);
    for (int64_t r = 0; r < n; ++r) {
      for (int m = 0; m < MV; ++m) {
        store16(scores + (s0 + r) * kLanes + m * 16, acc[r][m]);
        top[m] = acc[r][m] > top[m] ? acc[r][m] : top[m];
      }
    }
  }
  float most[kLanes], total[kLanes] = {};
  for (int m = 0; m < MV; ++m) store16(most + m * 16, top[m]);
  for (int64_t s = 0; s < keys; ++s) {
    float* row = scores + s * kLanes;
    for (int64_t i = 0; i < kLanes; ++i) {
      row[i] = exp_vectorizable(row[i] - most[i]);
      total[i] += row[i];
    }
  }
  for (int64_t j0 = 0; j0 < dv; j0 += kValueTile) {
    const int64_t j = std::min(j0, dv - kValueTile);  // the last tile overlaps the one before
    float16v acc[kValueTile][MV] = {};
    for (int64_t s = 0; s < keys; ++s) {
      float16v p[MV];
      for (int m = 0; m < MV; ++m) p[m] = load16(scores + s * kLanes + m * 16);
      const float* value = v + s * ldv + j;
      for (int64_t c = 0; c < kValueTile; ++c) {
        const float x = value[c];
        for (int m = 0; m < MV; ++m) acc[c][m] += p[m] * x;
      }
    }
    for (int64_t c = 0; c < kValueTile; ++c) {
      float lanes[kLanes];
      for (int m = 0; m < MV; ++m) store16(lanes + m * 16, acc[c][m]);
      for (int64_t i = 0; i < queries; ++i) out[i * ldo + j + c] = lanes[i] / total[i];
    }
  }
}
#endif

#ifdef SIGEC_BROADCAST_PRODUCT
// attend() on fp32 tokens: tasks of 16 or 32 queries of one head and sample.
Tensor attend_native(const Tensor& q, const Tensor& k, const Tensor& v, int64_t heads, float scale) {
  const Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const int64_t n = q.size(0), length = q.size(1), keys = k.size(1), c = q.size(2), cv = v.size(2);
  const int64_t d = c / heads, dv = cv / heads;
  Tensor out = at::empty({n, length, cv}, q.options());
  const float* pq = qc.data_ptr<float>();
  const float* pk = kc.data_ptr<float>();
  const float* pv = vc.data_ptr<float>();
  float* po = out.data_ptr<float>();
  // 32 queries per task (each broadcast feeds two vectors), 16 when there are no more
  const int64_t lanes = length > 16 ? 32 : 16, chunks = (length + lanes - 1) / lanes;
  at::parallel_for(0, n * heads * chunks, 1, [&](int64_t begin, int64_t end) {
    const std::unique_ptr<float[]> scores(new float[keys * lanes]), panel(new float[d * lanes]);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t chunk = task % chunks, head = (task / chunks) % heads, b = task / (chunks * heads);
      const int64_t q0 = chunk * lanes, queries = std::min(lanes, length - q0);
      const float* tq = pq + (b * length + q0) * c + head * d;
      const float* tk = pk + b * keys * c + head * d;
      const float* tv = pv + b * keys * cv + head * dv;
      float* to = po + (b * length + q0) * cv + head * dv;
      if (lanes == 32) {
        attend_queries<2>(tq, tk, tv, c, c, cv, queries, keys, d, dv, scale, scores.get(), panel.get(), to, cv);
      } else {
        attend_queries<1>(tq, tk, tv, c, c, cv, queries, keys, d, dv, scale, scores.get(), panel.get(), to, cv);
      }
    }
  });
  return out;
}
#endif

// q (N, L, C), k (N, S, C), v (N, S, Cv) -> (N, L, Cv); heads split the channels as diffusers does.
// fp32 with AVX-512 takes the kernel above; anything else, the library's attention.
Tensor attend(const Tensor& q, const Tensor& k, const Tensor& v, int64_t heads, c10::optional<double> scale) {
  TORCH_CHECK_VALUE(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "sigec.attend: q, k and v must be 3-D (N, L, C)");
  TORCH_CHECK_VALUE(heads >= 1 && q.size(2) % heads == 0 && v.size(2) % heads == 0 && k.size(2) == q.size(2),
                    "sigec.attend: channels must split into `heads` heads, keys as the queries");
  const int64_t n = q.size(0), length = q.size(1), keys = k.size(1), d = q.size(2) / heads;
#ifdef SIGEC_BROADCAST_PRODUCT
  if (has_avx512() && q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat &&
      v.scalar_type() == at::kFloat && k.size(0) == n && v.size(0) == n && v.size(1) == keys && keys >= 1 &&
      keys <= 65536 && v.size(2) / heads >= kValueTile && length >= 1 && d >= 1) {
    const double factor = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(d));
    return attend_native(q, k, v, heads, static_cast<float>(factor));
  }
#endif
  auto split = [heads](const Tensor& t) { return t.view({t.size(0), t.size(1), heads, -1}).transpose(1, 2); };
  const Tensor out = at::scaled_dot_product_attention(split(q), split(k), split(v), {}, 0.0, false, scale);
  return out.transpose(1, 2).reshape({n, length, v.size(2)}).contiguous();
}

}  // namespace
}  // namespace sigec

TORCH_LIBRARY_IMPL(sigec, CPU, m) {
  m.impl("gather", &sigec::gather);
  m.impl("gather_cat", &sigec::gather_cat);
  m.impl("scatter_", &sigec::scatter_);
  m.impl("scatter_gather_", &sigec::scatter_gather_);
  m.impl("residual_add", &sigec::residual_add);
  m.impl("affine_act", &sigec::affine_act);
  m.impl("im2col", &sigec::im2col);
  m.impl("conv_windows", &sigec::conv_windows);
  m.impl("linear", &sigec::linear);
  m.impl("attend", &sigec::attend);
}
