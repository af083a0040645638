// Argument checks of the tensor-level ops (messages name the op and the offending argument).

#pragma once

#include <ATen/core/Tensor.h>

namespace metronome {

using at::Tensor;

inline void check_float_dtype(const char* op, const char* arg, const Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, op, ": ", arg,
              " must be float32 or bfloat16, got ", t.scalar_type());
}
inline void check_cpu(const char* op, const char* arg, const Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", arg, " must be a CPU tensor, got ", t.device());
}

// t as a contiguous float32 tensor (a copy only when it is not one already).
inline Tensor weight_f32(const Tensor& w) {
  return w.scalar_type() == at::kFloat ? w.contiguous() : w.to(at::kFloat).contiguous();
}

}  // namespace metronome
