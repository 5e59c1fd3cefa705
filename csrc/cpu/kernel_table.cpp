// The dispatch table of one instruction-set variant: this variant's copy of every launcher
// (kernels.h). Compiled once per variant, like the kernel sources.
#include "isa.h"
#include "kernels.h"

namespace l2m::cpu {
inline namespace L2M_CPU_ISA {

const KernelTable kernel_table = {
#define L2M_CPU_KERNEL_ENTRY(launcher, Params) &launcher,
    L2M_CPU_KERNELS(L2M_CPU_KERNEL_ENTRY)
#undef L2M_CPU_KERNEL_ENTRY
};

}  // namespace L2M_CPU_ISA
}  // namespace l2m::cpu
