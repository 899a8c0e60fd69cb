// CUB's block primitives under fastattr's CPU emulation: its own versions (kernels/cuda_emu/cub.h).
#pragma once
#include "../../../cub.h"
