// Half-precision types under fastattr's CPU emulation (kernels/cuda_emu/half.h).
#pragma once
#include "../half.h"
