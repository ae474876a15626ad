// Host emulation of the CUDA headers csrc/cuda/*.cu include (tests/cuda_host_emulation.py).
#pragma once
#include "emu.h"
