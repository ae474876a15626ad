// Host emulation of the CUDA headers optim_cuda.cu includes (tests/cuda_host_emulation.py).
#pragma once
#include "emu.h"
