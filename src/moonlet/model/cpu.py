"""What this CPU computes fast, probed once: kernels are chosen by it (measured on two VMs, docs/LOG.md
2026-12-02: an AVX2-only one and an Intel Xeon with AMX)."""

import torch

# bf16 matmul instructions (avx512_bf16 / AMX): torch's bf16 GEMMs (oneDNN) run faster than fp32 there
# (2.0-2.7 TFLOP/s vs ~300 on the AMX VM); without them several times slower than fp32 (~6x on AVX2)
CPU_NATIVE_BF16 = torch.cpu._is_avx512_bf16_supported()
