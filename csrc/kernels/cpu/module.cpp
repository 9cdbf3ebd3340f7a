// The Python module object of megatron_ds._C_kernels. It exports nothing itself: importing it
// loads the shared library, and the TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL blocks of the
// other files in this directory register the torch.ops.megatron_ds.* operators.
#include <Python.h>

static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_kernels", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C_kernels(void) { return PyModule_Create(&module_def); }
