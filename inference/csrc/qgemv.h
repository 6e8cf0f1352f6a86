// What inference/csrc/decode_step.cpp calls from qgemv.cpp. Both are compiled into one library per instruction set
// (inference/qgemv.py); QGEMV_NAMESPACE names that build, so two builds loaded in one process never share a symbol.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace QGEMV_NAMESPACE {

// y[m, n] = sum_k x[m, k] * w[n, k]: the integer kernel up to `dense_rows` rows (every row if negative), bf16 matrix
// products on the dequantized weights above; the `q_linear` op. `supers` (not empty): Q4_K's compact scales.
at::Tensor q_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& mins,
                    int64_t bits, int64_t dense_rows, const std::optional<at::Tensor>& supers = std::nullopt);

}  // namespace QGEMV_NAMESPACE
