// The library's torch ops (torch.ops.llama_node): the matmul over GGUF blocks of ggml_mm.cpp, for one matrix and for
// a row-stack of matrices of different types (llama_shard.ggml_linear's GGMLLinear and GGMLStack).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ggml_kernels.h"
#include "ggml_mm.h"

#include <cstdint>
#include <vector>

namespace {

void check_x(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.device().is_cpu(), "ggml_mm runs on CPU");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k && x.scalar_type() == at::kFloat, "ggml_mm: x must be fp32 [M, K]");
}

llama_node::MMPart part(const at::Tensor& w, int64_t qtype, int64_t k) {
  const int64_t row_bytes = llama_node::ggml_row_bytes(qtype, k);
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.size(1) == row_bytes && w.scalar_type() == at::kByte &&
                  w.is_contiguous(),
              "ggml_mm: w must be contiguous uint8 [N, ", row_bytes, "] on CPU");
  return {w.data_ptr<uint8_t>(), qtype, w.size(0)};
}

at::Tensor ggml_mm(const at::Tensor& x, const at::Tensor& w, int64_t qtype, int64_t k, bool scalar) {
  check_x(x, k);
  const llama_node::MMPart p = part(w, qtype, k);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({xc.size(0), w.size(0)}, xc.options());
  llama_node::ggml_mm_parts_into(xc.data_ptr<float>(), xc.size(0), k, &p, 1, y.data_ptr<float>(), scalar);
  return y;
}

// y [M, sum of the ws' rows] = x @ cat(ws).T, ws[i] of type qtypes[i]
at::Tensor ggml_mm_parts(const at::Tensor& x, at::TensorList ws, at::IntArrayRef qtypes, int64_t k, bool scalar) {
  check_x(x, k);
  TORCH_CHECK(ws.size() == qtypes.size() && !ws.empty(), "ggml_mm_parts: one type per matrix, at least one");
  std::vector<llama_node::MMPart> parts;
  int64_t n = 0;
  for (size_t i = 0; i < ws.size(); ++i) {
    parts.push_back(part(ws[i], qtypes[i], k));
    n += ws[i].size(0);
  }
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({xc.size(0), n}, xc.options());
  llama_node::ggml_mm_parts_into(xc.data_ptr<float>(), xc.size(0), k, parts.data(), static_cast<int64_t>(parts.size()),
                                 y.data_ptr<float>(), scalar);
  return y;
}

bool has_avx2() { return LN_AVX2 != 0; }

}  // namespace

TORCH_LIBRARY(llama_node, m) {
  m.def("ggml_mm(Tensor x, Tensor w, int qtype, int k, bool scalar=False) -> Tensor");
  m.def("ggml_mm_parts(Tensor x, Tensor[] ws, int[] qtypes, int k, bool scalar=False) -> Tensor");
  m.def("ggml_has_avx2() -> bool", &has_avx2);
}

TORCH_LIBRARY_IMPL(llama_node, CPU, m) {
  m.impl("ggml_mm", &ggml_mm);
  m.impl("ggml_mm_parts", &ggml_mm_parts);
}
