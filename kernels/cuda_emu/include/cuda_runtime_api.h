// The CUDA runtime API under fastattr's CPU emulation (kernels/cuda_emu/runtime.h).
#pragma once
#include "../runtime.h"
#include "../half.h"
