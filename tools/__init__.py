"""Developer tools, kept outside the installed package: run them from the repository root.

    python -m tools.triton_check     # compile every Triton kernel for sm_80/sm_90, resource usage
    python -m tools.nvcc_check       # compile every csrc/cuda/*.cu with ptxas -v
    python -m tools.gpu_probe        # GPU probes (attn-fault, topk-tiles)
    python -m tools.topk_threshold_sim   # top-k threshold on clustered keys, CPU
    bash tools/gpu_suite.sh [out-dir]    # the whole GPU check in one command
"""
