// The Python module maskvl._C. Importing it runs the static TORCH_LIBRARY_IMPL(maskvl, CPU, ...)
// registrations of the other files; the op schemas themselves are defined from Python
// (maskvl/ops/_library.py), which maskvl._ext imports first. Plain CPython API, no pybind11: the
// module has no Python-level functions, so the heavy torch/extension.h header is not needed.
#include <Python.h>

static struct PyModuleDef maskvl_c_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "maskvl CPU kernels; importing registers maskvl::{loo_attention, head_distances, vector_distances, "
    "decode_attention} for the CPU dispatch key.",
    -1, nullptr, nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&maskvl_c_module); }
