// The Python module of herd's C++ kernels: kernels.cpp and decode.cpp as one translation unit (decode.cpp uses
// kernels.cpp's matmuls, thread pool and simd.h), compiled by setup.py once per instruction set into
// herd/cpu/_kernels_<isa>; extension.py imports the one this CPU runs. Knows nothing beyond the function list.
#include "kernels.cpp"
#include "decode.cpp"

#ifndef HERD_SOURCES_SHA
#define HERD_SOURCES_SHA "unknown"
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "herd's CPU kernels (" HERD_ISA "): int4/int8 decode matmuls, fp32 rows, int4 dequantization, decode steps";
  m.attr("isa") = HERD_ISA;
  // setup.py's sha256 of simd.h, kernels.cpp, decode.cpp and this file: extension.py refuses a build older than them
  m.attr("sources_sha") = HERD_SOURCES_SHA;
  // The products and layers run without the GIL (they touch no Python object): a server's event loop and its
  // other threads run Python while a decode step computes, instead of waiting for its ~30 layer calls to end.
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("int4_mm", &int4_mm, nogil, "x (M, K) fp32 times an int4 stream -> (M, N) fp32");
  m.def("int8_mm", &int8_mm, nogil, "x (M, K) fp32 times an int8 stream with row scales -> (M, N) fp32");
  m.def("gguf_mm", &gguf_mm, nogil, "x (M, K) fp32 times GGUF Q4_0 / Q4_1 / Q8_0 blocks read in place -> (M, N)");
  m.def("int8_rows", &int8_rows, "rows of an int8 stream times their scales -> fp32 (a tied int8 embedding)");
  m.def("fp32_mm", &fp32_mm, nogil, "x (M, K) fp32 times w_t (K, N) fp32 -> (M, N) fp32, for few rows");
  m.def("int4_dequantize", &int4_dequantize, nogil, "an int4 stream -> the weight transposed, (K, N) bf16 or fp32");
  m.def("quantize_x", &quantize_x, "x (M, K) fp32 -> the kernels' int16 activations and their scales");
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dim, fp32");
  m.def("decode_qkv", &decode_qkv, "one token's fused q|k|v -> rotary, QK-norm and q scale applied");
  m.def("attend_one", &attend_one, "one query over a KV cache, masked by positions and chunk");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a fused gate|up");
  m.def("decode_layer", &decode_layer, nogil, "one whole decoder layer for one token");
  m.def("decode_layer_rows", &decode_layer_rows, nogil, "one whole decoder layer for B tokens, each its own cache row");
  py::class_<LayerStack, std::shared_ptr<LayerStack>>(m, "LayerStack")
      .def("__len__", [](const LayerStack& s) { return s.layers.size(); });
  m.def("layer_stack", &layer_stack, "a model's decode layers' weights, checked once, for decode_step");
  m.def("decode_step", &decode_step, nogil, "one token through every layer of a LayerStack");
}
