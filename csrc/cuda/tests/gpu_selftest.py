"""Standalone GPU check of the CUDA kernels, independent of the l2m_kernels Python layer.

Builds csrc/cuda/*.cu + bindings.cpp with torch.utils.cpp_extension.load (or imports an already
built module with --module), then checks the low-level functions against the references (loaded
by path):

- merge (l2m_kernels/ops/merge/reference.py, float64): the four merge functions over dtypes, odd
  and large D, empty and single rows, misaligned row starts (scalar path and peeled vector path),
  -inf and NaN rows, extreme gates, and outputs pre-filled with NaN;
- topk (l2m_kernels/ops/topk_read/reference.py): topk_read_fwd / topk_read_bwd in float32,
  float16 and bfloat16 with outputs pre-filled with NaN: the selection checked robustly (a valid
  top-k of the float64 scores, in descending order; exactly the reference's on exact ties and NaN
  rows), out / weights / lse and dq / dkeys / dvalues by relative RMS error against the float64
  reference evaluated at the kernel's selection, over odd sizes, k in {1 .. 256, N}, valid_len < k
  and 0, grouped heads, shared memories, ties, NaN query rows, -inf scores, empty batches, both
  backward modes (deterministic: bitwise repeatable), and bad calls. Every case runs the forward
  with and without the threshold pre-pass (use_threshold=True / False; the two must agree
  bitwise), plus cases where the threshold matters: N >= 128 * k, valid_len < k and 0, N < 128,
  fewer chunks than k, k = N = 1, exact ties across chunks, sorted score ramps.

- pkm (l2m_kernels/ops/product_key/reference.py): product_key_fwd / product_key_bwd in float32,
  float16 and bfloat16 with outputs pre-filled with NaN: the selection checked exactly on
  integer-valued data (ties everywhere) and on NaN query rows, robustly otherwise (a valid top-k
  of the float64 candidate scores); out / weights / lse and dq / dsubkeys / dvalues by relative
  RMS error against the float64 reference at the kernel's selection (dense atomic, dense
  deterministic and bitwise repeatable, sparse per-entry rows), over odd sizes (n_sub 7/33, T 7,
  Dk 2/14/130/512, Dv 1/7/129/300/520), k = k_sub ** 2, k_sub = n_sub, k = 1, sum_heads both
  ways, empty batches, bad calls and out-of-range indices in the backward.

- write (l2m_kernels/ops/memory_write/reference.py and plan.py, loaded by path):
  gated_memory_write_fwd / _bwd in float32, float16 and bfloat16 with int32 and int64 indices,
  called as function.py's GPU launchers call them, against the float64 reference: forward out of
  place (every written slot pre-filled with NaN; unwritten slots bitwise unchanged) and in place
  (bitwise equal to out of place), all four gradients (every element the kernel must write
  pre-filled with NaN; bitwise repeatable; skipped entries zero), over odd sizes (N 7/63/129/512,
  D 1/7/64/129/256/300/520: one and several column chunks, vector and scalar paths, unaligned
  bases), T 7 and 64, kw 1/3/4, repeated slots within and across steps, -1 skips (with NaN
  weights), erase (.., D) and (.., 1), empty B / T / kw / N / D, and bad calls. Reports whether
  the forward is bitwise equal to the reference evaluated in float32 (expected; not a failure).
- dense: gated_dense_update_fwd / _bwd on 4-D broadcast views (stride 0; contiguous and strided
  index paths; 1-D, 3-D and 5-D shapes as the launcher reshapes them; > 2**24 elements through
  the grid-stride loop) against the float64 reference, gradients reduced like function.py, with
  huge and infinite logits / updates, NaN inputs, empty shapes, and outputs pre-filled with NaN.

- attn (l2m_kernels/ops/memory_attention/reference.py and the top-k read's reference, loaded by
  path): local_attention_fwd / _bwd in float32, float16, bfloat16 and (some cases) float64 with
  outputs pre-filled with NaN: out / lse and dq / dk / dv by relative RMS error against the
  float64 reference and its autograd gradients, over odd sizes (T 1/7/33/63/129, S >= T, D
  7/16/64/129/256, Dv != D, several column slices), grouped heads, window 1/5/S/> S/0 (out 0,
  lse -inf, zero gradients), bitwise repeatable backward, exact zeros in dk / dv of keys no query
  sees, empty B and T (dk, dv zeroed), NaN / inf k and v at masked positions and a NaN query row
  (rows that do not see them unchanged, the others non-finite exactly where the reference is);
  memory_read_weights (weights, dots, out) against the reference gather at the given lse, with
  shared memories, grouped heads, missing (-1) and out-of-range slots (weight 0), k = 0 / 1, T = 0,
  Dk / Dv up to 256; and bad calls.

Optionally times the kernels (--bench) and runs one merge launch with more than 2**31 rows
(--huge, ~52 GB of GPU memory).

    python csrc/cuda/tests/gpu_selftest.py [--ops merge,topk,pkm,write,dense,attn] [--quick]
                                           [--bench] [--huge] [--json out.json]
    compute-sanitizer --tool memcheck python csrc/cuda/tests/gpu_selftest.py --quick

Not collected by pytest (no test_ prefix) and not compiled by setup.py (it globs csrc/cuda/*.cu).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import re
import shlex
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[3]
CUDA_DIR = REPO_ROOT / "csrc" / "cuda"
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2,
             torch.float64: 1e-12}
NAN = float("nan")
NEG_INF = float("-inf")


def load_reference():
    path = REPO_ROOT / "l2m_kernels" / "ops" / "merge" / "reference.py"
    spec = importlib.util.spec_from_file_location("l2m_merge_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_extension(module_name: str | None, build_dir: str | None, verbose: bool):
    if module_name:
        return importlib.import_module(module_name)
    from torch.utils.cpp_extension import load

    major, minor = torch.cuda.get_device_capability()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
    if build_dir:
        os.makedirs(build_dir, exist_ok=True)
    sources = sorted(str(p) for p in CUDA_DIR.glob("*.cu")) + [str(CUDA_DIR / "bindings.cpp")]
    started = time.perf_counter()
    module = load(
        name="l2m_merge_cuda_selftest",
        sources=sources,
        # load() writes flags into build.ninja unquoted (setup.py's BuildExtension quotes them),
        # so the string-literal macro is shell-quoted here.
        extra_cflags=["-O3", "-std=c++17", shlex.quote(f'-DL2M_CUDA_ARCHS="{major}.{minor}"')],
        # The nvcc flags setup.py uses (no --use_fast_math: the sources refuse it).
        extra_cuda_cflags=["-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr"],
        build_directory=build_dir,
        verbose=verbose,
    )
    print(f"built/loaded extension in {time.perf_counter() - started:.1f}s "
          f"(CUDA_ARCHS={module.CUDA_ARCHS}, CUDART_VERSION={module.CUDART_VERSION})")
    return module


def rel_rms(actual: torch.Tensor, expected: torch.Tensor, scale: float = 0.0) -> float:
    """rms(actual - expected) / max(rms(expected), scale) in float64; inf if NaN positions differ.

    `scale` floors the denominator for quantities that can cancel to near zero in a row (d_lse:
    dlse + wb * (pa - pb)); with one or two rows their relative error is that of single values.
    """
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, (a.shape, e.shape)
    if a.numel() == 0:
        return 0.0
    if not torch.equal(a.isnan(), e.isnan()):
        return math.inf
    same = (a == e) | (a.isnan() & e.isnan())
    diff = torch.where(same, torch.zeros_like(a), a - e)
    if not torch.isfinite(diff).all():
        return math.inf
    finite_e = torch.where(torch.isfinite(e), e, torch.zeros_like(e))
    denom = max(finite_e.square().mean().sqrt().item(), scale)
    num = diff.square().mean().sqrt().item()
    return num / denom if denom else num


def nan_filled(shape, dtype, *, misalign=0):
    """NaN-filled output buffer; misalign > 0 shifts its start by that many elements."""
    flat = torch.full((math.prod(shape) + misalign,), NAN, dtype=dtype, device="cuda")
    return flat[misalign:].view(shape)


def placed(tensor: torch.Tensor, misalign: int) -> torch.Tensor:
    """A contiguous copy of `tensor` whose data starts `misalign` elements after an allocation."""
    flat = torch.empty(tensor.numel() + misalign, dtype=tensor.dtype, device="cuda")
    view = flat[misalign:].view(tensor.shape)
    view.copy_(tensor)
    return view


class Checker:
    def __init__(self, ext, ref):
        self.ext, self.ref = ext, ref
        self.failures: list[str] = []
        self.cases = 0
        self.worst: dict[str, float] = {}

    def check(self, label: str, actual: torch.Tensor, expected: torch.Tensor, dtype,
              baseline: torch.Tensor | None = None, baseline_factor: float = 2.0,
              scale: float = 0.0):
        """Within the dtype's tolerance, or (flash-attention's rule) within twice the error of
        the same reference computed by PyTorch at the input dtype (`baseline`): with one or two
        rows, a single rounding or float32 accumulation over D can exceed the table on its own."""
        err = rel_rms(actual, expected, scale)
        limit = TOLERANCE[dtype]
        if baseline is not None:
            baseline_err = rel_rms(baseline, expected, scale)
            if math.isfinite(baseline_err):
                limit = max(limit, baseline_factor * baseline_err)
        key = f"{str(dtype).removeprefix('torch.')}"
        self.worst[key] = max(self.worst.get(key, 0.0), err)
        if not err <= limit:
            self.failures.append(f"{label}: rel RMS {err:.3e} > {limit:.1e}")

    # ---- merge_attention -----------------------------------------------------------------
    def merge_attention(self, rows, head_dim, dtype, *, misalign=(0, 0, 0), special_rows=False):
        self.cases += 1
        label = f"merge_attention R={rows} D={head_dim} {dtype} misalign={misalign}"
        out_a = torch.randn(rows, head_dim, device="cuda").to(dtype)
        out_b = torch.randn(rows, head_dim, device="cuda").to(dtype)
        lse_a = torch.randn(rows, device="cuda") * 4
        lse_b = torch.randn(rows, device="cuda") * 4
        if special_rows and rows >= 6:
            lse_a[0] = NEG_INF                     # side a empty
            lse_b[1] = NEG_INF                     # side b empty
            lse_a[2] = NEG_INF; lse_b[2] = NEG_INF  # both empty -> out 0, lse -inf
            lse_a[3] = 80.0; lse_b[3] = -80.0      # one side dominates
            lse_a[4] = NAN                         # NaN row (this row only)
            lse_b[5] = NAN
        dout = torch.randn(rows, head_dim, device="cuda").to(dtype)
        dlse = torch.randn(rows, device="cuda")

        ma, mb, mo = misalign
        out_a_k, out_b_k = placed(out_a, ma), placed(out_b, mb)
        out_k = nan_filled((rows, head_dim), dtype, misalign=mo)
        lse_k = nan_filled((rows,), torch.float32)
        self.ext.merge_attention_fwd(out_a_k, lse_a, out_b_k, lse_b, out_k, lse_k)

        # float64 reference with autograd
        a64 = out_a.double().requires_grad_(); b64 = out_b.double().requires_grad_()
        la64 = lse_a.double().requires_grad_(); lb64 = lse_b.double().requires_grad_()
        out_ref, lse_ref = self.ref.merge_attention_ref(a64, la64, b64, lb64)
        self.check(label + " out", out_k, out_ref, dtype)
        self.check(label + " lse", lse_k, lse_ref, torch.float32)
        if special_rows and rows >= 6:
            if not (out_k[2] == 0).all() or lse_k[2].item() != NEG_INF:
                self.failures.append(f"{label}: both -inf row is not out=0, lse=-inf")
            if not (out_k[4].isnan().all() and lse_k[4].isnan() and out_k[5].isnan().all()):
                self.failures.append(f"{label}: NaN row did not give NaN")
        finite_rows = lse_ref.isfinite() | lse_ref.isneginf()
        if rows and not torch.isfinite(out_k[finite_rows.cuda()]).all():
            self.failures.append(f"{label}: non-finite output in a finite row")

        # backward (kernel gets the kernel's own forward lse, as in autograd)
        g_out_a = nan_filled((rows, head_dim), dtype, misalign=ma)
        g_out_b = nan_filled((rows, head_dim), dtype, misalign=mb)
        g_lse_a = nan_filled((rows,), torch.float32)
        g_lse_b = nan_filled((rows,), torch.float32)
        self.ext.merge_attention_bwd(placed(dout, mo), dlse, out_a_k, lse_a, out_b_k, lse_b, lse_k,
                                     g_out_a, g_lse_a, g_out_b, g_lse_b)
        if rows:
            torch.autograd.backward((out_ref, lse_ref), (dout.double(), dlse.double()))
            # the same reference run by PyTorch at the input dtype: the baseline error
            leaves = [t.clone().requires_grad_() for t in (out_a, lse_a, out_b, lse_b)]
            low = self.ref.merge_attention_ref(*leaves)
            torch.autograd.backward(low, (dout, dlse))
            grads = {"d_out_a": (g_out_a, a64.grad, dtype, leaves[0].grad),
                     "d_out_b": (g_out_b, b64.grad, dtype, leaves[2].grad),
                     "d_lse_a": (g_lse_a, la64.grad, torch.float32, leaves[1].grad),
                     "d_lse_b": (g_lse_b, lb64.grad, torch.float32, leaves[3].grad)}
            keep = torch.ones(rows, dtype=torch.bool, device="cuda")
            if special_rows and rows >= 6:
                keep[4:6] = False  # NaN rows: the reference's gradient NaN pattern is its own affair
                for name, (actual, _, _, _) in grads.items():
                    if not actual[4:6].isnan().all():
                        self.failures.append(f"{label}: {name} of a NaN row is not NaN")
                for name in ("d_out_a", "d_lse_a", "d_out_b", "d_lse_b"):
                    if not (grads[name][0][2] == 0).all():
                        self.failures.append(f"{label}: {name} of the both -inf row is not 0")
            dlse_scale = dlse[keep].double().square().mean().sqrt().item()
            for name, (actual, expected, check_dtype, baseline) in grads.items():
                # d_lse = w * (dlse + ...) can cancel to ~0 in a row: judge it on dlse's scale.
                self.check(f"{label} {name}", actual[keep], expected[keep], check_dtype,
                           baseline[keep], scale=dlse_scale if "lse" in name else 0.0)
        torch.cuda.synchronize()

    # ---- gated_merge -----------------------------------------------------------------------
    def gated_merge(self, rows, head_dim, dtype, *, misalign=(0, 0, 0), special_rows=False):
        self.cases += 1
        label = f"gated_merge R={rows} D={head_dim} {dtype} misalign={misalign}"
        local = torch.randn(rows, head_dim, device="cuda").to(dtype)
        memory = torch.randn(rows, head_dim, device="cuda").to(dtype)
        gate = (torch.randn(rows, device="cuda") * 3).to(dtype)
        if special_rows and rows >= 4:
            gate[0] = 100.0; gate[1] = -100.0; gate[2] = 0.0; gate[3] = NAN
        dout = torch.randn(rows, head_dim, device="cuda").to(dtype)

        ml, mm, mo = misalign
        local_k, memory_k = placed(local, ml), placed(memory, mm)
        out_k = nan_filled((rows, head_dim), dtype, misalign=mo)
        self.ext.gated_merge_fwd(local_k, memory_k, gate, out_k)

        l64 = local.double().requires_grad_(); m64 = memory.double().requires_grad_()
        g64 = gate.double().requires_grad_()
        out_ref = self.ref.gated_merge_ref(l64, m64, g64.unsqueeze(-1))
        self.check(label + " out", out_k, out_ref, dtype)

        d_local = nan_filled((rows, head_dim), dtype, misalign=ml)
        d_mem = nan_filled((rows, head_dim), dtype, misalign=mm)
        d_gate = nan_filled((rows,), torch.float32)
        self.ext.gated_merge_bwd(placed(dout, mo), local_k, memory_k, gate, d_local, d_mem, d_gate)
        if rows:
            out_ref.backward(dout.double())
            leaves = [t.clone().requires_grad_() for t in (local, memory, gate)]
            self.ref.gated_merge_ref(leaves[0], leaves[1], leaves[2].unsqueeze(-1)).backward(dout)
            self.check(label + " d_local", d_local, l64.grad, dtype, leaves[0].grad)
            self.check(label + " d_mem", d_mem, m64.grad, dtype, leaves[1].grad)
            # d_gate is float32 from the same (rounded) inputs the reference sees; PyTorch's own
            # d_gate comes back in the gate's dtype, so it is no baseline for half types.
            self.check(label + " d_gate", d_gate, g64.grad, torch.float32,
                       leaves[2].grad if dtype == torch.float32 else None)
        torch.cuda.synchronize()


# ---- topk_memory_read ------------------------------------------------------------------------

def load_topk_reference():
    path = REPO_ROOT / "l2m_kernels" / "ops" / "topk_read" / "reference.py"
    spec = importlib.util.spec_from_file_location("l2m_topk_read_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN payloads included)."""
    if a.dtype.is_floating_point:
        view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.view(view), b.view(view))
    return torch.equal(a, b)


# (B, H, Hm, T, N, Dk, Dv, k, shared, valid_len, special)
TOPK_CASES = [
    (1, 1, 1, 7, 63, 7, 7, 5, False, None, None),
    (1, 1, 1, 7, 63, 1, 1, 1, False, None, None),
    (2, 3, 1, 7, 63, 7, 5, 3, False, None, None),
    (2, 4, 2, 7, 129, 64, 64, 32, False, [129, 40], None),
    (2, 4, 2, 7, 129, 64, 64, 1, False, [129, 40], None),
    (2, 2, 1, 7, 63, 64, 64, 63, False, [63, 5], None),           # k = N, valid_len < k
    (2, 4, 2, 7, 129, 129, 129, 129, False, None, None),          # k = N (K_PAD 256), D = 129
    (3, 2, 2, 6, 300, 32, 16, 256, True, [300, 0, 7], None),      # k = 256, shared, valid_len 0
    (1, 2, 2, 33, 1000, 64, 64, 32, False, None, None),
    (2, 4, 2, 9, 2100, 16, 24, 100, False, [2100, 1500], None),   # many tiles, K_PAD 128
    (2, 4, 2, 7, 129, 256, 256, 64, True, None, None),            # the largest Dk, Dv
    (2, 4, 2, 16, 60, 8, 8, 16, True, None, None),                # many queries per slot
    (2, 2, 2, 6, 40, 8, 4, 7, False, None, "ties"),
    (2, 2, 2, 6, 40, 8, 4, 40, False, [40, 13], "ties"),
    (1, 2, 2, 6, 50, 8, 8, 4, False, None, "nan"),
    (1, 1, 1, 5, 20, 8, 8, 20, False, None, "neginf"),
    (0, 2, 2, 5, 20, 8, 8, 4, False, None, None),                 # empty batch
    (0, 2, 2, 5, 20, 8, 8, 4, True, None, None),                  # empty batch, shared memory
    (2, 2, 2, 0, 20, 8, 8, 4, True, None, None),                  # T = 0
    # Threshold pre-pass (chunks of 128 slots; tau applies when N >= 128 * k, i.e. n_chunks >= k).
    (2, 2, 1, 9, 1000, 64, 32, 4, False, None, None),             # 8 chunks >= k
    (2, 2, 2, 7, 1000, 16, 16, 8, False, [1000, 5], None),        # valid_len < k (tau INT64_MIN)
    (2, 2, 2, 5, 1000, 16, 16, 8, True, [0, 1000], None),         # valid_len 0, shared
    (2, 2, 2, 6, 1000, 16, 16, 4, False, [385, 1000], None),      # exactly k chunks exist
    (1, 2, 1, 7, 100, 16, 16, 1, False, None, None),              # N < C, k = 1: tau = row max
    (1, 2, 1, 7, 100, 16, 16, 4, False, None, None),              # N < C, n_chunks < k
    (1, 1, 1, 5, 600, 16, 16, 8, False, None, None),              # n_chunks (5) < k
    (1, 2, 2, 5, 1, 8, 8, 1, False, None, None),                  # k = N = 1 (1 chunk)
    (2, 2, 2, 6, 1200, 8, 4, 7, False, None, "ties"),             # exact ties across chunks
    (2, 2, 2, 6, 1200, 8, 4, 1, False, [1200, 700], "ties"),
    (2, 2, 2, 5, 3000, 8, 8, 20, False, [3000, 2900], "ramp_up"),  # sorted ramps
    (2, 2, 2, 5, 3000, 8, 8, 20, False, None, "ramp_down"),
    (1, 2, 2, 5, 6000, 8, 8, 40, True, None, "ramp_up"),          # K_PAD 64
    (1, 2, 1, 4, 13000, 16, 8, 100, False, None, None),           # K_PAD 128, 102 chunks
    (1, 1, 1, 3, 33000, 8, 8, 256, True, None, "ramp_up"),        # K_PAD 256, 258 chunks
    (1, 2, 2, 6, 1000, 8, 8, 4, False, None, "nan"),
    (1, 2, 2, 7, 1100, 256, 256, 8, True, None, None),            # the largest Dk with tau
    (1, 2, 1, 7, 1000, 7, 5, 3, False, None, None),               # Dk % 8 != 0 (scalar loads)
    (1, 1, 1, 40, 4100, 64, 64, 32, False, None, None),           # 33 chunks, partial last
]
TOPK_QUICK = {0, 3, 5, 7, 8, 11, 12, 14, 15, 16, 18, 19, 20, 21, 22, 23, 27, 29, 33, 37}


class TopkChecker(Checker):
    """topk_read_fwd / topk_read_bwd against l2m_kernels/ops/topk_read/reference.py."""

    def __init__(self, ext, ref):
        super().__init__(ext, ref)

    def _inputs(self, case, dtype):
        B, H, Hm, T, N, Dk, Dv, k, shared, valid, special = case
        lead = (Hm, N) if shared else (B, Hm, N)
        scale = Dk ** -0.5
        if special == "ties":
            # Integer-valued data: every score is exact (also in 16 bits, scale 1), and duplicated
            # key rows tie across the k-th position.
            q = torch.randint(-2, 3, (B, H, T, Dk), device="cuda").to(dtype)
            base = torch.randint(-2, 3, (*lead[:-1], 5, Dk), device="cuda")
            keys = base[..., torch.randint(0, 5, (N,), device="cuda"), :].to(dtype).contiguous()
            scale = 1.0
        else:
            q = torch.randn(B, H, T, Dk, device="cuda").to(dtype)
            keys = torch.randn(*lead, Dk, device="cuda").to(dtype)
        if special in ("ramp_up", "ramp_down"):
            # Scores monotone in the slot (an online top-k sees a new best at every slot for
            # ramp_up): q[..., 0] > 0 against keys[..., n, 0] = +-n / N, other features 0.
            q = torch.zeros(B, H, T, Dk, device="cuda")
            q[..., 0] = torch.rand(B, H, T, device="cuda") + 0.5
            q = q.to(dtype)
            ramp = torch.arange(N, device="cuda", dtype=torch.float32) / N
            keys = torch.zeros(*lead, Dk, device="cuda")
            keys[..., 0] = ramp if special == "ramp_up" else -ramp
            keys = keys.to(dtype)
        values = torch.randn(*lead, Dv, device="cuda").to(dtype)
        if special == "nan" and B * T:
            q[0, H - 1, T // 2, 0] = NAN
        if special == "neginf":
            # Slot 3 scores exactly -inf for every query: q[..., 0] > 0 against [-inf, 0, ...].
            q[..., 0] = q[..., 0].abs() + 0.5
            keys[..., 3, :] = 0.0
            keys[..., 3, 0] = NEG_INF
        valid_len = None if valid is None else torch.tensor(valid, dtype=torch.int64, device="cuda")
        return q, keys, values, k, scale, valid_len

    def _selection_problems(self, q, keys, indices, valid_len, scale, nan_rows):
        """The kernel's selection is a valid top-k of the float64 scores (robust check)."""
        B, H, T, _ = q.shape
        Hm, N = keys.shape[-3], keys.shape[-2]
        k = indices.shape[-1]
        kk = keys.double()
        kk = kk.unsqueeze(0).expand(B, *kk.shape) if kk.dim() == 3 else kk
        kk = kk.repeat_interleave(H // Hm, dim=1)
        s = (q.double() * scale) @ kk.transpose(-1, -2)  # (B, H, T, N)
        exists = torch.ones(B, N, dtype=torch.bool, device="cuda")
        if valid_len is not None:
            exists = torch.arange(N, device="cuda")[None, :] < valid_len[:, None]
        exists = exists[:, None, None, :].expand_as(s)
        keep = ~nan_rows  # NaN rows are checked exactly against the reference elsewhere
        problems = []
        want_count = exists.sum(-1).clamp(max=k)
        if not torch.equal((indices >= 0).sum(-1), want_count):
            problems.append("wrong number of selected slots")
        if ((indices < -1) | (indices >= N)).any():
            problems.append("index out of [-1, N)")
            return problems
        # Missing entries come last.
        live = indices >= 0
        if (live[..., 1:] & ~live[..., :-1]).any():
            problems.append("a missing entry (-1) before a selected one")
        hits = torch.zeros(s.shape, dtype=torch.int64, device="cuda").scatter_add_(
            -1, indices.clamp_min(0), live.long())
        if hits.max() > 1:
            problems.append("a slot was selected twice")
        chosen = hits > 0
        if (chosen & ~exists).any():
            problems.append("selected a slot that does not exist")
        finite = torch.where(s.isnan(), torch.full_like(s, float("inf")), s)
        slack = 1e-5 * max(1.0, finite[finite.isfinite()].abs().max().item() if finite.isfinite().any() else 1.0)
        inf = float("inf")
        lowest = torch.where(chosen, finite, torch.full_like(s, inf)).amin(-1)
        highest_left = torch.where(exists & ~chosen, finite, torch.full_like(s, -inf)).amax(-1)
        bad = keep & ~(lowest >= highest_left - slack) & ~(lowest == highest_left)
        if bad.any():
            problems.append(f"selection is not a top-k in {int(bad.sum())} rows")
        # Entries in descending score order.
        picked = torch.gather(finite, -1, indices.clamp_min(0))
        picked = torch.where(live, picked, torch.full_like(picked, -inf))
        drops = picked[..., 1:] > picked[..., :-1] + slack
        if (drops & keep[..., None]).any():
            problems.append("entries not in descending score order")
        return problems

    def topk_case(self, case, dtype, use_threshold=True):
        B, H, Hm, T, N, Dk, Dv, k, shared, valid, special = case
        self.cases += 1
        failures_before = len(self.failures)
        worst_before = dict(self.worst)
        self.worst = {}
        label = (f"topk B={B} H={H} Hm={Hm} T={T} N={N} Dk={Dk} Dv={Dv} k={k}"
                 f"{' shared' if shared else ''}{' valid_len=' + str(valid) if valid else ''}"
                 f"{' ' + special if special else ''} {str(dtype).removeprefix('torch.')}"
                 f" {'tau' if use_threshold else 'no-tau'}")
        q, keys, values, k, scale, valid_len = self._inputs(case, dtype)
        ext, ref = self.ext, self.ref

        def forward(threshold=use_threshold):
            out = nan_filled((B, H, T, Dv), dtype)
            indices = torch.full((B, H, T, k), -7, dtype=torch.int64, device="cuda")
            weights = nan_filled((B, H, T, k), torch.float32)
            lse = nan_filled((B, H, T), torch.float32)
            ext.topk_read_fwd(q, keys, values, valid_len, k, scale, out, indices, weights, lse,
                              threshold)
            return out, indices, weights, lse

        out, indices, weights, lse = forward()
        again = forward()
        if not all(bits_equal(a, b) for a, b in zip((out, indices, weights, lse), again)):
            self.failures.append(f"{label}: forward not bitwise repeatable")
        # Both paths score with the same code and select the same keys: identical outputs.
        other = forward(not use_threshold)
        if not all(bits_equal(a, b) for a, b in zip((out, indices, weights, lse), other)):
            self.failures.append(f"{label}: forward with and without the threshold differ")

        dout = torch.randn(B, H, T, Dv, device="cuda").to(dtype)
        dweights = torch.randn(B, H, T, k, device="cuda")
        dlse = torch.randn(B, H, T, device="cuda")

        def backward(deterministic):
            dq = nan_filled(tuple(q.shape), dtype)
            dkeys = nan_filled(tuple(keys.shape), dtype)
            dvalues = nan_filled(tuple(values.shape), dtype)
            ext.topk_read_bwd(dout, dweights, dlse, q, keys, values, indices, weights, scale,
                              deterministic, dq, dkeys, dvalues)
            return dq, dkeys, dvalues

        grads_atomic = backward(False)
        grads_det = backward(True)
        grads_det2 = backward(True)
        if not all(bits_equal(a, b) for a, b in zip(grads_det, grads_det2)):
            self.failures.append(f"{label}: deterministic backward not bitwise repeatable")

        if B * H * T == 0:
            for name, grad in zip(("dkeys", "dvalues"), (*grads_atomic[1:], *grads_det[1:])):
                if not (grad == 0).all():
                    self.failures.append(f"{label}: {name} of an empty batch is not all zeros")
            self._report(label, failures_before, worst_before)
            return

        nan_rows = q.isnan().any(-1)  # (B, H, T)
        for problem in self._selection_problems(q, keys, indices, valid_len, scale, nan_rows):
            self.failures.append(f"{label}: {problem}")
        ref_out, ref_indices, ref_w, ref_lse = ref.topk_memory_read_ref(
            q.double(), keys.double(), values.double(), k, scale, valid_len)
        if special == "ties" and not torch.equal(indices, ref_indices):
            self.failures.append(f"{label}: indices differ from the reference on exact ties")
        if nan_rows.any() and not torch.equal(indices[nan_rows], ref_indices[nan_rows]):
            self.failures.append(f"{label}: NaN row indices differ from the reference")
        if special == "neginf":
            has_slot3 = (indices == 3).any(-1)
            if not has_slot3.all():
                self.failures.append(f"{label}: the -inf slot was not kept (k = N)")
            elif not (weights[indices == 3] == 0).all():
                self.failures.append(f"{label}: the -inf slot has a nonzero weight")

        # The reference evaluated at the kernel's selection, in float64 with autograd, and the
        # same at the input dtype (the baseline error).
        leaves = [t.double().requires_grad_() for t in (q, keys, values)]
        gathered = ref.topk_read_gather(*leaves, indices, scale)
        baseline = ref.topk_read_gather(q, keys, values, indices, scale)
        keep = ~nan_rows
        if nan_rows.any():
            if not (out[nan_rows].isnan().all() and lse[nan_rows].isnan().all()):
                self.failures.append(f"{label}: NaN row did not give NaN out / lse")
            if not (out[keep].isfinite().all() and (lse[keep].isfinite() | lse[keep].isneginf()).all()):
                self.failures.append(f"{label}: NaN leaked into another row")
        for name, actual, expected, base, check_dtype in (
                ("out", out, gathered[0], baseline[0], dtype),
                ("weights", weights, gathered[1], baseline[1], torch.float32),
                ("lse", lse, gathered[2], baseline[2], torch.float32)):
            self.check(f"{label} {name}", actual[keep], expected.detach()[keep], check_dtype,
                       base[keep])
        empty_rows = (indices < 0).all(-1)
        if empty_rows.any():
            if not ((out[empty_rows] == 0).all() and lse[empty_rows].isneginf().all()
                    and (weights[empty_rows] == 0).all()):
                self.failures.append(f"{label}: a row without slots is not out=0, lse=-inf, w=0")

        cotangents = (dout, dweights, dlse)
        expected = torch.autograd.grad(gathered, leaves, [c.double() for c in cotangents],
                                       allow_unused=True)
        low_leaves = [t.detach().clone().requires_grad_() for t in (q, keys, values)]
        low = ref.topk_read_gather(*low_leaves, indices, scale)
        low_grads = torch.autograd.grad(low, low_leaves, cotangents, allow_unused=True)
        # Memory rows a NaN query selected are NaN in every backend; compare the others.
        slot_mask_k = torch.ones(keys.shape[:-1], dtype=torch.bool, device="cuda")
        if nan_rows.any():
            group = H // Hm
            for b, h, t in nan_rows.nonzero().tolist():
                sel = indices[b, h, t]
                sel = sel[sel >= 0]
                if shared:
                    slot_mask_k[h // group, sel] = False
                else:
                    slot_mask_k[b, h // group, sel] = False
        for mode, grads in (("atomic", grads_atomic), ("deterministic", grads_det)):
            masks = (keep, slot_mask_k, slot_mask_k)
            for name, actual, exp, base, mask in zip(("dq", "dkeys", "dvalues"), grads, expected,
                                                      low_grads, masks):
                exp = torch.zeros_like(actual, dtype=torch.float64) if exp is None else exp
                base = None if base is None else base[mask]
                if special == "neginf" and name == "dq":
                    # 0 * (-inf) at feature 0 is NaN in every backend; compare the other features.
                    actual, exp = actual[..., 1:], exp[..., 1:]
                    base = None
                self.check(f"{label} {name} ({mode})", actual[mask], exp[mask], dtype, base)
                if nan_rows.any() and not actual[~mask].isnan().all():
                    self.failures.append(f"{label} {name} ({mode}): NaN row's gradient not NaN")
        # Deterministic and atomic modes agree (both are also checked against the reference).
        for name, a, d, mask in zip(("dq", "dkeys", "dvalues"), grads_atomic, grads_det,
                                    (keep, slot_mask_k, slot_mask_k)):
            if special == "neginf" and name == "dq":
                a, d = a[..., 1:], d[..., 1:]
            self.check(f"{label} {name} deterministic vs atomic", d[mask], a[mask].double(), dtype)
        torch.cuda.synchronize()
        self._report(label, failures_before, worst_before)

    def _report(self, label, failures_before, worst_before):
        case_worst = max(self.worst.values(), default=0.0)
        for key, value in worst_before.items():
            self.worst[key] = max(self.worst.get(key, 0.0), value)
        problems = len(self.failures) - failures_before
        print(f"  {'ok  ' if problems == 0 else 'FAIL'} {label}: worst rel RMS {case_worst:.2e}"
              + (f", {problems} problem(s)" if problems else ""))


def run_topk_checks(ext, quick: bool) -> TopkChecker:
    checker = TopkChecker(ext, load_topk_reference())
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for number, case in enumerate(TOPK_CASES):
            if quick and number not in TOPK_QUICK:
                continue
            for use_threshold in (True, False):
                try:
                    checker.topk_case(case, dtype, use_threshold)
                except Exception as error:  # report and go on: one broken case must not hide others
                    checker.failures.append(f"topk case {case} {dtype} threshold={use_threshold}: "
                                            f"raised {type(error).__name__}: {error}")
                    print(f"  FAIL topk case {case} {dtype} threshold={use_threshold}: raised "
                          f"{type(error).__name__}: {error}")
    return checker


def check_topk_errors(ext) -> list[str]:
    """Bad topk calls raise (and never launch)."""
    problems = []
    B, H, T, N, D, k = 2, 2, 3, 16, 8, 4

    def outputs(dtype=torch.float32, k=k, Dv=D):
        return (torch.empty(B, H, T, Dv, dtype=dtype, device="cuda"),
                torch.empty(B, H, T, k, dtype=torch.int64, device="cuda"),
                torch.empty(B, H, T, k, device="cuda"), torch.empty(B, H, T, device="cuda"))

    q = torch.randn(B, H, T, D, device="cuda")
    keys = torch.randn(B, H, N, D, device="cuda")
    values = torch.randn(B, H, N, D, device="cuda")
    cases = {
        "cpu tensor": lambda: ext.topk_read_fwd(q.cpu(), keys.cpu(), values.cpu(), None, k, 1.0,
                                                *(t.cpu() for t in outputs())),
        "float64": lambda: ext.topk_read_fwd(q.double(), keys.double(), values.double(), None, k,
                                             1.0, *outputs(torch.float64)),
        "k > N": lambda: ext.topk_read_fwd(q, keys, values, None, N + 1, 1.0, *outputs(k=N + 1)),
        "k = 0": lambda: ext.topk_read_fwd(q, keys, values, None, 0, 1.0, *outputs(k=0)),
        "out shape": lambda: ext.topk_read_fwd(q, keys, values, None, k, 1.0, *outputs(Dv=D + 1)),
        "keys shape": lambda: ext.topk_read_fwd(q, keys[:, :, :, :-1].contiguous(), values, None,
                                                k, 1.0, *outputs()),
        "heads": lambda: ext.topk_read_fwd(torch.randn(B, 3, T, D, device="cuda"), keys, values,
                                           None, k, 1.0, *outputs()),
        "Dk > 256": lambda: ext.topk_read_fwd(torch.randn(B, H, T, 300, device="cuda"),
                                              torch.randn(B, H, N, 300, device="cuda"), values,
                                              None, k, 1.0, *outputs()),
        "valid_len int32": lambda: ext.topk_read_fwd(q, keys, values,
                                                     torch.full((B,), N, dtype=torch.int32,
                                                                device="cuda"),
                                                     k, 1.0, *outputs()),
        "valid_len shape": lambda: ext.topk_read_fwd(q, keys, values,
                                                     torch.full((B + 1,), N, dtype=torch.int64,
                                                                device="cuda"),
                                                     k, 1.0, *outputs()),
        "non-contiguous": lambda: ext.topk_read_fwd(q.transpose(2, 3).contiguous().transpose(2, 3),
                                                    keys, values, None, k, 1.0, *outputs()),
        "bwd dkeys shape": lambda: ext.topk_read_bwd(
            torch.randn(B, H, T, D, device="cuda"), torch.randn(B, H, T, k, device="cuda"),
            torch.randn(B, H, T, device="cuda"), q, keys, values,
            torch.zeros(B, H, T, k, dtype=torch.int64, device="cuda"),
            torch.rand(B, H, T, k, device="cuda"), 1.0, False, torch.empty_like(q),
            torch.empty(B, H, N - 1, D, device="cuda"), torch.empty_like(values)),
        "bwd indices dtype": lambda: ext.topk_read_bwd(
            torch.randn(B, H, T, D, device="cuda"), torch.randn(B, H, T, k, device="cuda"),
            torch.randn(B, H, T, device="cuda"), q, keys, values,
            torch.zeros(B, H, T, k, dtype=torch.int32, device="cuda"),
            torch.rand(B, H, T, k, device="cuda"), 1.0, True, torch.empty_like(q),
            torch.empty_like(keys), torch.empty_like(values)),
    }
    for name, call in cases.items():
        try:
            call()
        except (RuntimeError, ValueError, TypeError, NotImplementedError) as error:
            print(f"  bad topk call '{name}' raised {type(error).__name__}: "
                  f"{str(error).splitlines()[0]}")
        else:
            problems.append(f"bad topk call '{name}' did not raise")
    torch.cuda.synchronize()
    return problems


def bench_topk(ext) -> list[dict]:
    """topk_read fwd/bwd at the read-gpu shape: B=8, H=1, T=4096, N=65536, D=64, k=32, bf16."""
    try:
        from triton.testing import do_bench
    except ImportError:  # pragma: no cover
        do_bench = None

    def timed(fn):
        if do_bench is not None:
            return do_bench(fn, warmup=5, rep=50) * 1e-3
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1e-3 / 5

    results = []
    shapes = [("read-gpu B8 H1 T4096 N65536 D64 k32", 8, 1, 1, 4096, 65536, 64, 32),
              ("read-heads-gpu B16 H8 T512 N16384 D64 k32", 16, 8, 8, 512, 16384, 64, 32)]
    for name, B, H, Hm, T, N, D, k in shapes:
        dtype = torch.bfloat16
        q = torch.randn(B, H, T, D, device="cuda").to(dtype)
        keys = torch.randn(B, Hm, N, D, device="cuda").to(dtype)
        values = torch.randn(B, Hm, N, D, device="cuda").to(dtype)
        out = torch.empty(B, H, T, D, dtype=dtype, device="cuda")
        indices = torch.empty(B, H, T, k, dtype=torch.int64, device="cuda")
        weights = torch.empty(B, H, T, k, device="cuda")
        lse = torch.empty(B, H, T, device="cuda")
        scale = D ** -0.5
        fwd = lambda t=True: ext.topk_read_fwd(q, keys, values, None, k, scale, out, indices,
                                               weights, lse, t)
        fwd()
        dout, dweights, dlse = torch.randn_like(out), torch.randn_like(weights), torch.randn_like(lse)
        dq, dkeys, dvalues = torch.empty_like(q), torch.empty_like(keys), torch.empty_like(values)
        ops = {"topk_read_fwd": fwd, "topk_read_fwd no-tau": lambda: fwd(False)}
        for deterministic in (False, True):
            ops[f"topk_read_bwd{' det' if deterministic else ''}"] = (
                lambda d=deterministic: ext.topk_read_bwd(dout, dweights, dlse, q, keys, values,
                                                          indices, weights, scale, d, dq, dkeys,
                                                          dvalues))
        flops = 2 * B * H * T * N * D
        for op, fn in ops.items():
            seconds = timed(fn)
            entry = {"shape": name, "dtype": "bfloat16", "op": op, "ms": seconds * 1e3}
            if op.startswith("topk_read_fwd"):
                entry["score_TFLOPs"] = flops / seconds / 1e12
            results.append(entry)
            print(f"  {op:22s} {name:42s} {entry['ms']:9.3f} ms"
                  + (f"  ({entry['score_TFLOPs']:.1f} TFLOP/s of scores)" if "score_TFLOPs" in entry
                     else ""))
        del q, keys, values, dkeys, dvalues
        torch.cuda.empty_cache()
    return results


def run_checks(ext, ref, quick: bool) -> Checker:
    checker = Checker(ext, ref)
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    head_dims = (1, 2, 3, 7, 8, 16, 63, 64, 129) if quick else (
        1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 96, 127, 128, 129, 255, 256,
        257, 512, 1000, 1024, 4096)
    row_counts = (0, 1, 6, 37) if quick else (0, 1, 2, 6, 37, 300, 2049)
    # misalignment (elements) of the three (R, D) tensors of a call: all aligned; all shifted
    # alike (vector path with peeled head/tail); shifted differently (scalar path).
    misaligns = ((0, 0, 0), (1, 1, 1), (0, 1, 3), (3, 3, 3))
    for dtype in dtypes:
        for head_dim in head_dims:
            for rows in row_counts:
                for misalign in misaligns if rows in (6, 37) else ((0, 0, 0),):
                    special = rows >= 6 and misalign == (0, 0, 0)
                    checker.merge_attention(rows, head_dim, dtype, misalign=misalign,
                                            special_rows=special)
                    checker.gated_merge(rows, head_dim, dtype, misalign=misalign,
                                        special_rows=special)
    # large row count through the grid-stride loop (more rows than resident threads)
    for dtype in dtypes:
        checker.merge_attention(300_000, 5, dtype)
        checker.gated_merge(300_000, 5, dtype)
        if not quick:
            checker.merge_attention(70_000, 64, dtype, special_rows=True)
            checker.gated_merge(70_000, 64, dtype, special_rows=True)
    return checker


def check_errors(ext) -> list[str]:
    """Bad calls raise (and never launch)."""
    problems = []
    x = torch.randn(4, 8, device="cuda")
    lse = torch.randn(4, device="cuda")
    cases = {
        "cpu tensor": lambda: ext.gated_merge_fwd(x.cpu(), x.cpu(), lse.cpu(), x.cpu()),
        "float64": lambda: ext.gated_merge_fwd(x.double(), x.double(), lse.double(), x.double()),
        "shape": lambda: ext.merge_attention_fwd(x, lse, x[:3], lse, torch.empty_like(x), lse),
        "non-contiguous": lambda: ext.gated_merge_fwd(x.t(), x.t(), torch.randn(8, device="cuda"),
                                                      torch.empty(8, 4, device="cuda")),
        "lse dtype": lambda: ext.merge_attention_fwd(x.half(), lse.half(), x.half(), lse.half(),
                                                     x.half(), lse.half()),
    }
    for name, call in cases.items():
        try:
            call()
        except (RuntimeError, ValueError, TypeError) as error:
            print(f"  bad call '{name}' raised {type(error).__name__}: {str(error).splitlines()[0]}")
        else:
            problems.append(f"bad call '{name}' did not raise")
    return problems


def bench(ext, ref) -> list[dict]:
    try:
        from triton.testing import do_bench
    except ImportError:  # pragma: no cover
        do_bench = None

    def timed(fn):
        if do_bench is not None:
            return do_bench(fn, warmup=50, rep=300) * 1e-3
        for _ in range(10):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(100):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1e-3 / 100

    results = []
    shapes = [("attn-gpu B8 H8 T1024 D64", 8 * 8 * 1024, 64), ("R=1M D=128", 1 << 20, 128),
              ("R=4M D=64", 1 << 22, 64), ("R=1M D=63 (peeled)", 1 << 20, 63)]
    for dtype in (torch.bfloat16, torch.float32):
        for name, rows, head_dim in shapes:
            size = dtype.itemsize
            a = torch.randn(rows, head_dim, device="cuda").to(dtype)
            b = torch.randn(rows, head_dim, device="cuda").to(dtype)
            c = torch.randn(rows, head_dim, device="cuda").to(dtype)
            la, lb = torch.randn(rows, device="cuda"), torch.randn(rows, device="cuda")
            gate = torch.randn(rows, device="cuda").to(dtype)
            out, out2 = torch.empty_like(a), torch.empty_like(a)
            lse, g1, g2 = (torch.empty(rows, device="cuda") for _ in range(3))
            row_bytes = rows * head_dim * size
            ops = {
                "merge_attention_fwd": (lambda: ext.merge_attention_fwd(a, la, b, lb, out, lse),
                                        3 * row_bytes + 3 * rows * 4,
                                        lambda: ref.merge_attention_ref(a, la, b, lb)),
                "merge_attention_bwd": (lambda: ext.merge_attention_bwd(c, la, a, la, b, lb, lse, out,
                                                                        g1, out2, g2),
                                        5 * row_bytes + 6 * rows * 4, None),
                "gated_merge_fwd": (lambda: ext.gated_merge_fwd(a, b, gate, out),
                                    3 * row_bytes + rows * size,
                                    lambda: ref.gated_merge_ref(a, b, gate.unsqueeze(-1))),
                "gated_merge_bwd": (lambda: ext.gated_merge_bwd(c, a, b, gate, out, out2, g1),
                                    5 * row_bytes + rows * (size + 4), None),
            }
            ext.merge_attention_fwd(a, la, b, lb, out, lse)  # a real lse for the backward
            copy_seconds = timed(lambda: out.copy_(a))
            for op, (fn, moved, reference_fn) in ops.items():
                seconds = timed(fn)
                entry = {"shape": name, "dtype": str(dtype).removeprefix("torch."), "op": op,
                         "rows": rows, "head_dim": head_dim, "us": seconds * 1e6,
                         "GBps": moved / seconds / 1e9,
                         "copy_GBps": 2 * row_bytes / copy_seconds / 1e9}
                if reference_fn is not None:
                    entry["torch_eager_us"] = timed(reference_fn) * 1e6
                results.append(entry)
                print(f"  {op:22s} {entry['dtype']:8s} {name:26s} {entry['us']:9.1f} us "
                      f"{entry['GBps']:7.0f} GB/s (copy {entry['copy_GBps']:.0f} GB/s)"
                      + (f"  torch eager {entry['torch_eager_us']:.1f} us"
                         if "torch_eager_us" in entry else ""))
            del a, b, c, out, out2
            torch.cuda.empty_cache()
    return results


def huge_rows(ext) -> list[str]:
    """One merge_attention_fwd over 2**31 + 17 rows (bfloat16, D=2): int64 rows and offsets."""
    rows, head_dim = (1 << 31) + 17, 2
    problems = []
    out_a = torch.ones(rows, head_dim, dtype=torch.bfloat16, device="cuda")
    out_b = torch.full((rows, head_dim), 3.0, dtype=torch.bfloat16, device="cuda")
    lse_a = torch.zeros(rows, device="cuda")
    lse_b = torch.zeros(rows, device="cuda")
    lse_b[-5:] = NEG_INF
    out = torch.full_like(out_a, NAN)
    lse = torch.full_like(lse_a, NAN)
    torch.cuda.synchronize()
    started = time.perf_counter()
    ext.merge_attention_fwd(out_a, lse_a, out_b, lse_b, out, lse)
    torch.cuda.synchronize()
    print(f"  huge: {rows} rows in {time.perf_counter() - started:.3f}s")
    del out_a, out_b, lse_a, lse_b  # room for the comparisons' temporaries
    torch.cuda.empty_cache()
    # equal lse: out = (1 + 3) / 2 = 2, lse = log 2; last 5 rows: out = 1, lse = 0
    if not bool((out[:-5] == 2).all()):
        problems.append("huge: wrong values in the body")
    if not bool((out[-5:] == 1).all()) or not bool((lse[-5:] == 0).all()):
        problems.append("huge: wrong values in the last rows")
    if not bool(((lse[:-5] - math.log(2)).abs() < 1e-6).all()):
        problems.append("huge: wrong lse")
    return problems


# ---- product_key_read ------------------------------------------------------------------------

def load_pkm_reference():
    path = REPO_ROOT / "l2m_kernels" / "ops" / "product_key" / "reference.py"
    spec = importlib.util.spec_from_file_location("l2m_product_key_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# (B, H, T, Dk, n_sub, Dv, k, k_sub, sum_heads, special)
# special: None (random data, selection checked robustly), "int" (integer-valued q / subkeys and
# scale 0.25: exact scores with many ties, selection checked exactly), "nan" (NaN query rows).
PKM_CASES = [
    (2, 2, 7, 14, 7, 7, 5, 3, False, None),
    (2, 2, 7, 14, 7, 7, 9, 3, True, None),           # k = k_sub ** 2
    (1, 3, 7, 2, 7, 1, 1, 7, False, None),           # k = 1, k_sub = n_sub, Dk 2, Dv 1
    (1, 3, 7, 2, 7, 1, 1, 7, True, None),
    (2, 2, 7, 130, 33, 129, 32, 33, True, None),     # k_sub = n_sub = 33, Dh 65, Dv 129
    (1, 2, 7, 130, 33, 129, 256, 16, False, None),   # k = 256 = k_sub ** 2
    (2, 2, 9, 64, 300, 64, 100, 200, False, None),   # K_PAD 128, KS_PAD 256, many tiles
    (1, 1, 5, 512, 256, 16, 256, 256, False, None),  # the largest Dk, k, k_sub (= n_sub)
    (1, 2, 5, 8, 16, 300, 4, 4, False, None),        # Dv > one chunk
    (1, 2, 4, 8, 16, 520, 4, 4, True, None),         # Dv multiple of 8, 3 chunks
    (2, 2, 7, 16, 33, 8, 16, 8, False, "int"),
    (2, 2, 7, 16, 33, 8, 64, 33, True, "int"),       # exact ties, k_sub = n_sub
    (2, 3, 7, 6, 7, 7, 49, 7, False, "int"),         # every slot, ties everywhere
    (1, 2, 6, 16, 20, 8, 8, 4, False, "nan"),
    (1, 2, 6, 16, 20, 8, 8, 4, True, "nan"),
    (0, 2, 5, 16, 7, 8, 4, 3, False, None),          # empty batch
    (0, 2, 5, 16, 7, 8, 4, 3, True, None),
    (2, 2, 0, 16, 7, 8, 4, 3, True, None),           # T = 0 (sum_heads)
    (2, 2, 0, 16, 7, 8, 4, 3, False, None),
]
PKM_QUICK = {0, 1, 2, 4, 7, 10, 13, 15}
INDEX_SENTINEL = -7  # indices are pre-filled with it: an unwritten entry fails the checks


class PkmChecker(Checker):
    def __init__(self, ext, ref):
        super().__init__(ext, ref)

    def half_scores64(self, q, subkeys, scale):
        half = q.shape[-1] // 2
        q64, s64 = q.double(), subkeys.double()
        s1 = torch.matmul(q64[..., :half], s64[:, 0].transpose(-1, -2)) * scale
        s2 = torch.matmul(q64[..., half:], s64[:, 1].transpose(-1, -2)) * scale
        return s1, s2

    def check_selection(self, label, indices, ref_indices, q, subkeys, scale, exact_rows):
        """indices valid, distinct per row; exact_rows (B, H, T) bool: equal to the reference's;
        other rows: a valid top-k of the float64 candidate scores (within float32 rounding)."""
        n_sub = subkeys.shape[-2]
        N = n_sub * n_sub
        if not ((indices >= 0) & (indices < N)).all():
            self.failures.append(f"{label}: indices out of [0, {N}) (unwritten: {INDEX_SENTINEL})")
            return
        sorted_idx = indices.sort(dim=-1).values
        if indices.shape[-1] > 1 and not (sorted_idx[..., 1:] != sorted_idx[..., :-1]).all():
            self.failures.append(f"{label}: duplicate indices in a row")
        if exact_rows.any() and not torch.equal(indices[exact_rows], ref_indices[exact_rows]):
            bad = (indices != ref_indices).any(-1) & exact_rows
            self.failures.append(f"{label}: selection differs from the reference on "
                                 f"{int(bad.sum())} exact row(s)")
        robust = ~exact_rows
        if robust.any():
            s1, s2 = self.half_scores64(q, subkeys, scale)
            def slot_scores(idx):
                return s1.gather(-1, idx // n_sub) + s2.gather(-1, idx % n_sub)
            ours, theirs = slot_scores(indices)[robust], slot_scores(ref_indices)[robust]
            magnitude = max(1.0, s1[robust].abs().max().item() + s2[robust].abs().max().item())
            tol = 2e-5 * magnitude
            if not ((ours - theirs).abs() <= tol).all():
                self.failures.append(f"{label}: selected scores differ from the reference's by "
                                     f"{(ours - theirs).abs().max().item():.3e} > {tol:.1e}")
            if ours.shape[-1] > 1 and not (ours[..., :-1] >= ours[..., 1:] - tol).all():
                self.failures.append(f"{label}: selection not in descending score order")

    def pkm_case(self, case, dtype):
        B, H, T, Dk, n_sub, Dv, k, k_sub, sum_heads, special = case
        self.cases += 1
        label = (f"pkm B={B} H={H} T={T} Dk={Dk} n_sub={n_sub} Dv={Dv} k={k} k_sub={k_sub} "
                 f"sum_heads={sum_heads} {special or 'random'} {str(dtype).removeprefix('torch.')}")
        failures_before = len(self.failures)
        ref = self.ref
        dev = "cuda"
        if special == "int":
            q = torch.randint(-2, 3, (B, H, T, Dk), device=dev).to(dtype)
            subkeys = torch.randint(-2, 3, (H, 2, n_sub, Dk // 2), device=dev).to(dtype)
            scale = 0.25
        else:
            q = torch.randn(B, H, T, Dk, device=dev).to(dtype)
            subkeys = torch.randn(H, 2, n_sub, Dk // 2, device=dev).to(dtype)
            scale = Dk ** -0.5 if Dk else 1.0
        values = torch.randn(n_sub * n_sub, Dv, device=dev).to(dtype)
        nan_rows = torch.zeros(B, H, T, dtype=torch.bool, device=dev)
        if special == "nan" and B * H * T:
            nan_rows[0, 0, min(1, T - 1)] = True
            nan_rows[-1, -1, T - 1] = True
            q[nan_rows] = NAN
        out_shape = (B, T, Dv) if sum_heads else (B, H, T, Dv)
        out = nan_filled(out_shape, dtype)
        indices = torch.full((B, H, T, k), INDEX_SENTINEL, dtype=torch.int64, device=dev)
        weights = nan_filled((B, H, T, k), torch.float32)
        lse = nan_filled((B, H, T), torch.float32)
        self.ext.product_key_fwd(q, subkeys, values, k, k_sub, scale, sum_heads, out, indices,
                                 weights, lse)
        torch.cuda.synchronize()

        ref_indices = ref.product_key_select(q, subkeys, k, k_sub, scale)
        exact_rows = nan_rows.clone() if special != "int" else torch.ones_like(nan_rows)
        if B * H * T:
            self.check_selection(label, indices, ref_indices, q, subkeys, scale, exact_rows)
        if len(self.failures) > failures_before:  # no point checking the rest against garbage
            print(f"  FAIL {label}")
            return
        use = indices.clamp(0, n_sub * n_sub - 1)

        # float64 reference at the kernel's selection, and the same in the input dtype (baseline).
        q64 = q.double().requires_grad_()
        s64 = subkeys.double().requires_grad_()
        v64 = values.double().requires_grad_()
        out64, w64, lse64 = ref.product_key_gather(q64, s64, v64, use, scale, sum_heads=sum_heads)
        qb = q.clone().requires_grad_()
        sb = subkeys.clone().requires_grad_()
        vb = values.clone().requires_grad_()
        outb, wb, lseb = ref.product_key_gather(qb, sb, vb, use, scale, sum_heads=sum_heads)
        self.check(label + " out", out, out64, dtype, baseline=outb)
        self.check(label + " weights", weights, w64, dtype, baseline=wb)
        self.check(label + " lse", lse, lse64, dtype, baseline=lseb, scale=1.0)

        # Backward.
        dout = torch.randn(out_shape, device=dev).to(dtype)
        dweights = torch.randn(B, H, T, k, device=dev)
        dlse = torch.randn(B, H, T, device=dev)
        grads64 = torch.autograd.grad((out64, w64, lse64), (q64, s64, v64),
                                      (dout.double(), dweights.double(), dlse.double()),
                                      allow_unused=True)
        grads64 = [g if g is not None else torch.zeros_like(x)
                   for g, x in zip(grads64, (q64, s64, v64))]
        gradsb = torch.autograd.grad((outb, wb, lseb), (qb, sb, vb), (dout, dweights, dlse),
                                     allow_unused=True)
        gradsb = [g if g is not None else torch.zeros_like(x) for g, x in zip(gradsb, (qb, sb, vb))]
        value_rows_expected = (weights.unsqueeze(-1) * (dout.unsqueeze(1) if sum_heads else dout)
                               .unsqueeze(-2).float()).reshape(-1, Dv).to(dtype)

        def run_bwd(sparse, deterministic):
            dq = nan_filled(q.shape, dtype)
            dsub = nan_filled(subkeys.shape, dtype)
            dval = nan_filled((B * H * T * k, Dv) if sparse else values.shape, dtype)
            self.ext.product_key_bwd(dout, dweights, dlse, q, subkeys, values, indices, weights,
                                     scale, sum_heads, sparse, deterministic, dq, dsub, dval)
            return dq, dsub, dval

        finite_rows = ~nan_rows
        for sparse in (False, True):
            for deterministic in (False, True):
                mode = f" bwd sparse={sparse} det={deterministic}"
                dq, dsub, dval = run_bwd(sparse, deterministic)
                if deterministic:
                    again = run_bwd(sparse, deterministic)
                    for name, a, b in zip(("dq", "dsubkeys", "dvalues"), (dq, dsub, dval), again):
                        if not bits_equal(a, b):
                            self.failures.append(f"{label}{mode} {name}: not bitwise repeatable")
                if special == "nan":
                    # The reference's matmul backward spreads a NaN query into every sub-key
                    # gradient (0 * NaN), the kernel only into the selected ones: compare dq of
                    # the finite rows, and require NaN only where a NaN row reads.
                    self.check(label + mode + " dq (finite rows)", dq[finite_rows],
                               grads64[0][finite_rows], dtype, baseline=gradsb[0][finite_rows])
                    continue
                self.check(label + mode + " dq", dq, grads64[0], dtype, baseline=gradsb[0])
                self.check(label + mode + " dsubkeys", dsub, grads64[1], dtype, baseline=gradsb[1])
                if sparse:
                    self.check(label + mode + " dvalues rows", dval, value_rows_expected, dtype)
                else:
                    self.check(label + mode + " dvalues", dval, grads64[2], dtype,
                               baseline=gradsb[2])
        problems = len(self.failures) - failures_before
        print(f"  {'ok  ' if problems == 0 else 'FAIL'} {label}"
              + (f", {problems} problem(s)" if problems else ""))


def run_pkm_checks(ext, quick: bool) -> PkmChecker:
    checker = PkmChecker(ext, load_pkm_reference())
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for number, case in enumerate(PKM_CASES):
            if quick and number not in PKM_QUICK:
                continue
            try:
                checker.pkm_case(case, dtype)
            except Exception as error:  # report and go on: one broken case must not hide others
                checker.failures.append(f"pkm case {case} {dtype}: raised "
                                        f"{type(error).__name__}: {error}")
                print(f"  FAIL pkm case {case} {dtype}: raised {type(error).__name__}: {error}")
    return checker


def check_pkm_errors(ext) -> list[str]:
    """Bad product_key calls raise the documented exception types (and never launch)."""
    problems = []
    dev = "cuda"
    B, H, T, Dk, n_sub, Dv, k, k_sub = 1, 2, 3, 8, 5, 4, 4, 3
    q = torch.randn(B, H, T, Dk, device=dev)
    subkeys = torch.randn(H, 2, n_sub, Dk // 2, device=dev)
    values = torch.randn(n_sub * n_sub, Dv, device=dev)

    def outs(k_=k):
        return (torch.empty(B, H, T, Dv, device=dev),
                torch.empty(B, H, T, k_, dtype=torch.int64, device=dev),
                torch.empty(B, H, T, k_, device=dev), torch.empty(B, H, T, device=dev))

    def expect(name, error_type, fn):
        try:
            fn()
            torch.cuda.synchronize()
        except error_type:
            return
        except Exception as error:  # the wrong type
            problems.append(f"pkm bad call {name}: raised {type(error).__name__}, expected "
                            f"{error_type.__name__}: {error}")
            return
        problems.append(f"pkm bad call {name}: did not raise {error_type.__name__}")

    expect("k > k_sub ** 2", ValueError,
           lambda: ext.product_key_fwd(q, subkeys, values, 10, k_sub, 1.0, False, *outs(10)))
    expect("k_sub > n_sub", ValueError,
           lambda: ext.product_key_fwd(q, subkeys, values, k, 6, 1.0, False, *outs()))
    expect("wrong subkeys shape", ValueError,
           lambda: ext.product_key_fwd(q, subkeys[:, :, :4].contiguous(), values, k, k_sub, 1.0, False, *outs()))
    expect("wrong values shape", ValueError,
           lambda: ext.product_key_fwd(q, subkeys, values[:-1], k, k_sub, 1.0, False, *outs()))
    expect("float64", TypeError,
           lambda: ext.product_key_fwd(q.double(), subkeys.double(), values.double(), k, k_sub,
                                       1.0, False, *outs()))
    expect("cpu tensor", ValueError,
           lambda: ext.product_key_fwd(q.cpu(), subkeys, values, k, k_sub, 1.0, False, *outs()))
    big_q = torch.randn(1, 1, 2, 514, device=dev)
    big_sub = torch.randn(1, 2, 4, 257, device=dev)
    big_values = torch.randn(16, 4, device=dev)
    expect("Dk > 512", NotImplementedError,
           lambda: ext.product_key_fwd(
               big_q, big_sub, big_values, 2, 2, 1.0, False, torch.empty(1, 1, 2, 4, device=dev),
               torch.empty(1, 1, 2, 2, dtype=torch.int64, device=dev),
               torch.empty(1, 1, 2, 2, device=dev), torch.empty(1, 1, 2, device=dev)))
    n_big = 300
    q3 = torch.randn(1, 1, 2, 4, device=dev)
    sub3 = torch.randn(1, 2, n_big, 2, device=dev)
    values3 = torch.randn(n_big * n_big, 1, device=dev)
    expect("k_sub > 256", NotImplementedError,
           lambda: ext.product_key_fwd(
               q3, sub3, values3, 4, 257, 1.0, False, torch.empty(1, 1, 2, 1, device=dev),
               torch.empty(1, 1, 2, 4, dtype=torch.int64, device=dev),
               torch.empty(1, 1, 2, 4, device=dev), torch.empty(1, 1, 2, device=dev)))
    # Out-of-range indices in the backward: skipped, never out of bounds.
    out, indices, weights, lse = outs()
    ext.product_key_fwd(q, subkeys, values, k, k_sub, 1.0, False, out, indices, weights, lse)
    bad = indices.clone()
    bad[0, 0, 0, 0] = n_sub * n_sub + 100
    bad[0, 1, 2, 1] = -5
    for deterministic in (False, True):
        try:
            dq, dsub, dval = torch.empty_like(q), torch.empty_like(subkeys), torch.empty_like(values)
            ext.product_key_bwd(torch.randn_like(out), torch.randn_like(weights),
                                torch.randn_like(lse), q, subkeys, values, bad, weights, 1.0,
                                False, False, deterministic, dq, dsub, dval)
            torch.cuda.synchronize()
            if not (torch.isfinite(dq).all() and torch.isfinite(dsub).all()
                    and torch.isfinite(dval).all()):
                problems.append(f"pkm bwd with out-of-range indices (det={deterministic}): "
                                "non-finite gradients")
        except Exception as error:
            problems.append(f"pkm bwd with out-of-range indices (det={deterministic}): raised "
                            f"{type(error).__name__}: {error}")
    return problems


def bench_pkm(ext) -> list[dict]:
    """product_key_read fwd/bwd at pkm-gpu: B=8, H=4, T=2048, Dk=256, n_sub=1024, Dv=256, k=32,
    k_sub=32, bfloat16; the gather's GB/s (value bytes read by product_key_out_kernel, timed by
    the profiler) against a device-to-device copy."""
    try:
        from triton.testing import do_bench
    except ImportError:  # pragma: no cover
        do_bench = None

    def timed(fn):
        if do_bench is not None:
            return do_bench(fn, warmup=5, rep=50) * 1e-3
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1e-3 / 5

    B, H, T, Dk, n_sub, Dv, k, k_sub = 8, 4, 2048, 256, 1024, 256, 32, 32
    dtype = torch.bfloat16
    name = "pkm-gpu B8 H4 T2048 Dk256 n_sub1024 Dv256 k32 k_sub32"
    q = torch.randn(B, H, T, Dk, device="cuda").to(dtype)
    subkeys = torch.randn(H, 2, n_sub, Dk // 2, device="cuda").to(dtype)
    values = torch.randn(n_sub * n_sub, Dv, device="cuda").to(dtype)
    scale = Dk ** -0.5
    results = []
    for sum_heads in (False, True):
        out = torch.empty((B, T, Dv) if sum_heads else (B, H, T, Dv), dtype=dtype, device="cuda")
        indices = torch.empty(B, H, T, k, dtype=torch.int64, device="cuda")
        weights = torch.empty(B, H, T, k, device="cuda")
        lse = torch.empty(B, H, T, device="cuda")
        fwd = lambda: ext.product_key_fwd(q, subkeys, values, k, k_sub, scale, sum_heads, out,
                                          indices, weights, lse)
        fwd()
        dout, dweights, dlse = torch.randn_like(out), torch.randn_like(weights), torch.randn_like(lse)
        dq, dsub = torch.empty_like(q), torch.empty_like(subkeys)
        dval_dense = torch.empty_like(values)
        dval_rows = torch.empty(B * H * T * k, Dv, dtype=dtype, device="cuda")
        ops = {"product_key_fwd": fwd}
        for sparse in (False, True):
            for deterministic in (False, True):
                ops[f"product_key_bwd{' sparse' if sparse else ''}{' det' if deterministic else ''}"] = (
                    lambda s=sparse, d=deterministic: ext.product_key_bwd(
                        dout, dweights, dlse, q, subkeys, values, indices, weights, scale,
                        sum_heads, s, d, dq, dsub, dval_rows if s else dval_dense))
        label = name + (" sum_heads" if sum_heads else "")
        for op, fn in ops.items():
            seconds = timed(fn)
            entry = {"shape": label, "dtype": "bfloat16", "op": op, "ms": seconds * 1e3}
            results.append(entry)
            print(f"  {op:30s} {label:64s} {entry['ms']:9.3f} ms")
        # The gather kernel alone, from the profiler's kernel times.
        gather_bytes = B * H * T * k * Dv * values.element_size()
        try:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    fwd()
                torch.cuda.synchronize()
            kernel_us = {}
            for event in prof.key_averages():
                if "product_key" in event.key:
                    total = getattr(event, "device_time_total", None)
                    if total is None:
                        total = getattr(event, "cuda_time_total", 0.0)
                    match = re.search(r"product_key_\w+(<[^>]*>)?", event.key)
                    kernel = match.group(0) if match else event.key[:60]
                    kernel_us[kernel] = kernel_us.get(kernel, 0.0) + total / 5
            for kernel, us in sorted(kernel_us.items()):
                print(f"    {kernel:60s} {us / 1e3:9.3f} ms")
                if "out_kernel" in kernel and us > 0:
                    entry = {"shape": label, "op": "gather (product_key_out_kernel)",
                             "ms": us / 1e3, "GBps": gather_bytes / (us * 1e-6) / 1e9}
                    results.append(entry)
                    print(f"    gather: {entry['GBps']:.0f} GB/s of value rows read")
        except Exception as error:  # profiler unavailable: report the whole forward instead
            print(f"    (profiler unavailable: {type(error).__name__}: {error})")
    copy_src = torch.empty(gather_bytes // 2, dtype=dtype, device="cuda")
    copy_dst = torch.empty_like(copy_src)
    seconds = timed(lambda: copy_dst.copy_(copy_src))
    copy_gbps = 2 * gather_bytes / seconds / 1e9
    results.append({"op": "device copy (read + write)", "GBps": copy_gbps, "ms": seconds * 1e3})
    print(f"  device copy of {gather_bytes / 1e9:.2f} GB: {copy_gbps:.0f} GB/s (read + write)")
    del q, subkeys, values
    torch.cuda.empty_cache()
    return results


# ---- gated_memory_write / gated_dense_update -------------------------------------------------

def load_module_by_path(name: str, relative: str):
    path = REPO_ROOT / relative
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # NamedTuple / dataclass machinery looks the module up
    spec.loader.exec_module(module)
    return module


def load_write_modules():
    """(reference, plan) of l2m_kernels/ops/memory_write, loaded by path (no package import)."""
    ref = load_module_by_path("l2m_memory_write_reference",
                              "l2m_kernels/ops/memory_write/reference.py")
    plan = load_module_by_path("l2m_memory_write_plan", "l2m_kernels/ops/memory_write/plan.py")
    return ref, plan


# (B, Hm, N, D, T, kw, one erase gate per step, index dtype, special). Column chunks per warp:
# 128 (float32) / 256 (16-bit) columns; vector path when D % 4 (float32) / D % 8 (16-bit) == 0
# and every base pointer is 16-byte aligned, else the scalar path.
WRITE_CASES = [
    (2, 2, 7, 7, 7, 3, False, torch.int64, None),          # N = 7: many repeated slots
    (1, 3, 63, 129, 7, 1, True, torch.int32, None),       # scalar path, 2 float chunks
    (2, 1, 129, 300, 7, 3, False, torch.int32, "skips"),  # float vector (3 chunks), 16-bit scalar
    (2, 1, 129, 300, 7, 3, True, torch.int64, "skips"),   # multi-chunk sums with one gate
    (2, 2, 7, 1, 7, 3, True, torch.int64, None),          # D = 1
    (1, 2, 63, 1, 7, 1, False, torch.int32, "skips"),     # D = 1, erase (.., D) == (.., 1)
    (2, 2, 129, 64, 7, 3, False, torch.int64, "repeat"),  # same slot within and across steps
    (1, 1, 7, 129, 7, 3, True, torch.int32, "repeat"),
    (2, 2, 63, 520, 7, 3, True, torch.int64, "repeat"),   # vector: 5 float / 3 16-bit chunks
    (2, 2, 63, 520, 7, 3, False, torch.int32, None),
    (2, 2, 63, 256, 7, 3, False, torch.int64, "misaligned"),  # scalar path (unaligned bases)
    (2, 2, 63, 256, 7, 3, True, torch.int64, None),       # vector path, 2 / 1 chunks
    (2, 2, 63, 64, 7, 3, False, torch.int64, "nan_skipped"),  # NaN weights of -1 entries
    (2, 2, 63, 64, 7, 3, True, torch.int64, "all_skipped"),
    (4, 16, 512, 64, 64, 4, False, torch.int64, "skips"),  # 16384 entries, many warps
    (0, 2, 7, 8, 7, 3, False, torch.int64, None),         # empty batch
    (2, 2, 7, 8, 0, 3, False, torch.int64, None),         # T = 0
    (2, 2, 7, 8, 7, 0, True, torch.int32, None),          # kw = 0
    (2, 2, 0, 8, 7, 3, False, torch.int64, "all_skipped"),  # N = 0 (only -1 possible)
    (2, 2, 7, 0, 7, 3, False, torch.int64, None),         # D = 0
    (2, 2, 7, 0, 7, 3, True, torch.int64, None),          # D = 0, one gate
]
WRITE_QUICK = {0, 1, 3, 4, 6, 8, 10, 12, 13, 15, 18, 19}


class WriteChecker(Checker):
    """gated_memory_write_fwd / _bwd against l2m_kernels/ops/memory_write/reference.py (float64),
    with the plan of plan.py, called the way function.py's GPU launchers call them."""

    def __init__(self, ext, ref, plan_module):
        super().__init__(ext, ref)
        self.plan = plan_module
        self.not_bitwise: list[str] = []  # forward results that differ from the float32 reference

    def write_case(self, case, dtype):
        B, Hm, N, D, T, kw, one_gate, index_dtype, special = case
        self.cases += 1
        failures_before, worst_before = len(self.failures), dict(self.worst)
        self.worst = {}
        label = (f"write B={B} Hm={Hm} N={N} D={D} T={T} kw={kw} erase={'1' if one_gate else 'D'}"
                 f" {str(index_dtype).removeprefix('torch.')}{' ' + special if special else ''}"
                 f" {str(dtype).removeprefix('torch.')}")
        dev = "cuda"
        G, E = B * Hm, B * Hm * T * kw
        erase_dim = 1 if one_gate else D
        misalign = 1 if special == "misaligned" else 0

        memory = torch.randn(B, Hm, N, D, device=dev).to(dtype)
        if N > 0:
            indices = torch.randint(0, N, (B, Hm, T, kw), device=dev)
        else:
            indices = torch.full((B, Hm, T, kw), -1, dtype=torch.int64, device=dev)
        if special in ("skips", "nan_skipped"):
            indices[torch.rand(indices.shape, device=dev) < 0.25] = -1
        if special == "all_skipped":
            indices.fill_(-1)
        if special == "repeat" and T >= 3 and kw >= 1 and N > 0:
            indices[..., 0, :] = 0          # every write of step 0 to slot 0 (repeats in one step)
            indices[..., 2, 0] = 0          # and slot 0 again at a later step
            indices[..., 1::2, -1] = N - 1  # slot N - 1 at every other step
        indices = indices.to(index_dtype)
        ref_weights = torch.rand(B, Hm, T, kw, device=dev).to(dtype)
        add = torch.randn(B, Hm, T, D, device=dev).to(dtype)
        erase = torch.rand(B, Hm, T, erase_dim, device=dev).to(dtype)
        skipped = indices < 0
        # A skipped entry's weight must have no effect (the reference gets 0 there: its own
        # autograd would turn 0 * NaN into NaN through the discarded branch).
        weights = ref_weights.masked_fill(skipped, NAN) if special == "nan_skipped" else ref_weights

        def flat(t):
            return t.reshape(G, *t.shape[2:])

        mem_f, idx_f, w_f, add_f, erase_f = (flat(t) for t in (memory, indices, weights, add, erase))
        if misalign:
            mem_f, add_f, erase_f = (placed(t, misalign) for t in (mem_f, add_f, erase_f))
        plan = self.plan.write_plan(idx_f.reshape(G, T * kw), N)
        written = torch.zeros(G, N, dtype=torch.bool, device=dev)  # slots some entry writes
        live = idx_f >= 0
        if live.any():
            group_ids = torch.arange(G, device=dev)[:, None, None].expand_as(idx_f)
            written[group_ids[live], idx_f[live].long()] = True

        # Forward, out of place: out is memory's copy with every written slot poisoned (the
        # kernel must store each of them, reading memory, not out).
        out = placed(mem_f, misalign)
        out[written] = NAN
        self.ext.gated_memory_write_fwd(mem_f, idx_f, w_f, add_f, erase_f, plan.order,
                                        plan.run_length, out)
        ref_out = self.ref.gated_memory_write_ref(memory.double(), indices, ref_weights.double(),
                                                  add.double(), erase.double())
        low_out = self.ref.gated_memory_write_ref(memory, indices, ref_weights, add, erase)
        self.check(label + " out", out.reshape(memory.shape), ref_out, dtype, low_out)
        if not bits_equal(out[~written], mem_f[~written]):
            self.failures.append(f"{label}: an unwritten slot changed")
        if not bits_equal(out.reshape(memory.shape), low_out):
            self.not_bitwise.append(label)
        # In place: the same bits as out of place (same code), untouched slots unchanged.
        in_place = placed(mem_f, misalign)
        self.ext.gated_memory_write_fwd(in_place, idx_f, w_f, add_f, erase_f, plan.order,
                                        plan.run_length, in_place)
        if not bits_equal(in_place, out):
            self.failures.append(f"{label}: in place differs from out of place")

        # Backward, buffers as _gpu_write_bwd passes them (dmemory = dnew's copy, the rest
        # zeroed), with every element the kernel must write poisoned.
        dnew = torch.randn(B, Hm, N, D, device=dev).to(dtype)
        dnew_f = placed(flat(dnew), misalign)
        live_entries = live.reshape(E)

        def backward():
            dmemory = placed(dnew_f, misalign)
            dweights = torch.zeros(G, T, kw, dtype=dtype, device=dev)
            add_parts = placed(torch.zeros(E, D, device=dev), misalign)
            erase_parts = placed(torch.zeros(E, erase_dim, device=dev), misalign)
            if D > 0:  # with D == 0 the kernel has nothing to do and the zeros are the answer
                dmemory[written] = NAN
                dweights[live] = NAN
                add_parts[live_entries] = NAN
                erase_parts[live_entries] = NAN
            self.ext.gated_memory_write_bwd(dnew_f, mem_f, idx_f, w_f, add_f, erase_f, plan.order,
                                            plan.run_length, dmemory, dweights, add_parts,
                                            erase_parts)
            dadd = add_parts.view(G, T, kw, D).sum(2).to(dtype)
            derase = erase_parts.view(G, T, kw, erase_dim).sum(2).to(dtype)
            return (dmemory.reshape(memory.shape), dweights.reshape(weights.shape),
                    dadd.reshape(add.shape), derase.reshape(erase.shape), add_parts, erase_parts)

        grads = backward()
        again = backward()
        if not all(bits_equal(a, b) for a, b in zip(grads, again)):
            self.failures.append(f"{label}: backward not bitwise repeatable")
        if not bits_equal(grads[0].reshape(G, N, D)[~written], flat(dnew)[~written]):
            self.failures.append(f"{label}: dmemory of an unwritten slot is not dnew")
        if not (bits_equal(grads[4][~live_entries], torch.zeros_like(grads[4][~live_entries]))
                and bits_equal(grads[1][skipped], torch.zeros_like(grads[1][skipped]))):
            self.failures.append(f"{label}: a skipped entry got a nonzero gradient part")

        leaves = [t.double().requires_grad_() for t in (memory, ref_weights, add, erase)]
        low_leaves = [t.clone().requires_grad_() for t in (memory, ref_weights, add, erase)]
        expected = self._vjp(leaves, indices, dnew.double())
        baseline = self._vjp(low_leaves, indices, dnew)
        for name, actual, exp, base in zip(("dmemory", "dweights", "dadd", "derase"), grads,
                                           expected, baseline):
            self.check(f"{label} {name}", actual, exp, dtype, base)
        torch.cuda.synchronize()
        TopkChecker._report(self, label, failures_before, worst_before)

    def _vjp(self, leaves, indices, cotangent):
        out = self.ref.gated_memory_write_ref(leaves[0], indices, *leaves[1:])
        grads = torch.autograd.grad(out, leaves, cotangent, allow_unused=True)
        return [torch.zeros_like(leaf) if grad is None else grad
                for grad, leaf in zip(grads, leaves)]


def run_write_checks(ext, quick: bool) -> WriteChecker:
    ref, plan = load_write_modules()
    checker = WriteChecker(ext, ref, plan)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for number, case in enumerate(WRITE_CASES):
            if quick and number not in WRITE_QUICK:
                continue
            try:
                checker.write_case(case, dtype)
            except Exception as error:  # report and go on: one broken case must not hide others
                checker.failures.append(f"write case {case} {dtype}: raised "
                                        f"{type(error).__name__}: {error}")
                print(f"  FAIL write case {case} {dtype}: raised {type(error).__name__}: {error}")
    if checker.not_bitwise:
        # Information, not a failure: the forward rounds like the reference evaluated in float32
        # (no fused multiply-add), so it is expected to match it bit for bit.
        print(f"  note: {len(checker.not_bitwise)} write forward(s) not bitwise equal to the "
              f"float32 reference, e.g. {checker.not_bitwise[0]}")
    else:
        print("  write forward: bitwise equal to the reference evaluated in float32 in every case")
    return checker


def broadcast_views4(*tensors):
    """As _broadcast_views4 in function.py: 4-D views of the broadcast shape (stride 0 where
    broadcast); shapes of more than 4 dimensions materialised and flattened to (1, 1, 1, numel)."""
    shape = torch.broadcast_shapes(*(t.shape for t in tensors))
    if len(shape) > 4:
        return tuple(t.expand(shape).contiguous().view(1, 1, 1, -1) for t in tensors), shape
    shape4 = (1,) * (4 - len(shape)) + tuple(shape)
    return tuple(t.expand(shape4) for t in tensors), shape


# (memory, update, input_gate, forget_gate shapes, special)
DENSE_CASES = [
    ((2, 3, 7, 5), (2, 3, 7, 5), (2, 3, 7, 5), (2, 3, 7, 5), None),      # contiguous path
    ((2, 3, 7, 129), (2, 3, 7, 129), (2, 3, 7, 1), (3, 1, 1), None),      # broadcast gates
    ((3, 63, 7), (63, 7), (3, 63, 1), (1,), None),                        # 3-D, broadcast update
    ((7,), (7,), (1,), (7,), None),                                       # 1-D
    ((2, 2, 9, 33), (2, 2, 9, 33), (2, 2, 9, 1), (2, 2, 9, 1), "big"),    # huge |x|, +-inf
    ((2, 2, 9, 33), (2, 2, 9, 33), (2, 2, 9, 33), (1, 2, 1, 33), "nan"),
    ((2, 3, 4, 5, 6), (2, 3, 4, 5, 6), (2, 3, 4, 5, 1), (6,), None),      # 5-D: flattened
    ((4, 8, 16), (4, 8, 16), (4, 8, 16), (4, 8, 16), "transposed"),       # strided same-shape
    ((0, 3, 5), (0, 3, 5), (0, 3, 5), (1,), None),                        # empty
    ((65, 16, 128, 128), (65, 16, 128, 128), (65, 16, 128, 1), (16, 1, 1), None),  # > 2**24:
]                                                                         # grid-stride loop
DENSE_QUICK = {0, 1, 2, 4, 5, 6, 7, 8}


class DenseChecker(Checker):
    """gated_dense_update_fwd / _bwd against gated_dense_update_ref (float64)."""

    def dense_case(self, case, dtype):
        *shapes, special = case
        self.cases += 1
        failures_before, worst_before = len(self.failures), dict(self.worst)
        self.worst = {}
        label = (f"dense {' '.join(str(tuple(s)) for s in shapes)}"
                 f"{' ' + special if special else ''} {str(dtype).removeprefix('torch.')}")
        dev = "cuda"
        inputs = [torch.randn(s, device=dev).to(dtype) for s in shapes]
        memory, update, input_gate, forget_gate = inputs
        if special == "big":
            input_gate[..., 0, 0] = 1e4
            input_gate[..., 1, 0] = -1e4
            input_gate[..., 2, 0] = float("inf")
            forget_gate[..., 3, 0] = float("-inf")
            forget_gate[..., 4, 0] = 1e4
            forget_gate[..., 5, 0] = -1e4
            update[..., 0, :3] = 1e4
            update[..., 1, :3] = float("-inf")
        if special == "nan":
            memory[0, 0, 0, 0] = NAN
            input_gate[0, 0, 1, 1] = NAN
            update[1, 1, 2, 2] = NAN
        if special == "transposed":
            inputs = [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in inputs]
            memory, update, input_gate, forget_gate = inputs
        views, shape = broadcast_views4(*inputs)
        out = nan_filled(tuple(views[0].shape), dtype)
        self.ext.gated_dense_update_fwd(*views, out)
        leaves = [t.double().requires_grad_() for t in inputs]
        out64 = self.ref.gated_dense_update_ref(*leaves)
        low_leaves = [t.clone().requires_grad_() for t in inputs]
        low_out = self.ref.gated_dense_update_ref(*low_leaves)
        self.check(label + " out", out.view(shape), out64, dtype, low_out)
        if special == "big" and not torch.isfinite(out).all():
            self.failures.append(f"{label}: non-finite output for finite memory")

        dout = torch.randn(shape, device=dev).to(dtype)
        grads = [nan_filled(tuple(views[0].shape), torch.float32) for _ in range(4)]
        self.ext.gated_dense_update_bwd(dout.contiguous().view(views[0].shape), *views, *grads)
        reduced = [g.view(shape).sum_to_size(t.shape).to(t.dtype) for g, t in zip(grads, inputs)]
        if out.numel():
            expected = torch.autograd.grad(out64, leaves, dout.double())
            baseline = torch.autograd.grad(low_out, low_leaves, dout)
        else:
            expected = [torch.zeros_like(t) for t in leaves]
            baseline = [torch.zeros_like(t) for t in low_leaves]
        for name, actual, exp, base in zip(("dmemory", "dupdate", "dinput_gate", "dforget_gate"),
                                           reduced, expected, baseline):
            self.check(f"{label} {name}", actual, exp, dtype, base)
            if special == "big" and not torch.isfinite(actual).all():
                self.failures.append(f"{label}: non-finite {name}")
        torch.cuda.synchronize()
        TopkChecker._report(self, label, failures_before, worst_before)


def run_dense_checks(ext, quick: bool) -> DenseChecker:
    ref, _ = load_write_modules()
    checker = DenseChecker(ext, ref)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for number, case in enumerate(DENSE_CASES):
            if quick and number not in DENSE_QUICK:
                continue
            try:
                checker.dense_case(case, dtype)
            except Exception as error:
                checker.failures.append(f"dense case {case} {dtype}: raised "
                                        f"{type(error).__name__}: {error}")
                print(f"  FAIL dense case {case} {dtype}: raised {type(error).__name__}: {error}")
    return checker


def check_write_errors(ext) -> list[str]:
    """Bad gated_memory_write / gated_dense_update calls raise the documented exception types
    (TORCH_CHECK_VALUE: ValueError, _TYPE: TypeError, overlap: RuntimeError) and never launch."""
    problems = []
    dev = "cuda"
    G, N, D, T, kw = 2, 5, 8, 3, 2
    E = G * T * kw
    memory = torch.randn(G, N, D, device=dev)
    indices = torch.randint(0, N, (G, T, kw), device=dev)
    weights = torch.rand(G, T, kw, device=dev)
    add = torch.randn(G, T, D, device=dev)
    erase = torch.rand(G, T, D, device=dev)
    order = torch.arange(E, device=dev)
    run_length = torch.ones(E, dtype=torch.int32, device=dev)  # never launched with these

    def expect(name, error_type, fn):
        try:
            fn()
            torch.cuda.synchronize()
        except error_type:
            return
        except Exception as error:  # the wrong type
            problems.append(f"write bad call {name}: raised {type(error).__name__}, expected "
                            f"{error_type.__name__}: {error}")
            return
        problems.append(f"write bad call {name}: did not raise {error_type.__name__}")

    def fwd(**changes):
        args = dict(memory=memory, indices=indices, weights=weights, add=add, erase=erase,
                    order=order, run_length=run_length, out=torch.empty_like(memory))
        args.update(changes)
        return lambda: ext.gated_memory_write_fwd(**args)

    def bwd(**changes):
        args = dict(dnew=torch.randn_like(memory), memory=memory, indices=indices,
                    weights=weights, add=add, erase=erase, order=order, run_length=run_length,
                    dmemory=torch.empty_like(memory), dweights=torch.zeros_like(weights),
                    add_parts=torch.zeros(E, D, device=dev),
                    erase_parts=torch.zeros(E, D, device=dev))
        args.update(changes)
        return lambda: ext.gated_memory_write_bwd(**args)

    expect("float64", TypeError, fwd(memory=memory.double(), weights=weights.double(),
                                     add=add.double(), erase=erase.double(),
                                     out=torch.empty_like(memory.double())))
    expect("weights dtype", TypeError, fwd(weights=weights.half()))
    expect("float indices", TypeError, fwd(indices=indices.float()))
    expect("order int32", TypeError, fwd(order=order.int()))
    expect("run_length int64", TypeError, fwd(run_length=run_length.long()))
    expect("order shape", ValueError, fwd(order=order[:-1]))
    expect("erase shape", ValueError, fwd(erase=torch.rand(G, T, 2, device=dev)))
    expect("add shape", ValueError, fwd(add=add[:, :, :-1].contiguous()))
    expect("memory 4-D", ValueError, fwd(memory=memory[None], out=torch.empty_like(memory[None])))
    expect("cpu tensor", ValueError, fwd(memory=memory.cpu(), out=memory.cpu()))
    expect("non-contiguous", ValueError, fwd(add=add.transpose(0, 1).contiguous().transpose(0, 1)))
    shared = torch.randn(G * N * D + D, device=dev)
    expect("out overlaps memory partially", RuntimeError,
           fwd(memory=shared[:G * N * D].view(G, N, D), out=shared[D:].view(G, N, D)))
    buffer = torch.empty(G * N * D, device=dev)
    expect("out overlaps weights", RuntimeError,
           fwd(weights=buffer[:G * T * kw].view(G, T, kw), out=buffer.view(G, N, D)))
    expect("bwd add_parts dtype", TypeError, bwd(add_parts=torch.zeros(E, D, dtype=torch.float16,
                                                                        device=dev)))
    expect("bwd erase_parts shape", ValueError, bwd(erase_parts=torch.zeros(E, 1, device=dev)))
    expect("bwd dweights shape", ValueError, bwd(dweights=torch.zeros(G, T, kw + 1, device=dev)))
    expect("bwd dmemory is dnew", RuntimeError, (lambda d: bwd(dnew=d, dmemory=d))(
        torch.randn_like(memory)))

    x = torch.randn(2, 3, 4, 5, device=dev)
    gate = torch.randn(2, 3, 4, 1, device=dev).expand(2, 3, 4, 5)
    expect("dense 3-D", ValueError,
           lambda: ext.gated_dense_update_fwd(x[0], x[0], x[0], x[0], torch.empty_like(x[0])))
    expect("dense shape", ValueError,
           lambda: ext.gated_dense_update_fwd(x, x[..., :4], x, x, torch.empty_like(x)))
    expect("dense dtype", TypeError,
           lambda: ext.gated_dense_update_fwd(x, x.half(), gate, gate, torch.empty_like(x)))
    expect("dense float64", TypeError,
           lambda: ext.gated_dense_update_fwd(*(t.double() for t in (x, x, gate, gate)),
                                              torch.empty_like(x.double())))
    expect("dense out non-contiguous", ValueError,
           lambda: ext.gated_dense_update_fwd(x, x, gate, gate, torch.empty_like(x).transpose(2, 3)
                                              .contiguous().transpose(2, 3)))
    expect("dense out is memory", RuntimeError,
           lambda: ext.gated_dense_update_fwd(x, x.clone(), gate, gate, x))
    grads = [torch.empty_like(x) for _ in range(4)]
    expect("dense bwd half grads", TypeError,
           lambda: ext.gated_dense_update_bwd(x, x, x, gate, gate, grads[0].half(), *grads[1:]))
    expect("dense bwd cpu", ValueError,
           lambda: ext.gated_dense_update_bwd(x, x, x, gate, gate, grads[0].cpu(), *grads[1:]))
    return problems


# ---- local attention and read weights (the cuda backend of memory_attention) ----------------

def load_attention_reference():
    """l2m_kernels/ops/memory_attention/reference.py and the top-k read's reference, loaded by
    path. The attention reference imports the merge and top-k references by package name: they
    are registered under those names first, so the l2m_kernels package is never imported."""
    for name, relative in (("l2m_kernels.ops.merge.reference", "l2m_kernels/ops/merge/reference.py"),
                           ("l2m_kernels.ops.topk_read.reference",
                            "l2m_kernels/ops/topk_read/reference.py")):
        if name not in sys.modules:
            load_module_by_path(name, relative)
    attention = load_module_by_path("l2m_memory_attention_reference",
                                    "l2m_kernels/ops/memory_attention/reference.py")
    return attention, sys.modules["l2m_kernels.ops.topk_read.reference"]


def acc_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# (B, H, Hkv, T, S, D, Dv, window, special): window None = no window (passed as -1). Slices of the
# feature columns: 64 (float64, or <= 64 columns) or 128, so D / Dv 65, 129, 130, 256 take several.
ATTN_CASES = [
    (1, 1, 1, 1, 1, 7, 7, None, None),              # T = S = 1
    (2, 4, 2, 7, 7, 7, 5, None, None),              # S = T, odd D, Dv != D, grouped heads
    (1, 2, 1, 7, 20, 64, 64, 5, None),              # S > T, window 5
    (2, 2, 2, 63, 63, 64, 32, 1, None),             # window 1: only itself
    (1, 4, 2, 63, 100, 129, 65, 5, None),           # D 129 / Dv 65: several column slices
    (1, 2, 1, 129, 129, 64, 129, None, None),       # T 129: 5 query tiles, one partial
    (1, 4, 1, 129, 160, 7, 130, 160, None),         # window = S, Dv 130
    (1, 2, 1, 33, 40, 16, 16, 1000, None),          # window > S
    (1, 2, 1, 33, 40, 16, 16, 0, None),             # window 0: nothing visible
    (1, 2, 1, 40, 300, 256, 256, 64, None),         # large D = Dv, long context
    (1, 2, 1, 20, 40, 16, 24, 5, "nonfinite"),      # NaN / inf k, v at masked positions
    (1, 2, 1, 20, 40, 16, 24, None, "nonfinite"),
    (2, 2, 1, 7, 9, 8, 8, None, "nan_query"),       # one NaN query row
    (0, 2, 1, 5, 8, 8, 8, None, None),              # empty batch
    (2, 2, 1, 0, 8, 8, 8, 3, None),                 # T = 0: dk, dv zero
]
ATTN_QUICK = {0, 1, 2, 4, 6, 8, 10, 12, 13, 14}
ATTN_FLOAT64 = {1, 4, 6, 10}  # cases also run in float64

# (B, H, Hm, T, N, Dk, Dv, k, shared, special) for memory_read_weights
READ_WEIGHT_CASES = [
    (2, 4, 2, 7, 63, 7, 5, 3, False, None),
    (1, 2, 2, 9, 40, 64, 64, 33, True, "missing"),     # slots -1 (weight 0, never read)
    (2, 4, 1, 5, 129, 129, 256, 8, False, "missing"),  # Dk 129, Dv 256
    (1, 2, 1, 6, 20, 256, 7, 1, True, None),           # k = 1, Dk 256
    (1, 2, 2, 6, 20, 8, 8, 4, False, "out_of_range"),  # indices >= N or < -1: weight 0
    (2, 2, 1, 0, 20, 8, 8, 4, False, None),            # T = 0
    (2, 2, 1, 5, 20, 8, 8, 0, False, None),            # k = 0: dots and out zero
]


class AttentionChecker(Checker):
    """local_attention_fwd / _bwd and memory_read_weights against the float64 references
    (l2m_kernels/ops/memory_attention/reference.py, l2m_kernels/ops/topk_read/reference.py)."""

    def __init__(self, ext, attention_ref, topk_ref):
        super().__init__(ext, attention_ref)
        self.topk_ref = topk_ref

    def _local(self, q, k, v, window, scale, dtype):
        B, H, T, _ = q.shape
        out = nan_filled((B, H, T, v.shape[-1]), dtype)
        lse = nan_filled((B, H, T), acc_of(dtype))
        self.ext.local_attention_fwd(q, k, v, -1 if window is None else window, scale, out, lse)
        return out, lse

    def _local_bwd(self, dout, dlse, q, k, v, out, lse, window, scale, dtype):
        grads = (nan_filled(q.shape, dtype), nan_filled(k.shape, dtype), nan_filled(v.shape, dtype))
        self.ext.local_attention_bwd(dout, dlse, q, k, v, out, lse, -1 if window is None else window,
                                     scale, *grads)
        return grads

    def attention_case(self, case, dtype):
        B, H, Hkv, T, S, D, Dv, window, special = case
        self.cases += 1
        failures_before, worst_before = len(self.failures), dict(self.worst)
        self.worst = {}
        label = (f"attn B={B} H={H} Hkv={Hkv} T={T} S={S} D={D} Dv={Dv} window={window}"
                 f"{' ' + special if special else ''} {str(dtype).removeprefix('torch.')}")
        dev, acc = "cuda", acc_of(dtype)
        scale = D ** -0.5
        q = torch.randn(B, H, T, D, device=dev).to(dtype)
        k = torch.randn(B, Hkv, S, D, device=dev).to(dtype)
        v = torch.randn(B, Hkv, S, Dv, device=dev).to(dtype)
        dout = torch.randn(B, H, T, Dv, device=dev).to(dtype)
        dlse = torch.randn(B, H, T, device=dev, dtype=acc)
        offset = S - T
        # The float64 reference takes the window as given (0: nothing visible; >= S: no window).
        ref_window = window

        out, lse = self._local(q, k, v, window, scale, dtype)
        if special in ("nonfinite", "nan_query") and B * T:
            clean_out, clean_lse = out, lse
            clean_grads = self._local_bwd(dout, dlse, q, k, v, out, lse, window, scale, dtype)
            q, k, v, seeing = self._poison(q, k, v, window, special)
            out, lse = self._local(q, k, v, window, scale, dtype)
            grads = self._local_bwd(dout, dlse, q, k, v, out, lse, window, scale, dtype)
            self._check_isolation(label, seeing, (clean_out, clean_lse) + tuple(clean_grads),
                                  (out, lse) + tuple(grads), Hkv, window, offset)
            ref_out, ref_lse = self.ref.local_attention_ref(q.double(), k.double(), v.double(),
                                                            ref_window, scale)
            for name, got, want in (("out", out, ref_out), ("lse", lse, ref_lse)):
                if not (torch.equal(got.isnan(), want.isnan())
                        and torch.equal(got.isfinite(), want.isfinite())):
                    self.failures.append(f"{label}: {name} non-finite pattern differs from the "
                                         "reference")
            TopkChecker._report(self, label, failures_before, worst_before)
            return

        leaves = [t.detach().double().clone().requires_grad_() for t in (q, k, v)]
        ref_out, ref_lse = self.ref.local_attention_ref(*leaves, ref_window, scale)
        low_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        low_out, low_lse = self.ref.local_attention_ref(*low_leaves, ref_window, scale)
        self.check(label + " out", out, ref_out, dtype, low_out)
        self.check(label + " lse", lse, ref_lse, acc)
        if window == 0 and B * H * T:
            if not ((out == 0).all() and (lse == NEG_INF).all()):
                self.failures.append(f"{label}: window 0 must give out 0, lse -inf")

        grads = self._local_bwd(dout, dlse, q, k, v, out, lse, window, scale, dtype)
        again = self._local_bwd(dout, dlse, q, k, v, out, lse, window, scale, dtype)
        if not all(bits_equal(a, b) for a, b in zip(grads, again)):
            self.failures.append(f"{label}: backward not bitwise repeatable")
        if B * H * T:
            torch.autograd.backward((ref_out, ref_lse), (dout.double(), dlse.double()))
            torch.autograd.backward((low_out, low_lse), (dout, dlse.to(low_lse.dtype)))
            for name, got, leaf, low in zip(("dq", "dk", "dv"), grads, leaves, low_leaves):
                self.check(f"{label} {name}", got, leaf.grad, dtype, low.grad)
        elif not all((g == 0).all() for g in grads[1:]):
            self.failures.append(f"{label}: dk / dv not zero without queries")
        # Keys that no query sees (j <= S - T - window) get exact zeros.
        if window is not None and B * Hkv and offset - window >= 0:
            unseen = slice(0, offset - window + 1)
            if not ((grads[1][:, :, unseen] == 0).all() and (grads[2][:, :, unseen] == 0).all()):
                self.failures.append(f"{label}: dk / dv of keys no query sees are not zero")
        torch.cuda.synchronize()
        TopkChecker._report(self, label, failures_before, worst_before)

    @staticmethod
    def _poison(q, k, v, window, special):
        """Poisoned copies of q, k, v and `seeing` (B, H, T): the query rows that see a poisoned
        position (or are poisoned)."""
        B, H, T, _ = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        group = H // Hkv
        q, k, v = q.clone(), k.clone(), v.clone()
        seeing = torch.zeros(B, H, T, dtype=torch.bool, device=q.device)
        if special == "nan_query":
            q[0, H - 1, T // 2, 0] = NAN
            seeing[0, H - 1, T // 2] = True
            return q, k, v, seeing
        # NaN k at the last position (seen by the last query only), inf v one before (the last
        # two queries) in column 1 of kv head 0; with a window also at position 0 (seen by no
        # query when S - T >= window), NaN v in column 0.
        poisoned = [(S - 1, 0, "k", 0), (S - 2, 0, "v", 1)]
        if window is not None:
            poisoned.append((0, Hkv - 1, "v", 0))
        for position, kv_head, name, column in poisoned:
            tensor = k if name == "k" else v
            tensor[:, kv_head, position, column] = NAN if name == "k" or column == 0 else float("inf")
            for t in range(T):
                p = S - T + t
                if position <= p and (window is None or position > p - window):
                    seeing[:, kv_head * group:(kv_head + 1) * group, t] = True
        return q, k, v, seeing

    def _check_isolation(self, label, seeing, clean, poisoned, Hkv, window, offset):
        """Rows that see no poisoned value are unchanged: out, lse, dq exactly (torch.equal), and
        dk / dv of every key no poisoned query sees."""
        B, H, T = seeing.shape
        group = H // Hkv
        others = ~seeing
        for name, a, b in zip(("out", "lse", "dq"), clean[:3], poisoned[:3]):
            if not torch.equal(a[others], b[others]):
                self.failures.append(f"{label}: {name} of a row that sees no poisoned value "
                                     "changed")
        # Keys seen by a poisoned query row may change (a poisoned key no query sees may not).
        S = clean[3].shape[2]
        touched = torch.zeros(B, Hkv, S, dtype=torch.bool, device=seeing.device)
        for b, h, t in seeing.nonzero().tolist():
            p = offset + t
            first = 0 if window is None else max(0, p - window + 1)
            touched[b, h // group, first:p + 1] = True
        for name, a, b in (("dk", clean[3], poisoned[3]), ("dv", clean[4], poisoned[4])):
            if not torch.equal(a[~touched], b[~touched]):
                self.failures.append(f"{label}: {name} of a key no poisoned query sees changed")

    def read_weights_case(self, case, dtype):
        B, H, Hm, T, N, Dk, Dv, k, shared, special = case
        self.cases += 1
        failures_before, worst_before = len(self.failures), dict(self.worst)
        self.worst = {}
        label = (f"read_weights B={B} H={H} Hm={Hm} T={T} N={N} Dk={Dk} Dv={Dv} k={k}"
                 f"{' shared' if shared else ''}{' ' + special if special else ''} "
                 f"{str(dtype).removeprefix('torch.')}")
        dev, acc = "cuda", acc_of(dtype)
        scale = Dk ** -0.5
        lead = (Hm, N) if shared else (B, Hm, N)
        q = torch.randn(B, H, T, Dk, device=dev).to(dtype)
        keys = torch.randn(*lead, Dk, device=dev).to(dtype)
        values = torch.randn(*lead, Dv, device=dev).to(dtype)
        dout = torch.randn(B, H, T, Dv, device=dev).to(dtype)
        indices = torch.stack([torch.randperm(N, device=dev)[:k] for _ in range(B * H * T)]) \
            if B * H * T and k else torch.zeros(B * H * T, k, dtype=torch.int64, device=dev)
        indices = indices.reshape(B, H, T, k)
        if special == "missing" and indices.numel():
            indices[..., k // 2:] = -1  # missing entries come last, as the read returns them
        valid = indices.clone()
        if special == "out_of_range" and indices.numel():
            indices[..., 0] = N + 5     # never read, weight 0
            indices[..., 1] = -7
            valid[..., :2] = -1         # the reference treats them as missing
        if k:
            ref_out, ref_weights, ref_lse = self.topk_ref.topk_read_gather(
                q.double(), keys.double(), values.double(), valid, scale)
        else:  # no entry (the reference's reductions need one): out 0, lse -inf
            ref_out = torch.zeros(B, H, T, Dv, dtype=torch.float64, device=dev)
            ref_weights = torch.zeros(B, H, T, 0, dtype=torch.float64, device=dev)
            ref_lse = torch.full((B, H, T), NEG_INF, dtype=torch.float64, device=dev)
        lse = ref_lse.to(acc).contiguous()
        # The reference at the kernel's lse: the weights (and what depends on them) move with it.
        shift = torch.where(ref_lse.isfinite(), torch.exp(ref_lse - lse.double()),
                            torch.ones_like(ref_lse)).unsqueeze(-1)
        ref_weights = ref_weights * shift
        ref_out = ref_out * shift
        ref_dots = (dout.double() * ref_out).sum(-1)

        def run(with_dout):
            weights = nan_filled((B, H, T, k), acc)
            dots = nan_filled((B, H, T), acc) if with_dout else None
            out = None if with_dout else nan_filled((B, H, T, Dv), dtype)
            self.ext.memory_read_weights(q, keys, values, indices, lse, scale,
                                         dout if with_dout else None, weights, dots, out)
            return weights, dots if with_dout else out

        weights, dots = run(True)
        weights_again, out = run(False)
        if not bits_equal(weights, weights_again):
            self.failures.append(f"{label}: weights differ between the two modes")
        if not all(bits_equal(a, b) for a, b in zip((weights, dots), run(True))):
            self.failures.append(f"{label}: not bitwise repeatable")
        self.check(label + " weights", weights, ref_weights, acc)
        self.check(label + " dots", dots, ref_dots, acc)
        self.check(label + " out", out, ref_out, dtype, ref_out.to(dtype))
        if indices.numel() and not (weights[valid < 0] == 0).all():
            self.failures.append(f"{label}: a missing or out-of-range entry has a nonzero weight")
        torch.cuda.synchronize()
        TopkChecker._report(self, label, failures_before, worst_before)


def run_attention_checks(ext, quick: bool) -> AttentionChecker:
    attention_ref, topk_ref = load_attention_reference()
    checker = AttentionChecker(ext, attention_ref, topk_ref)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for number, case in enumerate(ATTN_CASES):
            if (quick and number not in ATTN_QUICK) or (dtype == torch.float64
                                                        and number not in ATTN_FLOAT64):
                continue
            try:
                checker.attention_case(case, dtype)
            except Exception as error:  # report and go on: one broken case must not hide others
                checker.failures.append(f"attn case {case} {dtype}: raised "
                                        f"{type(error).__name__}: {error}")
                print(f"  FAIL attn case {case} {dtype}: raised {type(error).__name__}: {error}")
        for case in READ_WEIGHT_CASES:
            try:
                checker.read_weights_case(case, dtype)
            except Exception as error:
                checker.failures.append(f"read_weights case {case} {dtype}: raised "
                                        f"{type(error).__name__}: {error}")
                print(f"  FAIL read_weights case {case} {dtype}: raised {type(error).__name__}: "
                      f"{error}")
    return checker


def check_attention_errors(ext) -> list[str]:
    """Bad local_attention / memory_read_weights calls raise the documented exception types
    (TORCH_CHECK_VALUE: ValueError, _TYPE: TypeError, _NOT_IMPLEMENTED: NotImplementedError,
    overlap: RuntimeError) and never launch."""
    problems = []
    dev = "cuda"
    B, H, Hkv, T, S, D, Dv, N, k = 2, 4, 2, 5, 8, 8, 6, 10, 3
    q = torch.randn(B, H, T, D, device=dev)
    kk = torch.randn(B, Hkv, S, D, device=dev)
    v = torch.randn(B, Hkv, S, Dv, device=dev)
    keys = torch.randn(H, N, D, device=dev)
    values = torch.randn(H, N, Dv, device=dev)
    indices = torch.zeros(B, H, T, k, dtype=torch.int64, device=dev)

    def expect(name, error_type, fn):
        try:
            fn()
            torch.cuda.synchronize()
        except error_type:
            return
        except Exception as error:  # the wrong type
            problems.append(f"attn bad call {name}: raised {type(error).__name__}, expected "
                            f"{error_type.__name__}: {error}")
            return
        problems.append(f"attn bad call {name}: did not raise {error_type.__name__}")

    def fwd(**changes):
        args = dict(q=q, k=kk, v=v, window=-1, scale=1.0, out=torch.empty(B, H, T, Dv, device=dev),
                    lse=torch.empty(B, H, T, device=dev))
        args.update(changes)
        return lambda: ext.local_attention_fwd(**args)

    def bwd(**changes):
        args = dict(dout=torch.randn(B, H, T, Dv, device=dev), dlse=torch.zeros(B, H, T, device=dev),
                    q=q, k=kk, v=v, out=torch.randn(B, H, T, Dv, device=dev),
                    lse=torch.zeros(B, H, T, device=dev), window=-1, scale=1.0,
                    dq=torch.empty_like(q), dk=torch.empty_like(kk), dv=torch.empty_like(v))
        args.update(changes)
        return lambda: ext.local_attention_bwd(**args)

    def weights(**changes):
        args = dict(q=q, keys=keys, values=values, indices=indices,
                    lse=torch.zeros(B, H, T, device=dev), scale=1.0, dout=None,
                    weights=torch.empty(B, H, T, k, device=dev), dots=None,
                    out=torch.empty(B, H, T, Dv, device=dev))
        args.update(changes)
        return lambda: ext.memory_read_weights(**args)

    expect("cpu tensor", ValueError, fwd(q=q.cpu()))
    expect("k half", TypeError, fwd(k=kk.half()))
    expect("int q", TypeError, fwd(q=q.int(), k=kk.int(), v=v.int()))
    expect("lse float64", TypeError, fwd(lse=torch.empty(B, H, T, dtype=torch.float64, device=dev)))
    expect("float64 lse float32", TypeError,
           fwd(q=q.double(), k=kk.double(), v=v.double(), out=torch.empty(B, H, T, Dv,
                                                                           dtype=torch.float64,
                                                                           device=dev)))
    expect("Hkv not dividing H", ValueError, fwd(k=torch.randn(B, 3, S, D, device=dev),
                                                 v=torch.randn(B, 3, S, Dv, device=dev)))
    expect("S < T", ValueError, fwd(k=kk[:, :, :T - 1].contiguous(), v=v[:, :, :T - 1].contiguous()))
    expect("v shape", ValueError, fwd(v=v[:, :, :-1].contiguous()))
    expect("k 3-D", ValueError, fwd(k=kk[0]))
    expect("out shape", ValueError, fwd(out=torch.empty(B, H, T, Dv + 1, device=dev)))
    expect("window -2", ValueError, fwd(window=-2))
    expect("non-contiguous q", ValueError, fwd(q=q.transpose(2, 3).contiguous().transpose(2, 3)))
    buffer = torch.randn(B * H * T * D, device=dev)
    expect("out overlaps q", RuntimeError,
           fwd(q=buffer.view(B, H, T, D), out=buffer[:B * H * T * Dv].view(B, H, T, Dv)))
    expect("bwd dk shape", ValueError, bwd(dk=torch.empty(B, Hkv, S, D + 1, device=dev)))
    expect("bwd dlse half", TypeError, bwd(dlse=torch.zeros(B, H, T, dtype=torch.half, device=dev)))
    expect("bwd dq is q", RuntimeError, bwd(dq=q))
    expect("bwd cpu dv", ValueError, bwd(dv=torch.empty_like(v).cpu()))
    expect("weights dout without dots", ValueError,
           weights(dout=torch.randn(B, H, T, Dv, device=dev), out=None))
    expect("weights float indices", TypeError, weights(indices=indices.float()))
    expect("weights shape", ValueError, weights(weights=torch.empty(B, H, T, k + 1, device=dev)))
    expect("weights Dk > 256", NotImplementedError,
           weights(q=torch.randn(B, H, T, 300, device=dev), keys=torch.randn(H, N, 300, device=dev)))
    expect("weights lse float64", TypeError,
           weights(lse=torch.zeros(B, H, T, dtype=torch.float64, device=dev)))
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", help="import this built module instead of JIT-building, "
                                         "e.g. l2m_kernels._C_cuda")
    parser.add_argument("--build-dir", default=None)
    parser.add_argument("--ops", default="merge,topk,pkm,write,dense,attn",
                        help="comma-separated op families to check: merge, topk, pkm, write, "
                             "dense, attn (default all)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--bench", action="store_true")
    parser.add_argument("--huge", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--errors-only", action="store_true", help="only the bad-call checks")
    args = parser.parse_args(argv)
    ops = {op.strip() for op in args.ops.split(",") if op.strip()}
    unknown = ops - {"merge", "topk", "pkm", "write", "dense", "attn"}
    if unknown:
        parser.error(f"unknown --ops {sorted(unknown)}; choose from merge, topk, pkm, write, dense, "
                     "attn")

    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    ext = load_extension(args.module, args.build_dir, args.verbose)
    ref = load_reference()
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}

    if args.errors_only:
        problems = (check_errors(ext) if "merge" in ops else []) + (
            check_topk_errors(ext) if "topk" in ops else []) + (
            check_pkm_errors(ext) if "pkm" in ops else []) + (
            check_write_errors(ext) if ops & {"write", "dense"} else []) + (
            check_attention_errors(ext) if "attn" in ops else [])
        print("\n".join(problems) or "bad calls: all raised")
        return 1 if problems else 0
    problems = []
    if "merge" in ops:
        started = time.perf_counter()
        checker = run_checks(ext, ref, args.quick)
        merge_problems = checker.failures + check_errors(ext)
        print(f"merge correctness: {checker.cases} cases in {time.perf_counter() - started:.1f}s, "
              f"{len(merge_problems)} problems; worst rel RMS per dtype: "
              + ", ".join(f"{k} {v:.2e}" for k, v in checker.worst.items()))
        report.update(cases=checker.cases, worst_rel_rms=checker.worst)
        problems += merge_problems
    if "topk" in ops:
        started = time.perf_counter()
        topk_checker = run_topk_checks(ext, args.quick)
        topk_problems = topk_checker.failures + check_topk_errors(ext)
        print(f"topk correctness: {topk_checker.cases} cases in "
              f"{time.perf_counter() - started:.1f}s, {len(topk_problems)} problems; worst rel RMS "
              "per dtype: " + ", ".join(f"{k} {v:.2e}" for k, v in topk_checker.worst.items()))
        report.update(topk_cases=topk_checker.cases, topk_worst_rel_rms=topk_checker.worst)
        problems += topk_problems
    if "pkm" in ops:
        started = time.perf_counter()
        pkm_checker = run_pkm_checks(ext, args.quick)
        pkm_problems = pkm_checker.failures + check_pkm_errors(ext)
        print(f"pkm correctness: {pkm_checker.cases} cases in "
              f"{time.perf_counter() - started:.1f}s, {len(pkm_problems)} problems; worst rel RMS "
              "per dtype: " + ", ".join(f"{k} {v:.2e}" for k, v in pkm_checker.worst.items()))
        report.update(pkm_cases=pkm_checker.cases, pkm_worst_rel_rms=pkm_checker.worst)
        problems += pkm_problems
    for family, run_family in (("write", run_write_checks), ("dense", run_dense_checks),
                               ("attn", run_attention_checks)):
        if family not in ops:
            continue
        started = time.perf_counter()
        family_checker = run_family(ext, args.quick)
        family_problems = family_checker.failures
        if family == "attn":
            family_problems = family_problems + check_attention_errors(ext)
        elif family == "write" or "write" not in ops:  # the bad calls cover both families once
            family_problems = family_problems + check_write_errors(ext)
        print(f"{family} correctness: {family_checker.cases} cases in "
              f"{time.perf_counter() - started:.1f}s, {len(family_problems)} problems; worst rel "
              "RMS per dtype: "
              + ", ".join(f"{k} {v:.2e}" for k, v in family_checker.worst.items()))
        report.update({f"{family}_cases": family_checker.cases,
                       f"{family}_worst_rel_rms": family_checker.worst})
        problems += family_problems
    report["problems"] = problems
    if args.huge and "merge" in ops:
        problems += huge_rows(ext)
    if args.bench:
        report["bench"] = (bench(ext, ref) if "merge" in ops else []) + (
            bench_topk(ext) if "topk" in ops else []) + (bench_pkm(ext) if "pkm" in ops else [])
    for problem in problems[:50]:
        print("FAIL", problem)
    print(f"total problems: {len(problems)}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
