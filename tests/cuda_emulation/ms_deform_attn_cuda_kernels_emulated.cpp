// TEST-ONLY: the real models/ops/csrc/ms_deform_attn_cuda_kernels.cu compiled as C++, its kernels
// launched on host threads (cuda_device_emulation.h). A .cpp because torch's extension builder hands
// every .cu file to nvcc. Built with the real ms_deform_attn_cuda.cpp by tests/test_ms_deform_attn_kernels.py.
#include "cuda_device_emulation.h"

#include "ms_deform_attn_cuda_kernels.cu"
