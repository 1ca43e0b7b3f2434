"""Triton kernels of the fused windowed cascaded group attention (CUDA; CPU only for tests).

Work split (docs/triton.md, "Triton kernels (GPU)"), per call:

* forward, for each head in turn (the cascade makes heads sequential): the 1x1 qkv conv as one
  cuBLAS GEMM over every window's tokens (``torch.addmm``), then ``_cga_fwd_kernel``, one
  program per window: depthwise conv on q (a runtime loop over the ``K*K`` taps), scores + the
  relative-position bias, fp32 softmax, ``P V`` by channel chunks; it writes ``relu(o)`` into
  the NCHW map ``A`` (cropped) and the next head's input ``x chunk + o``. Finally the
  projection ``y = Wp A + bp``, one batched GEMM (``torch.baddbmm``).
* backward: the forward again, keeping every head's input and ``[q k v]``; the projection's
  gradients (cuBLAS); then for each head, last first, ``_cga_bwd_kernel`` (one program per
  window: back through relu, ``P V``, the softmax, the scores and the depthwise conv) and the
  qkv conv's input gradient as a GEMM, which is the x chunk's gradient and, through the
  cascade, the previous head's output gradient. Weight gradients are GEMMs over all tokens or
  per-window partial sums reduced by ``torch.sum``: no atomics, bitwise deterministic.

The GEMMs fill the GPU at batch 1; the attention kernels have one program per window. Matmuls
take the input dtype (fp16/bf16 tensor cores; fp32 as tf32 only when
``torch.backends.cuda.matmul.fp32_precision`` allows it, else IEEE) and accumulate in fp32;
softmax is fp32. Weights are cast to the input dtype first (autocast semantics; the bias table
stays fp32). Every size (H, W, heads, channels, key_dim, kernel, window) is a runtime argument
excluded from specialisation: one binary per dtype serves every image size and every stage.
:func:`kernel_specs` is the one place that chooses kernels, block sizes and warps, for the
launcher and for the offline compile check (:func:`compile_spec`,
``tools/triton_compile_check.py``).

Importing this module decorates the kernels: for CPU tests set ``TRITON_INTERPRET=1`` *before*
importing it (Triton reads the variable when the kernels are decorated).
"""
from __future__ import annotations

import contextlib
import inspect
import io
import math
import re
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from .cga_reference import check_cga_args
from .guard import InputTooLargeError
from .windows import relative_position_index, window_grid, window_reverse

__all__ = ['forward', 'backward', 'kernel_specs', 'KernelSpec', 'fp32_dot_precision',
           'compile_spec', 'stage_problems', 'unique_specs', 'SUPPORTED_DTYPES']

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# device code
#
# One program handles one (window, head): the cascade makes heads sequential, so the host
# launches the kernel once per head, and the dense 1x1 convs around the attention run as
# cuBLAS GEMMs between launches. A window is a BN-row tile (token n = r * ws + s; rows >= ws*ws
# are padding). Buffers hold tiles channel-major (element (token n, channel c) of window t at
# c * cs + t * BN + n with cs = windows * BN), zero-padded to whole BC / BKD chunks, so their
# loads are unmasked and vectorised; only the NCHW map and its gradients need masks.
#
# No loop over windows or heads in a kernel: LLVM hoists the per-thread shared-memory addresses
# of every layout conversion out of such a loop, and ~120 of them stayed live in registers.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _coords(ws, BN: tl.constexpr):
    """Row ``n`` of the window tile: ``(row, column, n < ws*ws)`` inside the window."""
    n = tl.arange(0, BN)
    r = n // ws
    return r, n - r * ws, n < ws * ws


@triton.jit
def _window(t, nh, nw, H, W, ws, BN: tl.constexpr):
    """Image of window ``t`` (image-major, row-major), the offsets ``y * W + x`` of its tokens
    in an NCHW plane and which tokens are inside the map."""
    nwin = nh * nw
    b = t // nwin
    w = t - b * nwin
    wy = w // nw
    r, s, in_win = _coords(ws, BN)
    yy = wy * ws + r
    xx = (w - wy * nw) * ws + s
    return b, yy * W + xx, in_win & (yy < H) & (xx < W)


@triton.jit
def _dwconv_q(qkv, cs, sq, dwt, dwb, h, K, ws, scale, BN: tl.constexpr, BKD: tl.constexpr):
    """``scale * (dwconv(q) + bias)`` with zeros outside the window. q is copied row-major
    into the scratch ``sq`` so that each neighbour read is one vector per token."""
    n = tl.arange(0, BN)
    j = tl.arange(0, BKD)
    tl.store(sq + n[:, None] * BKD + j[None, :], tl.load(qkv + j[None, :] * cs + n[:, None]))
    tl.debug_barrier()
    r, s, in_win = _coords(ws, BN)
    R = K // 2
    KK = K * K
    acc = tl.zeros([BN, BKD], dtype=tl.float32)
    for tap in range(0, KK):
        ty = tap // K
        rr = r + (ty - R)
        cc = s + (tap - ty * K - R)
        ok = in_win & (rr >= 0) & (rr < ws) & (cc >= 0) & (cc < ws)
        qn = tl.load(sq + (rr * ws + cc)[:, None] * BKD + j[None, :], mask=ok[:, None],
                     other=0.0)
        wt = tl.load(dwt + (h * KK + tap) * BKD + j).to(tl.float32)
        acc += qn * wt[None, :]
    return (acc + tl.load(dwb + h * BKD + j).to(tl.float32)[None, :]) * scale


@triton.jit
def _probs(qs, qkv, cs, abd, h, BN: tl.constexpr, BKD: tl.constexpr, PREC: tl.constexpr):
    """Softmax over keys of ``qs k^T + bias`` (fp32); ``abd`` is the dense per-head bias
    table, -inf on padding keys."""
    n = tl.arange(0, BN)
    j = tl.arange(0, BKD)
    kt = tl.load(qkv + (BKD + j)[:, None] * cs + n[None, :])
    sc = tl.dot(qs.to(kt.dtype), kt, input_precision=PREC)
    sc += tl.load(abd + h * BN * BN + n[:, None] * BN + n[None, :])
    p = tl.exp(sc - tl.max(sc, axis=1)[:, None])
    return p / tl.sum(p, axis=1)[:, None]


@triton.jit
def _pair_sum(ss, rr, rs, rm, ay, ax, ok, ws, BN: tl.constexpr):
    """Sum over query rows ``rr, rs`` of ``ss[n, m]`` for the key ``m`` at
    ``(rr + ay, rs + ax)``, per table entry (``ay``, ``ax`` vectors)."""
    kr = rr[:, None] + ay[None, :]
    kc = rs[:, None] + ax[None, :]
    ok = ok & rm[:, None] & (kr >= 0) & (kr < ws) & (kc >= 0) & (kc < ws)
    n = (rr * ws + rs)[:, None]
    return tl.sum(tl.load(ss + n * BN + kr * ws + kc, mask=ok, other=0.0), axis=0)


@triton.jit
def _bias_table_grad(ss, ws, BN: tl.constexpr, RB: tl.constexpr):
    """Sum of the score gradient ``ss`` (``BN x BN`` scratch) over the (query, key) pairs of
    each table entry ``|dy| * ws + |dx|``: the keys of entry ``(ay, ax)`` sit at
    ``(r +- ay, s +- ax)`` of each query; four gathers (signs deduplicated where ``ay`` or ``ax``
    is 0) over ``RB``-row blocks of queries."""
    e = tl.arange(0, BN)
    ay = e // ws
    ax = e - ay * ws
    em = e < ws * ws
    oky = em & (ay > 0)
    okx = em & (ax > 0)
    tot = tl.zeros([BN], dtype=tl.float32)
    for n0 in range(0, ws * ws, RB):
        rows = n0 + tl.arange(0, RB)
        rr = rows // ws
        rs = rows - rr * ws
        rm = rows < ws * ws
        tot += _pair_sum(ss, rr, rs, rm, ay, ax, em[None, :], ws, BN)
        tot += _pair_sum(ss, rr, rs, rm, -ay, ax, oky[None, :], ws, BN)
        tot += _pair_sum(ss, rr, rs, rm, ay, -ax, okx[None, :], ws, BN)
        tot += _pair_sum(ss, rr, rs, rm, -ay, -ax, (oky & okx)[None, :], ws, BN)
    return tot


@triton.jit
def _dwconv_q_backward(gqd, sq, sg, dwt, pdw, h, K, ws, BN: tl.constexpr, BKD: tl.constexpr):
    """Back through the depthwise conv: per-tap weight gradients of this window to ``pdw``,
    returns the gradient of q. ``sq`` holds q (row-major), ``gqd`` goes through ``sg``."""
    n = tl.arange(0, BN)
    j = tl.arange(0, BKD)
    tl.store(sg + n[:, None] * BKD + j[None, :], gqd)
    tl.debug_barrier()
    r, s, in_win = _coords(ws, BN)
    R = K // 2
    KK = K * K
    gq = tl.zeros([BN, BKD], dtype=tl.float32)
    for tap in range(0, KK):
        ty = tap // K
        dy = ty - R
        dx = tap - ty * K - R
        rr = r + dy
        cc = s + dx
        ok = in_win & (rr >= 0) & (rr < ws) & (cc >= 0) & (cc < ws)
        qn = tl.load(sq + (rr * ws + cc)[:, None] * BKD + j[None, :], mask=ok[:, None],
                     other=0.0)
        tl.store(pdw + tap * BKD + j, tl.sum(gqd * qn, axis=0))
        rb = r - dy
        cb = s - dx
        okb = in_win & (rb >= 0) & (rb < ws) & (cb >= 0) & (cb < ws)
        gn = tl.load(sg + (rb * ws + cb)[:, None] * BKD + j[None, :], mask=okb[:, None],
                     other=0.0)
        gq += gn * tl.load(dwt + (h * KK + tap) * BKD + j).to(tl.float32)[None, :]
    return gq


_FWD_RUNTIME_INTS = ('h', 'heads', 'H', 'W', 'nh', 'nw', 'n_win', 'win0', 'cin', 'vd', 'vdp',
                     'K', 'ws')
_BWD_RUNTIME_INTS = ('h', 'heads', 'has_next', 'H', 'W', 'nh', 'nw', 'n_win', 'win0', 'vd',
                     'vdp', 'K', 'ws')


@triton.jit(do_not_specialize=_FWD_RUNTIME_INTS)
def _cga_fwd_kernel(qkv_ptr, x_ptr, a_ptr, nxt_ptr, sq_ptr, dwt_ptr, dwb_ptr, abd_ptr, h, heads,
                    H, W, nh, nw, n_win, win0, cin, vd, vdp, K, ws, scale,
                    BN: tl.constexpr, BKD: tl.constexpr, BC: tl.constexpr,
                    PREC: tl.constexpr):
    """Attention of head ``h`` in window ``win0 + program``.

    Reads ``[q k v]`` (``qkv_ptr``: dp x windows*BN, channel-major); writes ``relu(o)`` into
    the NCHW map ``a_ptr`` (channels ``h*vd ..``) and, unless ``h`` is the last head, the next
    head's input ``x chunk + o`` (``nxt_ptr``: cinp x windows*BN)."""
    pid = tl.program_id(0)
    t = win0 + pid
    HW = H * W
    cs = tl.multiple_of(n_win * BN, 16)
    n = tl.arange(0, BN)
    b, tok, valid = _window(t, nh, nw, H, W, ws, BN)
    in_win = n < ws * ws
    b64 = b.to(tl.int64)
    win = tl.multiple_of(t.to(tl.int64) * BN, 16)
    qkv = qkv_ptr + win
    qs = _dwconv_q(qkv, cs, sq_ptr + pid.to(tl.int64) * (BN * BKD), dwt_ptr, dwb_ptr, h, K, ws,
                   scale, BN, BKD)
    p = _probs(qs, qkv, cs, abd_ptr, h, BN, BKD, PREC).to(qkv_ptr.dtype.element_ty)
    x_img = x_ptr + b64 * (heads * cin) * HW
    a_img = a_ptr + b64 * (heads * vd) * HW
    has_next = h + 1 < heads
    for e0 in range(0, vdp, BC):
        e = e0 + tl.arange(0, BC)
        v = tl.load(qkv + (2 * BKD + e)[None, :] * cs + n[:, None])
        o = tl.dot(p, v, input_precision=PREC)
        vm = valid[:, None] & (e < vd)[None, :]
        tl.store(a_img + (h * vd + e)[None, :] * HW + tok[:, None],
                 tl.maximum(o, 0.0).to(a_ptr.dtype.element_ty), mask=vm)
        xn = tl.load(x_img + ((h + 1) * cin + e)[None, :] * HW + tok[:, None],
                     mask=vm & has_next, other=0.0)
        nxt = tl.where(in_win[:, None], xn.to(tl.float32) + o, 0.0)
        tl.store(nxt_ptr + win + e[None, :] * cs + n[:, None], nxt.to(nxt_ptr.dtype.element_ty),
                 mask=has_next)


@triton.jit(do_not_specialize=_BWD_RUNTIME_INTS)
def _cga_bwd_kernel(qkv_ptr, ga_ptr, gin_ptr, gqkv_ptr, sq_ptr, sg_ptr, ss_ptr, sgo_ptr,
                    dwt_ptr, dwb_ptr, abd_ptr, pdw_ptr, pdwb_ptr, pab_ptr, h, heads, has_next,
                    H, W, nh, nw, n_win, win0, vd, vdp, K, ws, scale,
                    BN: tl.constexpr, BKD: tl.constexpr, BC: tl.constexpr,
                    PREC: tl.constexpr):
    """Backward of head ``h``'s attention in window ``win0 + program``.

    Reads ``[q k v]`` (``qkv_ptr``), ``gA`` (NCHW) and, if ``has_next``, the gradient of the
    next head's input (``gin_ptr``: cinp x windows*BN), which reaches this head's output through
    the cascade; writes ``[gq gk gv]`` (``gqkv_ptr``, like ``qkv_ptr``) and this window's partial
    sums (windows x heads x ...): ``pdw`` (taps x BKD), ``pdwb`` (BKD), ``pab`` (BN)."""
    DT = qkv_ptr.dtype.element_ty
    pid = tl.program_id(0)
    p64 = pid.to(tl.int64)
    t = win0 + pid
    HW = H * W
    cs = tl.multiple_of(n_win * BN, 16)
    n = tl.arange(0, BN)
    j = tl.arange(0, BKD)
    b, tok, valid = _window(t, nh, nw, H, W, ws, BN)
    in_win = n < ws * ws
    win = tl.multiple_of(t.to(tl.int64) * BN, 16)
    qkv = qkv_ptr + win
    gqkv = gqkv_ptr + win
    sq = sq_ptr + p64 * (2 * BN * BKD)
    sqs = sq + BN * BKD
    ss = ss_ptr + p64 * (BN * BN)
    sgo = sgo_ptr + p64 * (BN * vdp)
    part = t.to(tl.int64) * heads + h  # this window's slot of the partial sums
    qs = _dwconv_q(qkv, cs, sq, dwt_ptr, dwb_ptr, h, K, ws, scale, BN, BKD)
    p = _probs(qs, qkv, cs, abd_ptr, h, BN, BKD, PREC)
    tl.store(sqs + n[:, None] * BKD + j[None, :], qs)
    tl.store(ss + n[:, None] * BN + n[None, :], p)  # P waits here for the softmax backward
    pd = p.to(DT)
    # back through relu(P V) and the cascade: gO to the scratch, gV^T = gO^T P to gqkv
    ga_img = ga_ptr + b.to(tl.int64) * (heads * vd) * HW
    for e0 in range(0, vdp, BC):
        e = e0 + tl.arange(0, BC)
        o = tl.dot(pd, tl.load(qkv + (2 * BKD + e)[None, :] * cs + n[:, None]),
                   input_precision=PREC)
        ga = tl.load(ga_img + (h * vd + e)[None, :] * HW + tok[:, None],
                     mask=valid[:, None] & (e < vd)[None, :], other=0.0).to(tl.float32)
        gn = tl.load(gin_ptr + win + e[None, :] * cs + n[:, None],
                     mask=in_win[:, None] & (has_next != 0), other=0.0).to(tl.float32)
        go = (tl.where(o > 0, ga, 0.0) + gn).to(DT)
        tl.store(sgo + e[None, :] * BN + n[:, None], go)
        gvt = tl.dot(tl.trans(go), pd, input_precision=PREC)
        tl.store(gqkv + (2 * BKD + e)[:, None] * cs + n[None, :], gvt.to(DT))
    tl.debug_barrier()
    # gP = gO V^T, then the softmax backward gS = P (gP - rowsum(P gP)), 0 on padding
    gp = tl.zeros([BN, BN], dtype=tl.float32)
    for e0 in range(0, vdp, BC):
        e = e0 + tl.arange(0, BC)
        gp = tl.dot(tl.load(sgo + e[None, :] * BN + n[:, None]),
                    tl.load(qkv + (2 * BKD + e)[:, None] * cs + n[None, :]), gp,
                    input_precision=PREC)
    p = tl.load(ss + n[:, None] * BN + n[None, :])
    gs = p * (gp - tl.sum(p * gp, axis=1)[:, None])
    tl.debug_barrier()  # every thread has read P before gS overwrites it
    tl.store(ss + n[:, None] * BN + n[None, :], gs)
    tl.debug_barrier()
    tl.store(pab_ptr + part * BN + n, _bias_table_grad(ss, ws, BN, 16))
    # scores backward: gq_s = gS k (times scale for the conv output), gk^T = qs^T gS
    gsd = tl.load(ss + n[:, None] * BN + n[None, :]).to(DT)
    gqd = tl.dot(gsd, tl.load(qkv + (BKD + j)[None, :] * cs + n[:, None]),
                 input_precision=PREC) * scale
    gkt = tl.dot(tl.load(sqs + n[None, :] * BKD + j[:, None]).to(DT), gsd, input_precision=PREC)
    tl.store(gqkv + (BKD + j)[:, None] * cs + n[None, :], gkt.to(DT))
    tl.store(pdwb_ptr + part * BKD + j, tl.sum(gqd, axis=0))
    gq = _dwconv_q_backward(gqd, sq, sg_ptr + p64 * (BN * BKD), dwt_ptr,
                            pdw_ptr + part * (K * K * BKD), h, K, ws, BN, BKD)
    tl.store(gqkv + j[None, :] * cs + n[:, None], gq.to(DT))


# ---------------------------------------------------------------------------------------------
# launch configuration: the one table both the launcher and the compile check use
# ---------------------------------------------------------------------------------------------
_TYPE_NAMES = {torch.float32: 'fp32', torch.float16: 'fp16', torch.bfloat16: 'bf16'}

# Argument types of each kernel: '*x' = pointer to the compute dtype (the input's), '*fp32' =
# fp32 pointer (scratch, partial sums, bias), 'i32' / 'fp32' = scalars. Checked against the
# kernel's parameter list when the specs are built and against the arguments at every launch.
_FWD_ARGS = dict(qkv_ptr='*x', x_ptr='*x', a_ptr='*x', nxt_ptr='*x', sq_ptr='*fp32',
                 dwt_ptr='*x', dwb_ptr='*x', abd_ptr='*fp32',
                 **{name: 'i32' for name in _FWD_RUNTIME_INTS}, scale='fp32')
_BWD_ARGS = dict(qkv_ptr='*x', ga_ptr='*x', gin_ptr='*x', gqkv_ptr='*x', sq_ptr='*fp32',
                 sg_ptr='*fp32', ss_ptr='*fp32', sgo_ptr='*x', dwt_ptr='*x', dwb_ptr='*x',
                 abd_ptr='*fp32', pdw_ptr='*fp32', pdwb_ptr='*fp32', pab_ptr='*fp32',
                 **{name: 'i32' for name in _BWD_RUNTIME_INTS}, scale='fp32')


def _next_pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (max(int(n), 1) - 1).bit_length())


def _round_up(n: int, m: int) -> int:
    return -(-int(n) // m) * m


def _param_names(fn) -> List[str]:
    inner = getattr(fn, 'fn', fn)  # JITFunction / InterpretedFunction wrap the Python function
    return list(inspect.signature(inner).parameters)


@dataclass(frozen=True)
class KernelSpec:
    """One kernel as launched and compiled: function, argument types, constexprs, options."""

    name: str
    fn: object
    signature: Dict[str, str]  # every non-constexpr argument -> Triton type string
    constexprs: Dict[str, object]
    num_warps: int
    num_stages: int

    def key(self) -> tuple:
        """Identity of the compiled binary (specs with equal keys share it)."""
        return (self.name, tuple(self.signature.values()),
                tuple(sorted(self.constexprs.items())), self.num_warps, self.num_stages)

    def full_signature(self) -> Dict[str, str]:
        """All parameters in order, constexprs as ``'constexpr'`` (``ASTSource`` form)."""
        return {p: self.signature.get(p, 'constexpr') for p in _param_names(self.fn)}

    def divisibility_attrs(self) -> Dict[Tuple[int, ...], list]:
        """What the launcher specialises on: 16-byte aligned pointers (torch allocations are);
        no integer is specialised (``do_not_specialize``)."""
        names = _param_names(self.fn)
        return {(names.index(p),): [['tt.divisibility', 16]]
                for p, ty in self.signature.items() if ty.startswith('*')}

    def check_args(self, args: Dict[str, object]) -> None:
        """Raise if ``args`` do not match the compiled signature (names, pointer dtypes, ints)."""
        if set(args) != set(self.signature):
            raise TypeError(f'{self.name}: missing arguments {set(self.signature) - set(args)}, '
                            f'unknown {set(args) - set(self.signature)}')
        for name, ty in self.signature.items():
            arg = args[name]
            if ty.startswith('*'):
                got = '*' + _TYPE_NAMES.get(getattr(arg, 'dtype', None), '?')
                if got != ty:
                    raise TypeError(f'{self.name}: {name} is {got}, the kernel takes {ty}')
            elif ty == 'i32' and not (isinstance(arg, int) and -2 ** 31 <= arg < 2 ** 31):
                raise InputTooLargeError(f'{self.name}: {name}={arg!r} does not fit the kernel\'s '
                                         f'int32 (input too large: split the batch)')

    def launch(self, grid: Tuple[int, ...], **args) -> None:
        self.check_args(args)
        self.fn[grid](**args, **self.constexprs, num_warps=self.num_warps,
                      num_stages=self.num_stages)


def fp32_dot_precision(matmul: Optional[str] = None, generic: Optional[str] = None) -> str:
    """``'tf32'`` if fp32 matmuls may use TF32, else ``'ieee'``: PyTorch's
    ``torch.backends.cuda.matmul.fp32_precision``, or the generic ``torch.backends.fp32_precision``
    when that is ``'none'`` (both read from torch unless given).

    The legacy ``allow_tf32`` flag is read only on torch without ``fp32_precision``: in torch
    >= 2.9 reading it raises once a user has set the new API (setting it updates
    ``fp32_precision``, so nothing is lost)."""
    if matmul is None:
        matmul = getattr(torch.backends.cuda.matmul, 'fp32_precision', None)
        if matmul is None:  # torch < 2.9
            return 'tf32' if torch.backends.cuda.matmul.allow_tf32 else 'ieee'
    if matmul == 'none':
        matmul = generic if generic is not None else getattr(torch.backends, 'fp32_precision',
                                                             'none')
    return 'tf32' if matmul == 'tf32' else 'ieee'


# Launch table: ``dtype[/fp32 precision] -> (BC, forward num_warps, backward num_warps)``.
# Measured offline with tools/triton_compile_check.py (docs/triton.md): the smallest register
# counts without spills on sm_80 and sm_90. fp32 'ieee' dots lower to FMA loops that hold a
# whole K=64 operand row per thread, hence more warps there.
LAUNCH_TABLE: Dict[str, Tuple[int, int, int]] = {
    'fp16': (16, 8, 8),
    'bf16': (16, 8, 8),
    'fp32/tf32': (16, 8, 8),
    'fp32/ieee': (32, 8, 16),
}


def kernel_specs(C: int, heads: int, K: int, dtype: torch.dtype, key_dim: int = 16,
                 window_size: int = 7, val_dim: Optional[int] = None,
                 fp32_precision: str = 'ieee') -> Dict[str, KernelSpec]:
    """The kernels, constexprs and launch options the op uses for one problem.

    ``{'forward': spec, 'backward': spec}`` (the backward pass also runs the forward kernel).
    Every size is a runtime argument, so one binary per dtype serves every image size and
    every stage: ``BN`` = window tokens and ``BKD`` = key_dim rounded up to powers of two
    (>= 16, the smallest ``tl.dot`` dimension), ``BC`` (channel chunk) and the warps from
    :data:`LAUNCH_TABLE`. ``C``, ``heads`` and ``K`` are only validated."""
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f'the Triton CGA kernels take {SUPPORTED_DTYPES}, got {dtype}')
    if fp32_precision not in ('ieee', 'tf32'):
        raise ValueError(f"fp32_precision must be 'ieee' or 'tf32', got {fp32_precision!r}")
    if heads < 1 or C % heads or K < 1 or K % 2 == 0:
        raise ValueError(f'bad problem C={C} heads={heads} K={K} (C % heads == 0, K odd)')
    name = _TYPE_NAMES[dtype]
    prec = fp32_precision if dtype == torch.float32 else 'ieee'  # unused by fp16/bf16 dots
    bc, fwd_warps, bwd_warps = LAUNCH_TABLE[f'{name}/{prec}' if name == 'fp32' else name]
    constexprs = dict(BN=_next_pow2(window_size * window_size), BKD=_next_pow2(key_dim), BC=bc,
                      PREC=prec)
    specs = {}
    for kname, fn, args, warps in (('forward', _cga_fwd_kernel, _FWD_ARGS, fwd_warps),
                                   ('backward', _cga_bwd_kernel, _BWD_ARGS, bwd_warps)):
        sig = {k: ('*' + name if v == '*x' else v) for k, v in args.items()}
        if _param_names(fn) != list(sig) + list(constexprs):
            raise AssertionError(f'{kname} kernel parameters drifted from the launch table')
        specs[kname] = KernelSpec(kname, fn, sig, dict(constexprs), num_warps=warps,
                                  num_stages=1)
    return specs


def compile_spec(spec: KernelSpec, arch: int) -> dict:
    """Compile ``spec`` for ``sm_<arch>`` offline (no GPU needed): what the launcher would
    build on first use, the same Triton passes and ``ptxas`` flags.

    Returns ``seconds`` (wall time), ``registers``, ``spill_stores`` / ``spill_loads`` (bytes,
    from ptxas' own ``-v`` report), ``shared`` (bytes), and the PTX's ``nc_loads`` (non-coherent
    ``ld.global.nc``: the scratch reads must not be) and ``atomics`` (``atom.`` / ``red.``)
    counts. Needs the kernels decorated for real compilation (``TRITON_INTERPRET`` unset when
    this module was imported)."""
    if not isinstance(spec.fn, JITFunction):
        raise RuntimeError('the kernels are decorated for the interpreter (TRITON_INTERPRET=1 '
                           'when cga_triton was imported): compile in a process without it')
    src = ASTSource(spec.fn, spec.full_signature(), spec.constexprs, spec.divisibility_attrs())
    log = io.StringIO()
    knobs = triton.knobs.nvidia
    saved = knobs.dump_ptxas_log
    knobs.dump_ptxas_log = True  # Triton prints ptxas' -v report: the exact binary's numbers
    try:
        start = time.perf_counter()
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=GPUTarget('cuda', int(arch), 32),
                                    options=dict(num_warps=spec.num_warps,
                                                 num_stages=spec.num_stages))
        seconds = time.perf_counter() - start
    finally:
        knobs.dump_ptxas_log = saved
    text = log.getvalue()
    regs = re.search(r'Used (\d+) registers', text)
    spill = re.search(r'(\d+) bytes spill stores, (\d+) bytes spill loads', text)
    if regs is None or spill is None:
        raise RuntimeError(f'no ptxas report for {spec.name} on sm_{arch}:\n{text}')
    ptx = kernel.asm['ptx']
    return dict(seconds=seconds, registers=int(regs.group(1)), spill_stores=int(spill.group(1)),
                spill_loads=int(spill.group(2)), shared=int(kernel.metadata.shared),
                nc_loads=ptx.count('ld.global.nc'),
                atomics=len(re.findall(r'\b(?:atom|red)\.', ptx)))


def stage_problems(arch_settings: Dict[str, dict]) -> List[Tuple[int, int, int]]:
    """Distinct ``(C, heads, K)`` of the attention stages of model presets given as
    ``{name: {'embed_dims', 'num_heads', 'kernels'}}`` (K = the largest kernel a stage uses)."""
    out = set()
    for cfg in arch_settings.values():
        for C, heads in zip(cfg['embed_dims'], cfg['num_heads']):
            out.add((int(C), int(heads), int(max(cfg['kernels'][:heads]))))
    return sorted(out)


def unique_specs(problems: Sequence[Tuple[int, int, int]], dtypes: Sequence[torch.dtype],
                 precisions: Sequence[str] = ('ieee', 'tf32'), key_dim: int = 16,
                 window_size: int = 7) -> List[Tuple[KernelSpec, List[Tuple[int, int, int]]]]:
    """Every distinct compiled kernel the op uses for ``problems`` x ``dtypes`` (fp32 once per
    precision), with the problems that use it."""
    seen: Dict[tuple, Tuple[KernelSpec, list]] = {}
    for dtype in dtypes:
        for prec in (precisions if dtype == torch.float32 else ('ieee',)):
            for prob in problems:
                C, heads, K = prob
                for spec in kernel_specs(C, heads, K, dtype, key_dim, window_size,
                                         fp32_precision=prec).values():
                    seen.setdefault(spec.key(), (spec, []))[1].append(prob)
    return list(seen.values())


# ---------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------
def _max_programs(device: torch.device) -> int:
    """Programs per launch (one window each; more windows run in further launches): 4 per SM
    keeps the per-program scratch bounded while filling the GPU. The interpreter gets 3 so
    tests cover several launches."""
    if device.type == 'cuda':
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 3


_PAIR_INDEX: Dict[tuple, Tensor] = {}


def _dense_bias(attn_bias: Tensor, ws: int, BN: int) -> Tensor:
    """``(heads, BN, BN)`` fp32: ``attn_bias[h, |dy| * ws + |dx|]`` for window pairs, 0 for
    padding queries, -inf for padding keys (they drop out of the softmax)."""
    key = (ws, BN, str(attn_bias.device))
    idx = _PAIR_INDEX.get(key)
    if idx is None:  # (BN, BN) index into the table extended by [0, -inf]
        N = ws * ws
        idx = torch.full((BN, BN), N + 1, dtype=torch.long)  # padding keys: -inf
        idx[N:, :N] = N  # padding queries: 0 (their rows stay finite)
        idx[:N, :N] = relative_position_index(ws)
        idx = _PAIR_INDEX[key] = idx.to(attn_bias.device)
    table = torch.cat([attn_bias.float(), attn_bias.new_tensor([0., float('-inf')],
                                                               dtype=torch.float32)
                       .expand(attn_bias.shape[0], 2)], dim=1)
    return table[:, idx]


@dataclass
class _Problem:
    """Shapes, packed weights and specs of one call. Packed weights are zero-padded to whole
    chunks: ``wt`` = qkv weight transposed, ``(heads, cinp, dp)`` with q in columns
    ``[0, BKD)``, k in ``[BKD, 2 BKD)``, v from ``2 BKD`` (``dp = 2 BKD + vdp``)."""

    x: Tensor
    wt: Tensor
    bias: Tensor   # (heads, dp)
    dwt: Tensor    # (heads, K*K, BKD)
    dwb: Tensor    # (heads, BKD)
    abd: Tensor    # (heads, BN, BN) fp32
    pw: Tensor     # projection (C, heads*vd), compute dtype
    pb: Tensor     # (C,)
    heads: int
    cin: int
    vd: int
    cinp: int
    vdp: int
    kd: int
    K: int
    ws: int
    nh: int
    nw: int
    scale: float
    spec: Dict[str, KernelSpec]

    @property
    def n_win(self) -> int:
        return self.x.shape[0] * self.nh * self.nw

    @property
    def BN(self) -> int:
        return self.spec['forward'].constexprs['BN']

    @property
    def BKD(self) -> int:
        return self.spec['forward'].constexprs['BKD']

    @property
    def dp(self) -> int:
        return 2 * self.BKD + self.vdp

    def sizes(self) -> dict:
        _, _, H, W = self.x.shape
        return dict(H=H, W=W, nh=self.nh, nw=self.nw, n_win=self.n_win)

    def tiles(self, g: Tensor) -> Tensor:
        """A channel-major ``(c, windows * BN)`` buffer as ``(c, B, nh, nw, ws, ws)``."""
        B, N = self.x.shape[0], self.ws * self.ws
        win = g.view(g.shape[0], B, self.nh, self.nw, self.BN)[..., :N]
        return win.unflatten(-1, (self.ws, self.ws))

    def windows_of(self, x: Tensor) -> Tensor:
        """An NCHW map ``(B, c, H, W)`` zero-padded and viewed as ``(c, B, nh, nw, ws, ws)``."""
        return window_grid(x, self.ws)[0].permute(1, 0, 2, 4, 3, 5)

    def launch(self, name: str, **args) -> None:
        """One launch per ``max_programs`` windows (program = window ``win0 + id``)."""
        step = _max_programs(self.x.device)
        for win0 in range(0, self.n_win, step):
            self.spec[name].launch((min(step, self.n_win - win0),), **args, win0=win0)


def _prepare(x, qkv_weight, qkv_bias, dw_weight, dw_bias, attn_bias, proj_weight, proj_bias,
             key_dim, window_size, scale) -> _Problem:
    heads, cin, vd, K = check_cga_args(x, qkv_weight, qkv_bias, dw_weight, dw_bias, attn_bias,
                                       proj_weight, proj_bias, key_dim, window_size)
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f'the Triton CGA kernels take {SUPPORTED_DTYPES}, got {x.dtype}')
    dt, kd, ws = x.dtype, int(key_dim), int(window_size)
    _, C, H, W = x.shape
    prec = fp32_dot_precision() if x.is_cuda else 'ieee'
    spec = kernel_specs(C, heads, K, dt, kd, ws, vd, prec)
    BC, BN, BKD = (spec['forward'].constexprs[k] for k in ('BC', 'BN', 'BKD'))
    cinp, vdp = _round_up(cin, BC), _round_up(vd, BC)
    if (kd, cinp, vdp) == (BKD, cin, vd):  # no padding (every m0-m5 stage in fp16 / bf16)
        wt = qkv_weight.to(dt).transpose(1, 2).contiguous()
        bias = qkv_bias.to(dt).contiguous()
        dwt = dw_weight.to(dt).permute(0, 2, 3, 1).reshape(heads, K * K, kd).contiguous()
        dwb = dw_bias.to(dt).contiguous()
    else:
        wt = x.new_zeros(heads, cinp, 2 * BKD + vdp)
        bias = x.new_zeros(heads, 2 * BKD + vdp)
        for col, row, width in ((0, 0, kd), (BKD, kd, kd), (2 * BKD, 2 * kd, vd)):
            wt[:, :cin, col:col + width] = qkv_weight[:, row:row + width].transpose(1, 2)
            bias[:, col:col + width] = qkv_bias[:, row:row + width]
        dwt = x.new_zeros(heads, K * K, BKD)
        dwt[:, :, :kd] = dw_weight.permute(0, 2, 3, 1).reshape(heads, K * K, kd)
        dwb = x.new_zeros(heads, BKD)
        dwb[:, :kd] = dw_bias
    n_win = x.shape[0] * math.ceil(H / ws) * math.ceil(W / ws)
    if max(C * H * W, (2 * BKD + vdp) * n_win * BN) >= 2 ** 31:  # int32 offsets in the kernels
        raise InputTooLargeError(f'input {tuple(x.shape)} too large for the Triton kernels\' 32-bit '
                         f'offsets: split the batch')
    return _Problem(x=x.contiguous(), wt=wt, bias=bias, dwt=dwt, dwb=dwb,
                    abd=_dense_bias(attn_bias, ws, BN), pw=proj_weight.to(dt).contiguous(),
                    pb=proj_bias.to(dt).contiguous(), heads=heads, cin=cin, vd=vd, cinp=cinp,
                    vdp=vdp, kd=kd, K=K, ws=ws, nh=math.ceil(H / ws), nw=math.ceil(W / ws),
                    scale=float(scale), spec=spec)


def _attention(pr: _Problem, keep: bool) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """``A = relu(concat heads)`` (B, heads*vd, H, W), the heads' inputs and, if ``keep``,
    their ``[q k v]``. Inputs: ``(heads, cinp, windows * BN)`` if ``keep`` (the backward needs
    them), else two alternating slots; ``[q k v]``: ``(heads, dp, windows * BN)``."""
    x = pr.x
    B, _, H, W = x.shape
    dev, dt, R = x.device, x.dtype, pr.n_win * pr.BN
    a = torch.empty(B, pr.heads * pr.vd, H, W, device=dev, dtype=dt)
    inp = torch.empty(pr.heads if keep else min(pr.heads, 2), pr.cinp, R, device=dev, dtype=dt)
    qkv = torch.empty(pr.heads if keep else 1, pr.dp, R, device=dev, dtype=dt)
    inp[0].zero_()  # padding tokens and channels; the kernel writes the other slots whole
    pr.tiles(inp[0])[:pr.cin].copy_(pr.windows_of(x[:, :pr.cin]))
    sq = torch.empty(_max_programs(dev), pr.BN * pr.BKD, device=dev, dtype=torch.float32)
    for h in range(pr.heads):
        cur, nxt = inp[h % len(inp)], inp[(h + 1) % len(inp)]
        q = qkv[h if keep else 0]
        torch.addmm(pr.bias[h][:, None], pr.wt[h].t(), cur, out=q)  # 1x1 qkv conv (cuBLAS)
        pr.launch('forward', qkv_ptr=q, x_ptr=x, a_ptr=a, nxt_ptr=nxt, sq_ptr=sq,
                  dwt_ptr=pr.dwt, dwb_ptr=pr.dwb, abd_ptr=pr.abd, h=h, heads=pr.heads,
                  **pr.sizes(), cin=pr.cin, vd=pr.vd, vdp=pr.vdp, K=pr.K, ws=pr.ws,
                  scale=pr.scale)
    return a, inp, (qkv if keep else None)


def _on_device(x: Tensor):
    """Triton launches on the current CUDA device: make it ``x``'s."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def forward(x: Tensor, qkv_weight: Tensor, qkv_bias: Tensor, dw_weight: Tensor, dw_bias: Tensor,
            attn_bias: Tensor, proj_weight: Tensor, proj_bias: Tensor, key_dim: int,
            window_size: int, scale: float) -> Tensor:
    """Fused CGA forward: ``(B, C, H, W)`` in ``x``'s dtype."""
    with _on_device(x):
        return _forward(x, qkv_weight, qkv_bias, dw_weight, dw_bias, attn_bias, proj_weight,
                        proj_bias, key_dim, window_size, scale)


def _forward(x, qkv_weight, qkv_bias, dw_weight, dw_bias, attn_bias, proj_weight, proj_bias,
             key_dim, window_size, scale) -> Tensor:
    pr = _prepare(x, qkv_weight, qkv_bias, dw_weight, dw_bias, attn_bias, proj_weight,
                  proj_bias, key_dim, window_size, scale)
    a, _, _ = _attention(pr, keep=False)
    B, C, H, W = x.shape
    # explicit sizes: a view with -1 is ambiguous for a batch of 0
    y = torch.baddbmm(pr.pb.view(1, C, 1), pr.pw.expand(B, -1, -1),
                      a.view(B, pr.heads * pr.vd, H * W))
    return y.view(B, C, H, W)


def _unpack_qkv(g: Tensor, kd: int, vd: int, BKD: int) -> Tensor:
    """Rows ``[q | k | v]`` of a packed ``(heads, dp, ...)`` gradient -> ``(heads, D, ...)``."""
    return torch.cat([g[:, :kd], g[:, BKD:BKD + kd], g[:, 2 * BKD:2 * BKD + vd]], dim=1)


def backward(grad_y: Tensor, x: Tensor, qkv_weight: Tensor, qkv_bias: Tensor, dw_weight: Tensor,
             dw_bias: Tensor, attn_bias: Tensor, proj_weight: Tensor, proj_bias: Tensor,
             key_dim: int, window_size: int, scale: float) -> Tuple[Tensor, ...]:
    """Gradients of every input, each in its input's dtype (deterministic: no atomics).

    Recomputes the forward keeping each head's input and ``[q k v]``; then per head, last
    first: the attention backward kernel -> ``[gq gk gv]``, and ``g inp = Wqkv^T [gq gk gv]``
    (cuBLAS): the x chunk's gradient and, through the cascade, the previous head's output's."""
    inputs = (x, qkv_weight, qkv_bias, dw_weight, dw_bias, attn_bias, proj_weight, proj_bias)
    with _on_device(x):
        grads = _backward(grad_y, inputs, key_dim, window_size, scale)
    return tuple(g.to(t.dtype).contiguous() for g, t in zip(grads, inputs))


def _backward(grad_y: Tensor, inputs: Tuple[Tensor, ...], key_dim: int, window_size: int,
              scale: float) -> Tuple[Tensor, ...]:
    x = inputs[0]
    pr = _prepare(*inputs, key_dim, window_size, scale)
    a, inp, qkv = _attention(pr, keep=True)
    B, C, H, W = x.shape
    dt, dev, f32 = x.dtype, x.device, torch.float32
    BN, BKD, heads, K = pr.BN, pr.BKD, pr.heads, pr.K
    gy = grad_y.to(dt).contiguous().view(B, C, H * W)
    # projection (cuBLAS): gA = Wp^T gy, gWp = sum_b gy A^T, gbp = sum gy
    ga = torch.matmul(pr.pw.t(), gy)
    g_pw = torch.matmul(gy, a.view(B, heads * pr.vd, H * W).transpose(1, 2)).sum(0, dtype=f32)
    g_pb = gy.sum((0, 2), dtype=f32)
    nprog = _max_programs(dev)
    gqkv = torch.empty_like(qkv)
    pdw = torch.empty(pr.n_win, heads, K * K, BKD, device=dev, dtype=f32)
    pdwb = torch.empty(pr.n_win, heads, BKD, device=dev, dtype=f32)
    pab = torch.empty(pr.n_win, heads, BN, device=dev, dtype=f32)
    scratch = {name: torch.empty(nprog, size, device=dev, dtype=f32)
               for name, size in (('sq_ptr', 2 * BN * BKD), ('sg_ptr', BN * BKD),
                                  ('ss_ptr', BN * BN))}
    scratch['sgo_ptr'] = torch.empty(nprog, BN * pr.vdp, device=dev, dtype=dt)
    # x's gradient as windows (B, nh, nw, C, ws, ws), reversed and cropped by ops/windows.py
    gxw = torch.empty(B, pr.nh, pr.nw, C, pr.ws, pr.ws, device=dev, dtype=dt)
    g_inp = inp[0]  # read only when has_next
    for h in reversed(range(heads)):
        pr.launch('backward', qkv_ptr=qkv[h], ga_ptr=ga, gin_ptr=g_inp, gqkv_ptr=gqkv[h],
                  **scratch, dwt_ptr=pr.dwt, dwb_ptr=pr.dwb, abd_ptr=pr.abd, pdw_ptr=pdw,
                  pdwb_ptr=pdwb, pab_ptr=pab, h=h, heads=heads, has_next=int(h + 1 < heads),
                  **pr.sizes(), vd=pr.vd, vdp=pr.vdp, K=K, ws=pr.ws, scale=pr.scale)
        g_inp = torch.matmul(pr.wt[h], gqkv[h])  # 1x1 qkv conv backward (cuBLAS)
        gxw[:, :, :, h * pr.cin:(h + 1) * pr.cin].copy_(
            pr.tiles(g_inp[:pr.cin]).permute(1, 2, 3, 0, 4, 5))
    gx = window_reverse(gxw.view(pr.n_win, C, pr.ws, pr.ws), (pr.nh, pr.nw), (H, W))
    kd, vd, N = pr.kd, pr.vd, pr.ws * pr.ws
    g_w = _unpack_qkv(torch.bmm(gqkv, inp.transpose(1, 2)), kd, vd, BKD)[:, :, :pr.cin]
    g_b = _unpack_qkv(gqkv.sum(2, dtype=f32), kd, vd, BKD)
    g_dw = pdw.sum(0)[:, :, :kd].reshape(heads, K, K, kd).permute(0, 3, 1, 2)
    return (gx, g_w, g_b, g_dw, pdwb.sum(0)[:, :kd], pab.sum(0)[:, :N], g_pw,
            g_pb)
