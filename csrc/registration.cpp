// Every torch.ops.cggr schema, in one place.
#include <torch/library.h>

TORCH_LIBRARY(cggr, m) {
  // The fake (meta) kernels are registered in Python: when one is missing (torch.compile without
  // `import cggr.selection_ops`), torch's error names this module.
  m.set_python_module("cggr.selection_ops");
  // Selection ops: boolean mask of scores' shape; quota k = ceil(ratio * n_valid) computed on device.
  m.def("select_topk(Tensor scores, Tensor? valid, Tensor ratio) -> Tensor");
  m.def("select_stratified(Tensor scores, Tensor? valid, Tensor ratio, int num_strata, int seed) -> Tensor");
  m.def("select_sequence_aware(Tensor scores, Tensor? valid, Tensor ratio, int min_tokens_per_sequence) -> Tensor");
  // Flat indices of a mask's True entries into a fixed-capacity buffer (padded with -1): no host sync.
  m.def("compact_indices(Tensor mask, int capacity) -> (Tensor, Tensor)");
}
