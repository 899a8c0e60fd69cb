// CUB's device-wide radix sort under fastattr's CPU emulation: its contract, not its algorithm
// (kernels/cuda_emu/cub_device.h says what that means).
#pragma once
#include "../../../cub_device.h"
