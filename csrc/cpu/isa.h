// Instruction-set variants of the CPU kernels.
//
// setup.py compiles every kernel source (csrc/cpu/*.cpp but bindings.cpp) once per variant, with
// the variant's -march and L2M_CPU_ISA naming it: isa_default (no -march, every x86-64 or other
// CPU), isa_avx2 (-march=x86-64-v3) and isa_avx512 (-march=x86-64-v4) on x86-64. Each copy lives
// in the inline namespace l2m::cpu::<variant>, so the copies link into one extension without
// clashing, and kernel_table.cpp gathers each copy's launchers into that variant's KernelTable
// (kernels.h), from which bindings.cpp picks one at import. Include this header first in a kernel
// source: the launcher declarations of the op headers depend on it.
#pragma once

// Without a definition (the baseline copy, or a build outside setup.py) the code is the default
// variant.
#ifndef L2M_CPU_ISA
#define L2M_CPU_ISA isa_default
#endif
