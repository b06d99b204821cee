"""The small per-token operations of a decoder layer, each one kernel: RMSNorm (with the residual
add before it), the rotary embedding of queries and keys, and SiLU(gate) * up.

Decoding one token runs a layer's matrix products in a few microseconds each; done as torch
operations, these steps take about thirty more kernels a layer (casts, powers, means, halves
concatenated), each a launch and a trip through memory. One kernel each keeps the arithmetic and
rounding of the torch form, so results do not change: float32 inside, rounded to the activations'
dtype where the torch form rounds.

- `rms_norm(x, weight, eps, residual=None)`: weight * (x / rms(x)), the normalised x rounded to
  x's dtype before the weight multiplies it; with `residual`, x + residual first (rounded), and
  that sum comes back too (the next residual).
- `rotary(q, k, cos, sin)`: q and k [T, heads, head_dim] rotated by their token's angles (the
  halves convention: x * cos + [-x2, x1] * sin), both in one launch.
- `rotary_into_cache(q, k, v, cos, sin, k_cache, v_cache, slots)`: the same rotation, with the
  rotated keys and the values written straight into their paged-cache slots (a cache of the
  activations' dtype): the rotary embedding and the KV store of a layer in one launch, where they
  were three (two `index_copy_`, as long together as the decode attention at one sequence).
- `silu_mul(gate, up)`: SiLU(gate) * up.

Each has a plain-torch reference that defines it and runs anywhere, and a Triton twin
(`triton_*`); the dispatchers run Triton on CUDA and the reference elsewhere or with
QTOOL_KERNELS=reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qtool.kernels.dependent_launch import dependent_launch
from qtool.kernels.paged_attention import store_kv
from qtool.kernels.pending import PendingSum, alike, in_triton

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# Launch options of every kernel here: no fused multiply-adds. Triton contracts a * b + c into one
# FMA by default, which skips the rounding torch applies to a * b and changes the last bit.
TORCH_ROUNDING = {"enable_fp_fusion": False}


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    if residual is not None:
        x = x + residual
    dtype = x.dtype
    normed = x.float()
    normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * normed.to(dtype)
    return out if residual is None else (out, x)


def rms_norm(x: torch.Tensor | PendingSum, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm over the last dimension; with `residual`, of x + residual, returning (normed, sum).
    x may be a pending product (`qtool.kernels.pending`), finished as it is read."""
    if not in_triton(x):
        return reference_rms_norm(x, weight, eps, residual)
    return triton_rms_norm(x, weight, eps, residual)


def triton_rms_norm(x: torch.Tensor | PendingSum, weight: torch.Tensor, eps: float,
                    residual: torch.Tensor | None = None):
    size, dtype = x.shape[-1], x.dtype
    pending, (rows,) = alike(x, fits=lambda sums: sums.is_contiguous())
    rows = rows.reshape(-1, size).contiguous()
    out = torch.empty(rows.shape, device=rows.device, dtype=torch.promote_types(weight.dtype, dtype))
    summed = torch.empty(rows.shape, device=rows.device, dtype=dtype) if residual is not None else rows
    block = triton.next_power_of_2(size)
    _rms_norm_kernel[(rows.shape[0],)](
        rows, rows if residual is None else residual.reshape(-1, size).contiguous(), weight.contiguous(), out, summed,
        size, eps, HAS_RESIDUAL=residual is not None, PENDING=pending, DTYPE=TL_DTYPES[dtype], BLOCK=block,
        num_warps=max(1, min(16, block // 256)), **dependent_launch(rows.device), **TORCH_ROUNDING)
    out = out.view(x.shape)
    return out if residual is None else (out, summed.view(x.shape))


def reference_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    def rotate(x):
        half = x.shape[-1] // 2
        turned = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos.to(x.dtype)[:, None, :] + turned * sin.to(x.dtype)[:, None, :]

    return rotate(q), rotate(k)


def rotary(q: torch.Tensor | PendingSum, k: torch.Tensor | PendingSum, cos: torch.Tensor, sin: torch.Tensor):
    """q [T, heads, head_dim] and k [T, kv_heads, head_dim] rotated by cos, sin [T, head_dim]; q and
    k (and v below) may be pending products, finished as they are read."""
    if not in_triton(q):
        return reference_rotary(q, k, cos, sin)
    return triton_rotary(q, k, cos, sin)


def triton_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q and k may be views with a token stride of their own (slices of one q/k/v product)."""
    k_out = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    return _rotate(q, k, cos, sin, k_out), k_out


def rotary_into_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """q rotated; k rotated and v [T, kv_heads, head_dim] stored at the cache slots [T] of one
    layer's k_cache and v_cache [blocks, block_size, kv_heads, head_dim] (not float8)."""
    if not in_triton(q):
        q, k = reference_rotary(q, k, cos, sin)
        store_kv(k, v, k_cache, v_cache, slots)
        return q
    return _rotate(q, k, cos, sin, k_cache, (v, v_cache, slots))


def _rotate(q, k, cos: torch.Tensor, sin: torch.Tensor, k_target: torch.Tensor, values: tuple | None = None
            ) -> torch.Tensor:
    """The rotated q (packed); the rotated k into `k_target`: packed [T, kv_heads, head_dim], or, with
    `values` = (v, v_cache, slots), a cache whose slot slots[t] takes token t, as v_cache takes v."""
    tokens, heads, head_dim = q.shape
    kv_heads, dtype = k.shape[1], q.dtype
    v, v_cache, slots = values if values is not None else (k, k_target, k_target)  # unread without STORE
    pending, (q, k, v) = alike(q, k, v, fits=_heads_packed)
    q, k, v = (x if _heads_packed(x) else x.contiguous() for x in (q, k, v))
    cos, sin = cos.contiguous(), sin.contiguous()
    q_out = torch.empty(q.shape, device=q.device, dtype=dtype)
    _rotary_kernel[(tokens, heads + kv_heads)](
        q, k, v, cos, sin, q_out, k_target, v_cache, slots, q.stride(0), k.stride(0), v.stride(0), HEADS=heads,
        KV_HEADS=kv_heads, HALF=head_dim // 2, HALF_PAD=triton.next_power_of_2(head_dim // 2), STORE=values is not None,
        PENDING=pending, DTYPE=TL_DTYPES[dtype], num_warps=1, **dependent_launch(q.device), **TORCH_ROUNDING)
    return q_out


def _heads_packed(x: torch.Tensor) -> bool:
    """Whether x [T, heads, head_dim] has each token's heads packed (any token stride)."""
    return x.stride(2) == 1 and x.stride(1) == x.shape[2]


def reference_silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def silu_mul(gate: torch.Tensor | PendingSum, up: torch.Tensor | PendingSum) -> torch.Tensor:
    """SiLU(gate) * up, SiLU's result rounded to gate's dtype first, as torch does; gate and up may
    be pending products, finished as they are read."""
    if not in_triton(gate):
        return reference_silu_mul(gate, up)
    return triton_silu_mul(gate, up)


def triton_silu_mul(gate: torch.Tensor | PendingSum, up: torch.Tensor | PendingSum) -> torch.Tensor:
    """gate and up may be views with a row stride of their own (halves of one gate/up product)."""
    width, dtype = gate.shape[-1], gate.dtype
    pending, rows = alike(gate, up, fits=lambda sums: sums.dim() == 2 and sums.stride(1) == 1)
    gate_rows, up_rows = (_rows(x) for x in rows)
    out = torch.empty(gate.shape, device=gate_rows.device, dtype=dtype)
    _silu_mul_kernel[(gate_rows.shape[0], triton.cdiv(width, SILU_BLOCK))](
        gate_rows, up_rows, out, width, gate_rows.stride(0), up_rows.stride(0), PENDING=pending,
        DTYPE=TL_DTYPES[dtype], BLOCK=SILU_BLOCK, num_warps=4, **dependent_launch(out.device), **TORCH_ROUNDING)
    return out


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as rows [-1, last dim] with unit column stride (a view where it can be)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(1) == 1 else rows.contiguous()


SILU_BLOCK = 1024


if triton is not None:
    from qtool.kernels.dependent_launch import wait_for_previous
    from qtool.kernels.pending import TL_DTYPES, load_finished

    @triton.jit
    def _rms_norm_kernel(x_ptr, residual_ptr, w_ptr, out_ptr, sum_ptr, size, eps, HAS_RESIDUAL: tl.constexpr,
                         PENDING: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        row = tl.program_id(0).to(tl.int64) * size
        cols = tl.arange(0, BLOCK)
        inside = cols < size
        weight = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)  # a constant: before the wait
        wait_for_previous(PDL)
        x = load_finished(x_ptr + row + cols, inside, PENDING, DTYPE)
        if HAS_RESIDUAL:  # the sum rounded to the activations' dtype, as torch's addition rounds it
            x = (x.to(tl.float32) + tl.load(residual_ptr + row + cols, mask=inside, other=0.0).to(tl.float32))
            x = x.to(sum_ptr.dtype.element_ty)
            tl.store(sum_ptr + row + cols, x, mask=inside)
        wide = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(wide * wide, axis=0) / size + eps)
        normed = (wide * rstd).to(DTYPE).to(tl.float32)
        tl.store(out_ptr + row + cols, (normed * weight).to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _rounded(x, dtype: tl.constexpr):
        """x rounded to `dtype` and back to float32: the rounding of a torch operation in `dtype`."""
        return x.to(dtype).to(tl.float32)

    @triton.jit
    def _rotary_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr, v_out_ptr, slots_ptr, q_stride,
                       k_stride, v_stride, HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr,
                       HALF_PAD: tl.constexpr, STORE: tl.constexpr, PENDING: tl.constexpr, DTYPE: tl.constexpr,
                       PDL: tl.constexpr):
        """One head of one token: program (token, head), heads first, then kv heads. The inputs'
        tokens are `q_stride` / `k_stride` / `v_stride` elements apart; the outputs are packed, the
        keys (and, STORE, the values copied as they are) at row slots[token] of the cache. PENDING:
        the inputs are a product's float32 sums, finished as they are read."""
        wait_for_previous(PDL)
        token, head = tl.program_id(0).to(tl.int64), tl.program_id(1)
        dims = tl.arange(0, HALF_PAD)
        inside = dims < HALF
        if head < HEADS:
            source = q_ptr + token * q_stride + head * 2 * HALF
            target = q_out_ptr + (token * HEADS + head) * 2 * HALF
        else:
            kv_head = head - HEADS
            row = token
            if STORE:
                row = tl.load(slots_ptr + token).to(tl.int64)
            source = k_ptr + token * k_stride + kv_head * 2 * HALF
            target = k_out_ptr + (row * KV_HEADS + kv_head) * 2 * HALF
            if STORE:
                values = v_ptr + token * v_stride + kv_head * 2 * HALF
                stored = v_out_ptr + (row * KV_HEADS + kv_head) * 2 * HALF
                tl.store(stored + dims, load_finished(values + dims, inside, PENDING, DTYPE), mask=inside)
                tl.store(stored + HALF + dims, load_finished(values + HALF + dims, inside, PENDING, DTYPE), mask=inside)
        first = load_finished(source + dims, inside, PENDING, DTYPE).to(tl.float32)
        second = load_finished(source + HALF + dims, inside, PENDING, DTYPE).to(tl.float32)
        angles = cos_ptr + token * 2 * HALF
        cos_first = _rounded(tl.load(angles + dims, mask=inside, other=0.0), DTYPE)
        cos_second = _rounded(tl.load(angles + HALF + dims, mask=inside, other=0.0), DTYPE)
        angles = sin_ptr + token * 2 * HALF
        sin_first = _rounded(tl.load(angles + dims, mask=inside, other=0.0), DTYPE)
        sin_second = _rounded(tl.load(angles + HALF + dims, mask=inside, other=0.0), DTYPE)
        # x * cos + [-second, first] * sin, each product and the sum rounded as in DTYPE
        out_first = _rounded(first * cos_first, DTYPE) + _rounded(-second * sin_first, DTYPE)
        out_second = _rounded(second * cos_second, DTYPE) + _rounded(first * sin_second, DTYPE)
        out_type = target.dtype.element_ty
        tl.store(target + dims, out_first.to(out_type), mask=inside)
        tl.store(target + HALF + dims, out_second.to(out_type), mask=inside)

    @triton.jit
    def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, width, gate_stride, up_stride, PENDING: tl.constexpr,
                         DTYPE: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        """BLOCK columns of one row: program (row, column block); PENDING, gate and up are a product's
        float32 sums, finished as they are read."""
        wait_for_previous(PDL)
        row = tl.program_id(0).to(tl.int64)
        columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = columns < width
        gate = load_finished(gate_ptr + row * gate_stride + columns, inside, PENDING, DTYPE).to(tl.float32)
        up = load_finished(up_ptr + row * up_stride + columns, inside, PENDING, DTYPE).to(tl.float32)
        silu = _rounded(gate / (1.0 + tl.exp(-gate)), DTYPE)
        tl.store(out_ptr + row * width + columns, (silu * up).to(DTYPE), mask=inside)
