// The compiled module maskvl._C_impl, imported by maskvl/_C.py after torch (whose shared libraries
// this library links against). Importing it runs the static TORCH_LIBRARY_IMPL(maskvl, CPU, ...)
// registrations of the other files; the op schemas themselves are defined from Python
// (maskvl/ops/<op>.py). Plain CPython API, no pybind11: the module has no Python-level functions,
// so the heavy torch/extension.h header is not needed.
#include <Python.h>

static struct PyModuleDef maskvl_c_impl_module = {
    PyModuleDef_HEAD_INIT, "_C_impl",
    "maskvl CPU kernels; importing registers maskvl::{loo_attention, loo_group_attention, head_distances, "
    "vector_distances, decode_attention, gated_delta_knockout} for the CPU dispatch key (import maskvl._C, "
    "which imports torch first).",
    -1, nullptr, nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC PyInit__C_impl(void) { return PyModule_Create(&maskvl_c_impl_module); }
