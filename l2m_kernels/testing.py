"""Test helpers shared by the test suite, the numerics check and the benchmarks.

- :func:`assert_close` judges a fused result against a reference by relative RMS error,
  ``rms(actual - expected) / rms(expected)``, with a per-dtype tolerance (:data:`TOLERANCE`).
- :func:`poisoned_outputs` pre-fills every output buffer of the fused launchers with NaN;
  :func:`nan_filled` makes one such buffer for a kernel called directly.
- :func:`assert_valid_topk` judges a top-k selection against the float64 scores of every slot
  (:func:`read_scores`, :func:`product_key_scores`).
- :func:`assert_outputs_and_grads_close` judges a fused call's outputs and gradients at once.
- :func:`rand`, :func:`rand_lse` and friends draw fresh random inputs (never zeros).
- :func:`fused_backend_params` and :func:`skip_unless_served` give the tests their backends.
"""
from __future__ import annotations

import math

import torch

from ._alloc import poisoned_outputs  # noqa: F401  (re-exported for tests)

# Relative RMS error allowed for a fused path against the reference computed in float64, per input
# dtype. float32 runs accumulate in float32 (no TF32); half types load/store in 16 bits.
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def rel_rms_error(actual: torch.Tensor, expected: torch.Tensor, scale: float = 0.0) -> float:
    """``rms(actual - expected) / max(rms(expected), scale)``, computed in float64; 0 for two empty
    tensors.

    Positions where both are equal (including matching infinities) count as zero error; a NaN in
    ``actual`` where ``expected`` has none gives ``inf``. ``scale`` floors the denominator for a
    quantity that can cancel to near zero (e.g. an lse gradient ``dlse + w * (pa - pb)``): judged on
    the scale of its inputs instead.
    """
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    if a.shape != e.shape:
        raise AssertionError(f"shape mismatch: {tuple(a.shape)} vs {tuple(e.shape)}")
    if a.numel() == 0:
        return 0.0
    if not torch.equal(torch.isnan(a), torch.isnan(e)):
        return math.inf
    same = (a == e) | (torch.isnan(a) & torch.isnan(e))
    diff = torch.where(same, torch.zeros_like(a), a - e)
    if not torch.isfinite(diff).all():
        return math.inf
    finite_e = torch.where(torch.isfinite(e), e, torch.zeros_like(e))
    denom = max(finite_e.square().mean().sqrt().item(), scale)
    num = diff.square().mean().sqrt().item()
    if denom == 0.0:
        return num
    return num / denom


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, dtype=None, tol=None, *,
                 baseline: torch.Tensor | None = None, baseline_factor: float = 2.0,
                 scale: float = 0.0):
    """Fail unless ``actual`` matches ``expected`` within the relative RMS tolerance of ``dtype``.

    ``dtype`` defaults to ``actual.dtype`` (float32 for integer/float32 tensors such as lse);
    ``tol`` overrides the table. ``baseline`` (flash-attention's rule): the same computation done by
    PyTorch at the input dtype; the limit is then at least ``baseline_factor`` times the baseline's
    own error, for results where one rounding (one or two rows, a float32 sum over D) can exceed the
    table alone. ``scale`` floors the denominator (:func:`rel_rms_error`). Returns the error.
    """
    if dtype is None:
        dtype = actual.dtype if actual.is_floating_point() else torch.float32
    limit = TOLERANCE[dtype] if tol is None else tol
    if baseline is not None:
        baseline_err = rel_rms_error(baseline, expected, scale)
        if math.isfinite(baseline_err):
            limit = max(limit, baseline_factor * baseline_err)
    err = rel_rms_error(actual, expected, scale)
    if not err <= limit:
        raise AssertionError(f"{name}: relative RMS error {err:.3e} exceeds {limit:.1e} ({dtype})")
    return err


def nan_filled(shape, dtype: torch.dtype, device="cpu", *, misalign: int = 0) -> torch.Tensor:
    """An output buffer pre-filled with NaN, so an element a kernel forgets to write fails the
    comparison. ``misalign > 0`` starts it that many elements after its allocation."""
    flat = torch.full((math.prod(shape) + misalign,), math.nan, dtype=dtype, device=device)
    return flat[misalign:].view(tuple(shape))


def placed(tensor: torch.Tensor, misalign: int) -> torch.Tensor:
    """A contiguous copy of ``tensor`` whose data starts ``misalign`` elements after its allocation
    (unaligned base pointers for the kernels' scalar and peeled vector paths)."""
    flat = torch.empty(tensor.numel() + misalign, dtype=tensor.dtype, device=tensor.device)
    view = flat[misalign:].view(tensor.shape)
    view.copy_(tensor)
    return view


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality, NaN payloads included (``torch.equal`` fails on NaN)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.is_floating_point:
        view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.contiguous().view(view), b.contiguous().view(view))
    return torch.equal(a, b)


def rand(*shape, dtype=torch.float32, device="cpu", scale: float = 1.0, requires_grad=False,
         generator=None) -> torch.Tensor:
    """Standard normal data times ``scale``, in ``dtype`` (drawn in float32, then cast)."""
    t = torch.randn(tuple(shape), dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                    device=device, generator=generator) * scale
    t = t.to(dtype)
    return t.requires_grad_(requires_grad)


def rand_unit(*shape, dtype=torch.float32, device="cpu", requires_grad=False) -> torch.Tensor:
    """Uniform data in (0, 1), never exactly 0: for gates, weights and erase vectors."""
    base = torch.float64 if dtype == torch.float64 else torch.float32
    t = torch.rand(tuple(shape), dtype=base, device=device).clamp_min(1e-3).to(dtype)
    return t.requires_grad_(requires_grad)


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of log-sum-exp tensors for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rand_lse(*shape, dtype=torch.float32, device="cpu", requires_grad=False) -> torch.Tensor:
    """Random log-sum-exp values (float32, or float64 for float64 inputs) around 0 +- 3."""
    t = torch.randn(tuple(shape), dtype=lse_dtype(dtype), device=device) * 3.0
    return t.requires_grad_(requires_grad)


def fresh_like(tensor: torch.Tensor, requires_grad=None) -> torch.Tensor:
    """A detached copy (same dtype, device, values) that is a new autograd leaf."""
    rg = tensor.requires_grad if requires_grad is None else requires_grad
    return tensor.detach().clone().requires_grad_(rg)


def fused_backend_params(op: str):
    """pytest params ``(backend, device)`` for every fused backend of ``op``: cpu on CPU tensors,
    triton on CUDA tensors (or on CPU tensors through the interpreter when there is no GPU), cuda on
    CUDA tensors. Unavailable ones are skipped with the backend's own reasons (e.g. "needs CUDA")."""
    import pytest

    from . import backends

    params = []
    has_cuda = torch.cuda.is_available()
    for name, device in (("cpu", "cpu"), ("triton", "cuda" if has_cuda else "cpu"), ("cuda", "cuda")):
        b = backends.BACKENDS[name]
        if op not in b.ops:
            continue
        if device == "cuda" and not has_cuda:
            reasons = ["needs CUDA"]
        else:
            reasons = b.not_supported_reasons(op, torch.device(device), torch.float32)
        marks = [pytest.mark.skip(reason=f"{name}: " + "; ".join(reasons))] if reasons else []
        params.append(pytest.param(name, device, marks=marks, id=f"{name}-{device}"))
    return params


def skip_unless_served(backend: str, dtype: torch.dtype) -> None:
    """Skip the calling test, saying why, when ``backend`` does not serve ``dtype`` (the SPEC:
    float64 on the reference and cpu backends only)."""
    import pytest

    from . import backends

    if dtype not in backends.BACKENDS[backend].dtypes:
        pytest.skip(f"{backend} does not support {dtype} (SPEC: float64 on reference and cpu only)")


def assert_outputs_and_grads_close(outputs, inputs, ref_outputs, ref_inputs, dtype, *,
                                   output_names, input_names):
    """Judge a fused call and its backward against the float64 reference, by :func:`assert_close`
    at ``dtype``.

    Args:
        outputs:     the fused call's float outputs, differentiable with respect to ``inputs``.
        inputs:      its input tensors (autograd leaves, ``requires_grad``), any device.
        ref_outputs: the reference's outputs, of the same shapes, computed from ``ref_inputs``.
        ref_inputs:  float64 CPU leaves holding the same values as ``inputs``.

    Each output is compared with its reference; then one random cotangent per output (:func:`rand`
    at the output's dtype and device) is pulled back through both, and every input's gradient must
    have its input's shape and dtype and match the reference's. Returns the fused gradients.
    """
    for name, actual, expected in zip(output_names, outputs, ref_outputs):
        assert_close(name, actual, expected, dtype)
    cotangents = [rand(*t.shape, dtype=t.dtype, device=t.device) for t in outputs]
    grads = torch.autograd.grad(outputs, inputs, cotangents)
    ref_grads = torch.autograd.grad(ref_outputs, ref_inputs, [c.double().cpu() for c in cotangents])
    for name, grad, ref_grad, leaf in zip(input_names, grads, ref_grads, inputs):
        assert grad.shape == leaf.shape and grad.dtype == leaf.dtype, name
        assert_close(name, grad, ref_grad, dtype)
    return grads


# -- top-k selections --------------------------------------------------------------------------

# The slack allowed between the float64 scores of a selected slot and of a slot it displaced (or
# of two entries out of order), relative to max(1, largest |score|), by the precision in which the
# kernel computes the scores it ranks: rounding can swap slots whose scores differ by less. The
# CPU and CUDA kernels accumulate scores in float32 from any input dtype (float64 for float64);
# a backend that rounds scores to a 16-bit dtype needs that dtype's row.
SELECTION_TOLERANCE = {
    torch.float64: 1e-12,
    torch.float32: 2e-5,
    torch.float16: 2e-2,
    torch.bfloat16: 2e-2,
}


def read_scores(q: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """float64 scores ``scale * <q, keys_n>`` of every slot, on the CPU, for a top-k read.

    Args:
        q:     (B, H, T, Dk).
        keys:  (B, Hm, N, Dk), or shared by the batch (Hm, N, Dk); H % Hm == 0, query head h reads
               memory head h // (H // Hm).
        scale: python float.

    Returns:
        (B, H, T, N) float64.

    Equivalent PyTorch:
        keys_h = keys.double().repeat_interleave(H // Hm, dim=-3)
        scores = (scale * q.double()) @ keys_h.transpose(-1, -2)
    """
    q64 = q.detach().double().cpu()
    keys64 = keys.detach().double().cpu()
    batch, heads = q64.shape[:2]
    if keys64.dim() == 3:
        keys64 = keys64.unsqueeze(0).expand(batch, *keys64.shape)
    keys64 = keys64.repeat_interleave(heads // keys64.shape[1], dim=1)
    return (q64 * scale) @ keys64.transpose(-1, -2)


def _rank(scores: torch.Tensor) -> torch.Tensor:
    """Scores as the kernels rank them: NaN like +inf."""
    return scores.detach().double().cpu().nan_to_num(nan=math.inf, posinf=math.inf,
                                                     neginf=-math.inf)


def selection_tolerance(scores: torch.Tensor, score_dtype: torch.dtype = torch.float32) -> float:
    """:data:`SELECTION_TOLERANCE` of ``score_dtype`` times max(1, largest finite |score|)."""
    finite = scores[torch.isfinite(scores)]
    magnitude = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    return SELECTION_TOLERANCE[score_dtype] * magnitude


def product_key_scores(q: torch.Tensor, subkeys: torch.Tensor, k_sub: int, scale: float,
                       score_dtype: torch.dtype = torch.float32):
    """The float64 candidate scores of a product-key read, as scores over slots for
    :func:`assert_valid_topk`.

    Args:
        q:           (B, H, T, Dk), Dk even.
        subkeys:     (H, 2, n_sub, Dk // 2).
        k_sub:       candidates kept per half.
        scale:       python float.
        score_dtype: as in :func:`assert_valid_topk`; sets the slack of the sub-key selection.

    Returns:
        ``(scores, selectable, candidates)``, each (B, H, T, n_sub ** 2) on the CPU: ``scores``
        float64 ``s1[i] + s2[j]`` at slot ``i * n_sub + j``; ``candidates`` bool, the slots whose
        two sub-keys are among their half's ``k_sub`` best in float64 (equal scores: the smaller
        index; NaN as the largest), which a selection must beat; ``selectable`` bool, the slots
        whose sub-keys score within the selection tolerance of their half's ``k_sub``-th best (a
        kernel's rounding may swap sub-keys there).

    Equivalent PyTorch:
        s1 = scale * q[..., :Dk // 2] @ subkeys[:, 0].mT
        s2 = scale * q[..., Dk // 2:] @ subkeys[:, 1].mT
        scores = (s1[..., :, None] + s2[..., None, :]).flatten(-2)
    """
    q64 = q.detach().double().cpu()
    sub64 = subkeys.detach().double().cpu()
    half = q64.shape[-1] // 2
    s1 = (q64[..., :half] @ sub64[:, 0].transpose(-1, -2)) * scale  # (B, H, T, n_sub)
    s2 = (q64[..., half:] @ sub64[:, 1].transpose(-1, -2)) * scale
    scores = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)
    tol = selection_tolerance(_rank(scores), score_dtype)
    masks = []
    for half_scores in (s1, s2):
        rank = _rank(half_scores)
        best, order = rank.sort(dim=-1, descending=True, stable=True)
        in_top = torch.zeros_like(rank, dtype=torch.bool).scatter_(-1, order[..., :k_sub], True)
        near_top = rank >= best[..., k_sub - 1:k_sub] - tol
        masks.append((in_top, near_top))
    (top1, near1), (top2, near2) = masks
    candidates = (top1.unsqueeze(-1) & top2.unsqueeze(-2)).flatten(-2)
    selectable = (near1.unsqueeze(-1) & near2.unsqueeze(-2)).flatten(-2)
    return scores, selectable, candidates


def _row_name(flat_row: int, lead_shape) -> str:
    index = []
    for size in reversed(tuple(lead_shape)):
        index.append(flat_row % size)
        flat_row //= size
    return f"row {tuple(reversed(index))}"


def assert_valid_topk(slot_ids: torch.Tensor, scores: torch.Tensor, *, valid_len=None,
                      selectable: torch.Tensor | None = None,
                      competitors: torch.Tensor | None = None,
                      score_dtype: torch.dtype = torch.float32, tol: float | None = None,
                      name: str = "slot_ids", ties: bool = True) -> None:
    """Fail (AssertionError naming the first failing row) unless ``slot_ids`` is a valid top-k
    selection of ``scores``.

    Args:
        slot_ids:    (..., k) integer: a kernel's selection, in descending score order, -1 for
                     missing entries (after the real ones).
        scores:      (..., N) the float64 score of every slot (:func:`read_scores`,
                     :func:`product_key_scores`). NaN ranks as +inf, as the kernels rank it.
        valid_len:   None or (B,) integer: slots ``n >= valid_len[b]`` of batch ``b`` (the first
                     dimension) do not exist.
        selectable:  None or (..., N) bool: the slots that may be selected (default: every
                     existing slot).
        competitors: None or (..., N) bool: the slots the selection must beat (default: the
                     selectable ones); a row has ``min(k, existing competitors)`` real entries.
        score_dtype: the precision in which the kernel computes the scores it ranks (float32 for
                     the CPU and CUDA kernels on every input dtype but float64); the slack is
                     :data:`SELECTION_TOLERANCE` of it times max(1, largest finite |score|).
        tol:         an absolute slack instead.
        name:        what the messages call the selection.
        ties:        check the exact-tie rules (below). False for a product-key read, which orders
                     candidates of equal score by their sub-keys' ranks, not by slot.

    Checks: ids in [-1, N); no -1 before a real entry; no slot twice; every selected slot exists
    (and is selectable); the number of real entries; top-k: every selected score >= every
    unselected competitor's - slack; order: no entry scores more than the slack above an earlier
    one; exact ties (equal float64 scores: integer data, or NaN / infinite scores): the smaller
    slot wins, so it is selected rather than an unselected competitor of the same score, and
    comes before an entry of the same score.
    """
    ids = slot_ids.detach().cpu().long()
    rank = _rank(scores)
    lead, num_slots, k = rank.shape[:-1], rank.shape[-1], ids.shape[-1]
    if tuple(ids.shape[:-1]) != tuple(lead):
        raise AssertionError(f"{name}: shape {tuple(ids.shape)} does not match the scores' "
                             f"{tuple(rank.shape)} (..., k) vs (..., N)")
    exists = torch.ones(rank.shape, dtype=torch.bool)
    if valid_len is not None:
        lengths = torch.as_tensor(valid_len).detach().cpu().long()
        exists = torch.arange(num_slots) < lengths.view(-1, *([1] * (rank.dim() - 1)))
        exists = exists.expand(rank.shape)
    allowed = exists if selectable is None else exists & selectable.detach().cpu()
    rivals = allowed if competitors is None else exists & competitors.detach().cpu()
    if ids.numel() == 0:
        return
    slack = selection_tolerance(rank, score_dtype) if tol is None else tol

    rows = ids.reshape(-1, k)
    rank = rank.reshape(-1, num_slots)
    allowed = allowed.reshape(-1, num_slots)
    rivals = rivals.reshape(-1, num_slots)

    def check(bad: torch.Tensor, what):
        """Raise unless ``bad`` is all false. ``bad``: [rows] or [rows, positions] bool; ``what``:
        the message, or a function that writes it from the first failing row (and, for
        [rows, positions], that row's first failing position)."""
        if not bad.any():
            return
        bad_rows = bad if bad.dim() == 1 else bad.any(-1)
        row = int(bad_rows.nonzero()[0])
        if callable(what):
            what = what(row) if bad.dim() == 1 else what(row, int(bad[row].nonzero()[0]))
        shown = rows[row].tolist()
        listing = str(shown[:16])[:-1] + (", ...]" if len(shown) > 16 else "]")
        raise AssertionError(f"{name}: {what} in {int(bad_rows.sum())} row(s), first "
                             f"{_row_name(row, lead)}: {listing}")

    check((rows < -1) | (rows >= num_slots), f"slot ids outside [-1, {num_slots})")
    real = rows >= 0
    check(~real[:, :-1] & real[:, 1:], "a missing entry (-1) before a real one")
    ordered = rows.sort(dim=-1).values
    check((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0),
          lambda r, p: f"slot {int(ordered[r, p + 1])} selected twice")
    hits = torch.zeros(rank.shape, dtype=torch.int64).scatter_add_(1, rows.clamp_min(0),
                                                                  real.long())
    chosen = hits > 0
    check(chosen & ~exists.reshape(-1, num_slots),
          lambda r, slot: f"slot {slot} selected, which does not exist (slot >= valid_len)")
    check(chosen & ~allowed, lambda r, slot: f"slot {slot} selected, which is not selectable")
    want = rivals.sum(-1).clamp(max=k)
    count = real.sum(-1)
    check(count != want, lambda r: f"{int(count[r])} real entries where min(k = {k}, existing = "
                                   f"{int(rivals[r].sum())}) = {int(want[r])} are due")

    inf = math.inf
    lowest = torch.where(chosen, rank, inf).amin(-1)
    left = rivals & ~chosen
    highest_left = torch.where(left, rank, -inf).amax(-1)

    def displaced(r):
        low = int(torch.where(chosen[r], rank[r], inf).argmin())
        high = int(torch.where(left[r], rank[r], -inf).argmax())
        return (f"not a top-k: slot {low} (score {rank[r, low].item():.6g}) selected, slot "
                f"{high} (score {rank[r, high].item():.6g}) left out, slack {slack:.2e}")
    check(~(lowest >= highest_left - slack), displaced)

    picked = torch.where(real, rank.gather(1, rows.clamp_min(0)), -inf)
    later_best = torch.cat([picked.flip(1).cummax(1).values.flip(1)[:, 1:],
                            torch.full_like(picked[:, :1], -inf)], dim=1)
    check(later_best > picked + slack,
          lambda r, i: (f"wrong order: entry {i} (slot {int(rows[r, i])}, score "
                        f"{picked[r, i].item():.6g}) before a higher-scoring one (score "
                        f"{later_best[r, i].item():.6g}), slack {slack:.2e}"))

    if not ties:
        return
    # Exact ties, selection: order every slot by (score descending, slot ascending); within a run
    # of equal scores no selected slot may follow an unselected competitor.
    sorted_rank, by_rank = rank.sort(dim=1, descending=True, stable=True)
    chosen_sorted = chosen.gather(1, by_rank)
    left_sorted = left.gather(1, by_rank)
    new_run = torch.ones_like(chosen_sorted)
    new_run[:, 1:] = sorted_rank[:, 1:] != sorted_rank[:, :-1]
    run_id = new_run.flatten().cumsum(0).sub_(1).view_as(new_run)
    position = torch.arange(num_slots).expand_as(run_id)
    first_left = torch.full((int(run_id.max()) + 1,), num_slots, dtype=torch.int64)
    first_left.scatter_reduce_(0, run_id[left_sorted], position[left_sorted], reduce="amin")

    def lost(r, p):
        winner = int(by_rank[r, p])
        loser = int(by_rank[r, int(first_left[run_id[r, p]])])
        return (f"wrong tie: slots {loser} and {winner} score exactly "
                f"{rank[r, winner].item():.6g}; the smaller slot wins, but {winner} was "
                f"selected and {loser} left out")
    check(chosen_sorted & (position > first_left[run_id]), lost)
    # Exact ties, order: entries of equal score (stable sort keeps their positions' order) come
    # by ascending slot.
    sorted_picked, by_score = picked.sort(dim=1, descending=True, stable=True)
    slots_sorted = rows.gather(1, by_score)
    same = (sorted_picked[:, 1:] == sorted_picked[:, :-1]) & real.gather(1, by_score)[:, 1:]
    check(same & (slots_sorted[:, 1:] < slots_sorted[:, :-1]),
          lambda r, p: (f"wrong tie order: slots {int(slots_sorted[r, p])} and "
                        f"{int(slots_sorted[r, p + 1])} score exactly "
                        f"{sorted_picked[r, p].item():.6g}; the smaller slot comes first"))
