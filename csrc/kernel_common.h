// Shared by the CPU and CUDA kernels: the string arguments of the sigec ops, the activations
// (host and device) and the padding rule that maps a window coordinate to a source pixel.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <string>

namespace sigec {

enum class Pad : int8_t { kConstant, kReplicate, kReflect };
enum class Act : int8_t { kNone, kSilu, kRelu, kLeakyRelu, kGelu, kGeluTanh, kSigmoid, kTanh };

inline Pad parse_pad(const std::string& mode) {
  if (mode == "constant") return Pad::kConstant;
  if (mode == "replicate") return Pad::kReplicate;
  if (mode == "reflect") return Pad::kReflect;
  TORCH_CHECK_VALUE(false, "sigec: unknown pad_mode '", mode, "' (expected constant, replicate or reflect)");
}

inline Act parse_act(const std::string& name) {
  if (name == "none") return Act::kNone;
  if (name == "silu") return Act::kSilu;
  if (name == "relu") return Act::kRelu;
  if (name == "leaky_relu") return Act::kLeakyRelu;
  if (name == "gelu") return Act::kGelu;
  if (name == "gelu_tanh") return Act::kGeluTanh;
  if (name == "sigmoid") return Act::kSigmoid;
  if (name == "tanh") return Act::kTanh;
  TORCH_CHECK_VALUE(false, "sigec: unknown activation '", name, "'");
}

// ------------------------------------------------------------------------------------------
// element functions (host and device)

template <typename acc_t>
C10_HOST_DEVICE inline acc_t activate(acc_t v, Act act, acc_t slope) {
  switch (act) {
    case Act::kNone: return v;
    case Act::kSilu: return v / (acc_t(1) + std::exp(-v));
    case Act::kRelu: return v < acc_t(0) ? acc_t(0) : v;  // NaN stays NaN, as in torch.relu
    case Act::kLeakyRelu: return v > acc_t(0) ? v : v * slope;
    case Act::kGelu: return acc_t(0.5) * v * (acc_t(1) + std::erf(v * acc_t(0.70710678118654752)));
    case Act::kGeluTanh: {
      const acc_t inner = acc_t(0.79788456080286536) * (v + acc_t(0.044715) * v * v * v);
      return acc_t(0.5) * v * (acc_t(1) + std::tanh(inner));
    }
    case Act::kSigmoid: return acc_t(1) / (acc_t(1) + std::exp(-v));
    case Act::kTanh: return std::tanh(v);
  }
  return v;
}

// Source coordinate of `coord` in [0, limit) under the padding mode; -1 for a constant pad pixel.
template <typename index_t>
C10_HOST_DEVICE inline index_t resolve(index_t coord, index_t limit, Pad mode) {
  if (coord >= 0 && coord < limit) return coord;
  if (mode == Pad::kConstant) return -1;
  if (mode == Pad::kReplicate) return coord < 0 ? 0 : limit - 1;
  if (limit == 1) return 0;
  const index_t period = 2 * (limit - 1);
  index_t c = coord % period;
  if (c < 0) c += period;
  return c >= limit ? period - c : c;
}

}  // namespace sigec
