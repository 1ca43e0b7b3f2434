"""Triton kernels of the fused windowed cascaded group attention (GPU; CPU only for tests).

One program handles one window at a time (a persistent loop over ``(image, window)`` tasks):
the window's tokens are a ``BLOCK_N = next_pow2(ws*ws)`` tile read straight from the NCHW map
(implicit zero padding: masked loads), every head runs in the program (1x1 qkv conv as
``tl.dot``, depthwise conv on q through a small per-program scratch, scores + bias table,
softmax, ``P @ V``, cascade), then ReLU and the projection, tiled over output channels, and the
tokens the crop keeps are stored. Matmuls take the input dtype (fp16/bf16 tensor cores; fp32 as
tf32 only when ``torch.backends.cuda.matmul.allow_tf32`` is set) and accumulate in fp32; softmax
is fp32.

The backward kernel recomputes each window's forward, keeping the per-head state in a
per-program scratch (bounded by the number of programs, not by the batch), and back-propagates
it; weight gradients are accumulated with fp32 atomics (so their summation order is not
deterministic). Nothing is saved between forward and backward except the op's inputs.

Importing this module decorates the kernels: for CPU tests set ``TRITON_INTERPRET=1`` *before*
importing it (Triton reads the variable when the kernels are decorated).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .cga_reference import bias_index

__all__ = ['forward', 'backward']


@triton.jit
def _window_coords(task, nh, nw, H, W, WS: tl.constexpr, BN: tl.constexpr):
    """Token coordinates of window ``task`` (image-major)."""
    nwin = nh * nw
    b = task // nwin
    w = task % nwin
    wy = w // nw
    wx = w % nw
    offs_n = tl.arange(0, BN)
    r = offs_n // WS
    s = offs_n % WS
    in_win = offs_n < WS * WS
    yy = wy * WS + r
    xx = wx * WS + s
    valid = in_win & (yy < H) & (xx < W)
    tok = yy * W + xx
    return b, r, s, in_win, valid, tok


@triton.jit
def _head_forward(x_base, HW, wqkv_ptr, bqkv_ptr, dw_ptr, dwb_ptr, ab_ptr, sq_ptr,
                  o_prev, r, s, in_win, valid, tok, scale,
                  h: tl.constexpr, CIN: tl.constexpr, KD: tl.constexpr, VD: tl.constexpr,
                  K: tl.constexpr, WS: tl.constexpr, BN: tl.constexpr, BCIN: tl.constexpr,
                  BKD: tl.constexpr, BVD: tl.constexpr, DOT_DT: tl.constexpr,
                  PREC: tl.constexpr, ACC_DT: tl.constexpr):
    """One head of the forward. Returns (inp, q, qs, k, v, o) tiles; q is left in sq_ptr."""
    D: tl.constexpr = 2 * KD + VD
    R: tl.constexpr = K // 2
    KK: tl.constexpr = K * K
    offs_n = tl.arange(0, BN)
    offs_c = tl.arange(0, BCIN)
    offs_j = tl.arange(0, BKD)
    offs_e = tl.arange(0, BVD)
    cmask = offs_c < CIN
    jmask = offs_j < KD
    emask = offs_e < VD
    # head input: x chunk (masked = implicit zero padding) + previous head's output
    xin = tl.load(x_base + (h * CIN + offs_c)[None, :].to(tl.int64) * HW + tok[:, None],
                  mask=valid[:, None] & cmask[None, :], other=0.0).to(ACC_DT)
    if h > 0:
        inp = xin + o_prev
    else:
        inp = xin
    inp_d = inp.to(DOT_DT)
    wbase = wqkv_ptr + h * D * CIN
    wq = tl.load(wbase + offs_j[None, :] * CIN + offs_c[:, None],
                 mask=jmask[None, :] & cmask[:, None], other=0.0).to(DOT_DT)
    wk = tl.load(wbase + (KD + offs_j)[None, :] * CIN + offs_c[:, None],
                 mask=jmask[None, :] & cmask[:, None], other=0.0).to(DOT_DT)
    wv = tl.load(wbase + (2 * KD + offs_e)[None, :] * CIN + offs_c[:, None],
                 mask=emask[None, :] & cmask[:, None], other=0.0).to(DOT_DT)
    bq = tl.load(bqkv_ptr + h * D + offs_j, mask=jmask, other=0.0).to(ACC_DT)
    bk = tl.load(bqkv_ptr + h * D + KD + offs_j, mask=jmask, other=0.0).to(ACC_DT)
    bv = tl.load(bqkv_ptr + h * D + 2 * KD + offs_e, mask=emask, other=0.0).to(ACC_DT)
    q = tl.dot(inp_d, wq, input_precision=PREC) + bq[None, :]
    k = tl.dot(inp_d, wk, input_precision=PREC) + bk[None, :]
    v = tl.dot(inp_d, wv, input_precision=PREC) + bv[None, :]
    # depthwise KxK conv on q inside the window (zero outside): neighbours through the scratch
    tl.store(sq_ptr + offs_n[:, None] * BKD + offs_j[None, :], q)
    tl.debug_barrier()
    acc = tl.zeros([BN, BKD], dtype=ACC_DT)
    for t in tl.static_range(KK):
        dy: tl.constexpr = t // K - R
        dx: tl.constexpr = t % K - R
        rr = r + dy
        ss = s + dx
        ok = in_win & (rr >= 0) & (rr < WS) & (ss >= 0) & (ss < WS)
        qn = tl.load(sq_ptr + (rr * WS + ss)[:, None] * BKD + offs_j[None, :],
                     mask=ok[:, None], other=0.0)
        wt = tl.load(dw_ptr + h * KD * KK + offs_j * KK + t, mask=jmask, other=0.0)
        acc += qn * wt.to(ACC_DT)[None, :]
    tl.debug_barrier()
    dwb = tl.load(dwb_ptr + h * KD + offs_j, mask=jmask, other=0.0).to(ACC_DT)
    qs = (acc + dwb[None, :]) * scale
    # scores + relative bias, softmax over the window's keys
    sc = tl.dot(qs.to(DOT_DT), tl.trans(k.to(DOT_DT)), input_precision=PREC)
    idx = tl.abs(r[:, None] - r[None, :]) * WS + tl.abs(s[:, None] - s[None, :])
    ab = tl.load(ab_ptr + h * WS * WS + idx, mask=in_win[:, None] & in_win[None, :], other=0.0)
    sc = sc + ab.to(ACC_DT)
    sc = tl.where(in_win[None, :], sc, float('-inf'))
    mx = tl.max(sc, axis=1)
    p = tl.exp(sc - mx[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    o = tl.dot(p.to(DOT_DT), v.to(DOT_DT), input_precision=PREC)
    return inp, q, qs, k, v, o, p


@triton.jit
def _cga_fwd_kernel(x_ptr, y_ptr, wqkv_ptr, bqkv_ptr, dw_ptr, dwb_ptr, ab_ptr, wp_ptr, bp_ptr,
                    sq_ptr, so_ptr, H, W, nh, nw, n_tasks, scale,
                    C: tl.constexpr, HEADS: tl.constexpr, CIN: tl.constexpr, KD: tl.constexpr,
                    VD: tl.constexpr, K: tl.constexpr, WS: tl.constexpr, BN: tl.constexpr,
                    BCIN: tl.constexpr, BKD: tl.constexpr, BVD: tl.constexpr,
                    BC: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr,
                    ACC_DT: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    HW = H * W
    offs_n = tl.arange(0, BN)
    offs_e = tl.arange(0, BVD)
    emask = offs_e < VD
    HV: tl.constexpr = HEADS * VD
    sq = sq_ptr + pid.to(tl.int64) * (BN * BKD)
    so = so_ptr + pid.to(tl.int64) * (BN * HEADS * BVD)
    for task in range(pid, n_tasks, nprog):
        b, r, s, in_win, valid, tok = _window_coords(task, nh, nw, H, W, WS, BN)
        x_base = x_ptr + b.to(tl.int64) * C * HW
        o = tl.zeros([BN, BVD], dtype=ACC_DT)
        for h in tl.static_range(HEADS):
            inp, q, qs, k, v, o, p = _head_forward(
                x_base, HW, wqkv_ptr, bqkv_ptr, dw_ptr, dwb_ptr, ab_ptr, sq, o, r, s, in_win,
                valid, tok, scale, h, CIN, KD, VD, K, WS, BN, BCIN, BKD, BVD, DOT_DT, PREC, ACC_DT)
            tl.store(so + offs_n[:, None] * (HEADS * BVD) + h * BVD + offs_e[None, :],
                     tl.maximum(o, 0.0))
        tl.debug_barrier()
        # projection (ReLU'd heads from the scratch), tiled over output channels
        y_base = y_ptr + b.to(tl.int64) * C * HW
        for c0 in tl.static_range(0, C, BC):
            offs_o = c0 + tl.arange(0, BC)
            omask = offs_o < C
            acc = tl.zeros([BN, BC], dtype=ACC_DT)
            for h in tl.static_range(HEADS):
                a = tl.load(so + offs_n[:, None] * (HEADS * BVD) + h * BVD + offs_e[None, :])
                wp = tl.load(wp_ptr + offs_o[None, :] * HV + h * VD + offs_e[:, None],
                             mask=omask[None, :] & emask[:, None], other=0.0)
                acc += tl.dot(a.to(DOT_DT), wp.to(DOT_DT), input_precision=PREC)
            bp = tl.load(bp_ptr + offs_o, mask=omask, other=0.0).to(ACC_DT)
            acc += bp[None, :]
            tl.store(y_base + offs_o[None, :].to(tl.int64) * HW + tok[:, None],
                     acc.to(y_ptr.dtype.element_ty), mask=valid[:, None] & omask[None, :])
        tl.debug_barrier()


@triton.jit
def _cga_bwd_kernel(gy_ptr, x_ptr, gx_ptr, wqkv_ptr, bqkv_ptr, dw_ptr, dwb_ptr, ab_ptr, wp_ptr,
                    s_inp, s_q, s_qs, s_k, s_v, s_o, s_g,
                    g_wqkv, g_bqkv, g_dw, g_dwb, g_abm, g_wp, g_bp,
                    H, W, nh, nw, n_tasks, scale,
                    C: tl.constexpr, HEADS: tl.constexpr, CIN: tl.constexpr, KD: tl.constexpr,
                    VD: tl.constexpr, K: tl.constexpr, WS: tl.constexpr, BN: tl.constexpr,
                    BCIN: tl.constexpr, BKD: tl.constexpr, BVD: tl.constexpr,
                    BC: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr,
                    ACC_DT: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    HW = H * W
    D: tl.constexpr = 2 * KD + VD
    KK: tl.constexpr = K * K
    R: tl.constexpr = K // 2
    HV: tl.constexpr = HEADS * VD
    offs_n = tl.arange(0, BN)
    offs_m = tl.arange(0, BN)
    offs_c = tl.arange(0, BCIN)
    offs_j = tl.arange(0, BKD)
    offs_e = tl.arange(0, BVD)
    cmask = offs_c < CIN
    jmask = offs_j < KD
    emask = offs_e < VD
    p64 = pid.to(tl.int64)
    # per-program scratch: per-head state of the current window
    sp_inp = s_inp + p64 * (HEADS * BN * BCIN)
    sp_q = s_q + p64 * (HEADS * BN * BKD)
    sp_qs = s_qs + p64 * (HEADS * BN * BKD)
    sp_k = s_k + p64 * (HEADS * BN * BKD)
    sp_v = s_v + p64 * (HEADS * BN * BVD)
    sp_o = s_o + p64 * (HEADS * BN * BVD)
    sp_g = s_g + p64 * (BN * BKD)
    tile_c = offs_n[:, None] * BCIN + offs_c[None, :]
    tile_j = offs_n[:, None] * BKD + offs_j[None, :]
    tile_e = offs_n[:, None] * BVD + offs_e[None, :]
    for task in range(pid, n_tasks, nprog):
        b, r, s, in_win, valid, tok = _window_coords(task, nh, nw, H, W, WS, BN)
        x_base = x_ptr + b.to(tl.int64) * C * HW
        gy_base = gy_ptr + b.to(tl.int64) * C * HW
        gx_base = gx_ptr + b.to(tl.int64) * C * HW
        # ---- recompute the forward, keep per-head state
        o = tl.zeros([BN, BVD], dtype=ACC_DT)
        for h in tl.static_range(HEADS):
            inp, q, qs, k, v, o, p = _head_forward(
                x_base, HW, wqkv_ptr, bqkv_ptr, dw_ptr, dwb_ptr, ab_ptr, sp_q + h * BN * BKD,
                o, r, s, in_win, valid, tok, scale, h, CIN, KD, VD, K, WS, BN, BCIN, BKD, BVD,
                DOT_DT, PREC, ACC_DT)
            tl.store(sp_inp + h * BN * BCIN + tile_c, inp)
            tl.store(sp_qs + h * BN * BKD + tile_j, qs)
            tl.store(sp_k + h * BN * BKD + tile_j, k)
            tl.store(sp_v + h * BN * BVD + tile_e, v)
            tl.store(sp_o + h * BN * BVD + tile_e, o)
        tl.debug_barrier()
        # ---- projection bias grad
        for c0 in tl.static_range(0, C, BC):
            offs_o = c0 + tl.arange(0, BC)
            omask = offs_o < C
            gyt = tl.load(gy_base + offs_o[None, :].to(tl.int64) * HW + tok[:, None],
                          mask=valid[:, None] & omask[None, :], other=0.0).to(ACC_DT)
            tl.atomic_add(g_bp + offs_o, tl.sum(gyt, axis=0), mask=omask)
        # ---- heads in reverse order
        g_next = tl.zeros([BN, BCIN], dtype=ACC_DT)
        for hh in tl.static_range(HEADS):
            h: tl.constexpr = HEADS - 1 - hh
            o = tl.load(sp_o + h * BN * BVD + tile_e)
            ro = tl.maximum(o, 0.0)
            ga = tl.zeros([BN, BVD], dtype=ACC_DT)
            for c0 in tl.static_range(0, C, BC):
                offs_o = c0 + tl.arange(0, BC)
                omask = offs_o < C
                gyt = tl.load(gy_base + offs_o[None, :].to(tl.int64) * HW + tok[:, None],
                              mask=valid[:, None] & omask[None, :], other=0.0).to(ACC_DT)
                wpt = tl.load(wp_ptr + offs_o[:, None] * HV + h * VD + offs_e[None, :],
                              mask=omask[:, None] & emask[None, :], other=0.0).to(ACC_DT)
                ga += tl.dot(gyt.to(DOT_DT), wpt.to(DOT_DT), input_precision=PREC)
                gwp = tl.dot(tl.trans(gyt).to(DOT_DT), ro.to(DOT_DT), input_precision=PREC)
                tl.atomic_add(g_wp + offs_o[:, None] * HV + h * VD + offs_e[None, :], gwp,
                              mask=omask[:, None] & emask[None, :])
            go = tl.where(o > 0, ga, 0.0)
            if h < HEADS - 1:
                go = go + g_next
            # recompute the probabilities
            qs = tl.load(sp_qs + h * BN * BKD + tile_j)
            k = tl.load(sp_k + h * BN * BKD + tile_j)
            v = tl.load(sp_v + h * BN * BVD + tile_e)
            sc = tl.dot(qs.to(DOT_DT), tl.trans(k.to(DOT_DT)), input_precision=PREC)
            idx = tl.abs(r[:, None] - r[None, :]) * WS + tl.abs(s[:, None] - s[None, :])
            nm_mask = in_win[:, None] & in_win[None, :]
            ab = tl.load(ab_ptr + h * WS * WS + idx, mask=nm_mask, other=0.0)
            sc = sc + ab.to(ACC_DT)
            sc = tl.where(in_win[None, :], sc, float('-inf'))
            mx = tl.max(sc, axis=1)
            p = tl.exp(sc - mx[:, None])
            p = p / tl.sum(p, axis=1)[:, None]
            # P @ V backward, softmax backward
            gp = tl.dot(go.to(DOT_DT), tl.trans(v.to(DOT_DT)), input_precision=PREC)
            gv = tl.dot(tl.trans(p).to(DOT_DT), go.to(DOT_DT), input_precision=PREC)
            gs = p * (gp - tl.sum(p * gp, axis=1)[:, None])
            tl.atomic_add(g_abm + h * BN * BN + offs_n[:, None] * BN + offs_m[None, :], gs,
                          mask=nm_mask)
            # scores backward (scale is inside qs)
            gqs = tl.dot(gs.to(DOT_DT), k.to(DOT_DT), input_precision=PREC)
            gk = tl.dot(tl.trans(gs).to(DOT_DT), qs.to(DOT_DT), input_precision=PREC)
            gqd = gqs * scale
            tl.atomic_add(g_dwb + h * KD + offs_j, tl.sum(gqd, axis=0), mask=jmask)
            # depthwise conv backward
            tl.store(sp_g + tile_j, gqd)
            tl.debug_barrier()
            sq_h = sp_q + h * BN * BKD
            gq = tl.zeros([BN, BKD], dtype=ACC_DT)
            for t in tl.static_range(KK):
                dy: tl.constexpr = t // K - R
                dx: tl.constexpr = t % K - R
                rr = r + dy
                ss = s + dx
                ok = in_win & (rr >= 0) & (rr < WS) & (ss >= 0) & (ss < WS)
                qn = tl.load(sq_h + (rr * WS + ss)[:, None] * BKD + offs_j[None, :],
                             mask=ok[:, None], other=0.0)
                tl.atomic_add(g_dw + h * KD * KK + offs_j * KK + t, tl.sum(gqd * qn, axis=0),
                              mask=jmask)
                rb = r - dy
                sb = s - dx
                okb = in_win & (rb >= 0) & (rb < WS) & (sb >= 0) & (sb < WS)
                gn = tl.load(sp_g + (rb * WS + sb)[:, None] * BKD + offs_j[None, :],
                             mask=okb[:, None], other=0.0)
                wt = tl.load(dw_ptr + h * KD * KK + offs_j * KK + t, mask=jmask, other=0.0)
                gq += gn * wt.to(ACC_DT)[None, :]
            tl.debug_barrier()
            # qkv 1x1 conv backward
            inp = tl.load(sp_inp + h * BN * BCIN + tile_c)
            wbase = wqkv_ptr + h * D * CIN
            wq = tl.load(wbase + offs_j[:, None] * CIN + offs_c[None, :],
                         mask=jmask[:, None] & cmask[None, :], other=0.0).to(DOT_DT)
            wk = tl.load(wbase + (KD + offs_j)[:, None] * CIN + offs_c[None, :],
                         mask=jmask[:, None] & cmask[None, :], other=0.0).to(DOT_DT)
            wv = tl.load(wbase + (2 * KD + offs_e)[:, None] * CIN + offs_c[None, :],
                         mask=emask[:, None] & cmask[None, :], other=0.0).to(DOT_DT)
            gq_d = gq.to(DOT_DT)
            gk_d = gk.to(DOT_DT)
            gv_d = gv.to(DOT_DT)
            ginp = tl.dot(gq_d, wq, input_precision=PREC)
            ginp += tl.dot(gk_d, wk, input_precision=PREC)
            ginp += tl.dot(gv_d, wv, input_precision=PREC)
            inp_d = inp.to(DOT_DT)
            gb = g_wqkv + h * D * CIN
            tl.atomic_add(gb + offs_j[:, None] * CIN + offs_c[None, :],
                          tl.dot(tl.trans(gq_d), inp_d, input_precision=PREC),
                          mask=jmask[:, None] & cmask[None, :])
            tl.atomic_add(gb + (KD + offs_j)[:, None] * CIN + offs_c[None, :],
                          tl.dot(tl.trans(gk_d), inp_d, input_precision=PREC),
                          mask=jmask[:, None] & cmask[None, :])
            tl.atomic_add(gb + (2 * KD + offs_e)[:, None] * CIN + offs_c[None, :],
                          tl.dot(tl.trans(gv_d), inp_d, input_precision=PREC),
                          mask=emask[:, None] & cmask[None, :])
            tl.atomic_add(g_bqkv + h * D + offs_j, tl.sum(gq, axis=0), mask=jmask)
            tl.atomic_add(g_bqkv + h * D + KD + offs_j, tl.sum(gk, axis=0), mask=jmask)
            tl.atomic_add(g_bqkv + h * D + 2 * KD + offs_e, tl.sum(gv, axis=0), mask=emask)
            # x gets the head input's gradient, the previous head's output gets it too
            tl.store(gx_base + (h * CIN + offs_c)[None, :].to(tl.int64) * HW + tok[:, None],
                     ginp.to(gx_ptr.dtype.element_ty), mask=valid[:, None] & cmask[None, :])
            g_next = ginp
        tl.debug_barrier()


# ------------------------------------------------------------------------------------------------
def _next_pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (max(int(n), 1) - 1).bit_length())


def _config(x, qkv_weight, dw_weight, key_dim, window_size):
    B, C, H, W = x.shape
    heads, D, cin = qkv_weight.shape
    vd = D - 2 * key_dim
    ws = int(window_size)
    nh, nw = -(-H // ws), -(-W // ws)
    acc_dt = tl.float64 if x.dtype == torch.float64 else tl.float32
    if x.dtype in (torch.float16, torch.bfloat16):
        dot_dt, prec = (tl.float16 if x.dtype == torch.float16 else tl.bfloat16), 'ieee'
    elif x.dtype == torch.float64:
        dot_dt, prec = tl.float64, 'ieee'
    else:
        dot_dt = tl.float32
        tf32 = x.is_cuda and torch.backends.cuda.matmul.allow_tf32
        prec = 'tf32' if tf32 else 'ieee'
    bcin = _next_pow2(cin)
    bvd = _next_pow2(vd)
    if heads > 1:
        bcin = bvd = max(bcin, bvd)
    cfg = dict(C=C, HEADS=heads, CIN=cin, KD=int(key_dim), VD=vd, K=dw_weight.shape[-1], WS=ws,
               BN=_next_pow2(ws * ws), BCIN=bcin, BKD=_next_pow2(key_dim), BVD=bvd,
               BC=min(64, _next_pow2(C)), DOT_DT=dot_dt, PREC=prec, ACC_DT=acc_dt)
    n_tasks = B * nh * nw
    if x.is_cuda:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        nprog = min(n_tasks, 4 * sms)
    else:  # interpreter: few programs, so the persistent loop is exercised
        nprog = min(n_tasks, 3)
    return cfg, (B, C, H, W, nh, nw, n_tasks, nprog)


def _prep(t):
    return t.contiguous()


def forward(x, qkv_weight, qkv_bias, dw_weight, dw_bias, attn_bias, proj_weight, proj_bias,
            key_dim, window_size, scale):
    x = _prep(x)
    ws_ = [_prep(t) for t in (qkv_weight, qkv_bias, dw_weight, dw_bias, attn_bias, proj_weight,
                              proj_bias)]
    cfg, (B, C, H, W, nh, nw, n_tasks, nprog) = _config(x, ws_[0], ws_[2], key_dim, window_size)
    y = torch.empty_like(x)
    acc_t = torch.float64 if x.dtype == torch.float64 else torch.float32
    f32 = dict(device=x.device, dtype=acc_t)
    sq = torch.empty(nprog * cfg['BN'] * cfg['BKD'], **f32)
    so = torch.empty(nprog * cfg['BN'] * cfg['HEADS'] * cfg['BVD'], **f32)
    _cga_fwd_kernel[(nprog,)](x, y, *ws_, sq, so, H, W, nh, nw, n_tasks, float(scale),
                              num_warps=4, **cfg)
    return y


def backward(grad_y, x, qkv_weight, qkv_bias, dw_weight, dw_bias, attn_bias, proj_weight,
             proj_bias, key_dim, window_size, scale):
    x = _prep(x)
    gy = _prep(grad_y)
    qkv_weight, qkv_bias, dw_weight, dw_bias, attn_bias, proj_weight, proj_bias = [
        _prep(t) for t in (qkv_weight, qkv_bias, dw_weight, dw_bias, attn_bias, proj_weight,
                           proj_bias)]
    cfg, (B, C, H, W, nh, nw, n_tasks, nprog) = _config(x, qkv_weight, dw_weight, key_dim,
                                                        window_size)
    heads, D, cin = qkv_weight.shape
    kd, K, ws = cfg['KD'], cfg['K'], cfg['WS']
    BN, BCIN, BKD, BVD = cfg['BN'], cfg['BCIN'], cfg['BKD'], cfg['BVD']
    acc_t = torch.float64 if x.dtype == torch.float64 else torch.float32
    f32 = dict(device=x.device, dtype=acc_t)
    gx = torch.empty_like(x)
    s_inp = torch.empty(nprog * heads * BN * BCIN, **f32)
    s_q = torch.empty(nprog * heads * BN * BKD, **f32)
    s_qs = torch.empty_like(s_q)
    s_k = torch.empty_like(s_q)
    s_v = torch.empty(nprog * heads * BN * BVD, **f32)
    s_o = torch.empty_like(s_v)
    s_g = torch.empty(nprog * BN * BKD, **f32)
    g_wqkv = torch.zeros(heads, D, cin, **f32)
    g_bqkv = torch.zeros(heads, D, **f32)
    g_dw = torch.zeros(heads, kd, K, K, **f32)
    g_dwb = torch.zeros(heads, kd, **f32)
    g_abm = torch.zeros(heads, BN, BN, **f32)
    g_wp = torch.zeros(C, proj_weight.shape[1], **f32)
    g_bp = torch.zeros(C, **f32)
    _cga_bwd_kernel[(nprog,)](gy, x, gx, qkv_weight, qkv_bias, dw_weight, dw_bias, attn_bias,
                              proj_weight, s_inp, s_q, s_qs, s_k, s_v, s_o, s_g,
                              g_wqkv, g_bqkv, g_dw, g_dwb, g_abm, g_wp, g_bp,
                              H, W, nh, nw, n_tasks, float(scale), num_warps=4, **cfg)
    N = ws * ws
    idx = bias_index(ws, x.device).reshape(-1)
    g_ab = torch.zeros(heads, N, **f32)
    g_ab.index_add_(1, idx, g_abm[:, :N, :N].reshape(heads, N * N))
    return [gx, g_wqkv, g_bqkv, g_dw, g_dwb, g_ab, g_wp, g_bp]
