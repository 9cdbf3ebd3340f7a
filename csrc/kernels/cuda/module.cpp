// The Python module object of megatron_ds._C_kernels_cuda. Importing it loads the library, whose
// TORCH_LIBRARY_IMPL(megatron_ds, CUDA, m) blocks add CUDA kernels to the operators that
// megatron_ds._C_kernels defines (load that one first).
#include <Python.h>

static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_kernels_cuda", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C_kernels_cuda(void) { return PyModule_Create(&module_def); }
