// The Python module cggr._C: only build facts live here; every op goes through the dispatcher
// (see registration.cpp), so importing this module is what loads the ops.
#include <pybind11/pybind11.h>

PYBIND11_MODULE(_C, m) {
#ifdef CGGR_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
