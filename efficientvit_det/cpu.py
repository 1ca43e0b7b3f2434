"""What this machine's CPU can run fast: the one probe of its capabilities.

Every choice and every report that depends on the CPU reads :func:`cpu_info`: the inference
precision (bf16 where oneDNN runs it natively), the int8 note (VNNI dot products), the
benchmarks' machine line. The source is ``torch.cpu.get_capabilities()`` (cpuinfo's feature
flags, any OS) plus oneDNN's own bf16 check. The C++ attention kernel checks cpuid itself at
run time (it must, before executing an instruction), and reports that as ``isa``.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any, Dict

import torch

__all__ = ['CpuInfo', 'cpu_info']


@dataclass(frozen=True)
class CpuInfo:
    """The CPU's name and the instruction sets that decide which path is fast."""

    name: str
    avx2: bool
    avx512: bool  # AVX512-F
    avx512_bf16: bool
    amx_bf16: bool
    avx512_vnni: bool
    avx_vnni: bool
    amx_int8: bool
    onednn_bf16: bool  # oneDNN runs bf16 at all (emulated with AVX512 when not native)

    @property
    def native_bf16(self) -> bool:
        """oneDNN runs bf16 convolutions/matmuls in hardware: AMX-BF16 or AVX512-BF16."""
        return self.onednn_bf16 and (self.amx_bf16 or self.avx512_bf16)

    @property
    def vnni(self) -> bool:
        """int8 dot products in hardware (AVX512-VNNI, AVX-VNNI or AMX-INT8)."""
        return self.avx512_vnni or self.avx_vnni or self.amx_int8

    def bf16_instructions(self) -> str:
        found = [n for n, ok in (('AMX-BF16', self.amx_bf16), ('AVX512-BF16', self.avx512_bf16))
                 if ok]
        return ' + '.join(found) if found else 'neither AMX-BF16 nor AVX512-BF16'

    def describe(self) -> str:
        """One line, e.g. ``AMD EPYC: AVX2, AVX-512, AVX512-BF16, AVX512-VNNI; oneDNN bf16: native``."""
        isa = [n for n, ok in (('AVX2', self.avx2), ('AVX-512', self.avx512),
                               ('AVX512-BF16', self.avx512_bf16), ('AMX-BF16', self.amx_bf16),
                               ('AVX512-VNNI', self.avx512_vnni), ('AVX-VNNI', self.avx_vnni),
                               ('AMX-INT8', self.amx_int8)) if ok]
        onednn = ('native' if self.native_bf16 else 'emulated (slower than fp32)'
                  if self.onednn_bf16 else 'unsupported')
        return f'{self.name}: {", ".join(isa) or "no AVX2"}; oneDNN bf16: {onednn}'

    def as_dict(self) -> Dict[str, Any]:
        return dict(asdict(self), native_bf16=self.native_bf16, vnni=self.vnni)


@functools.lru_cache(maxsize=None)
def cpu_info() -> CpuInfo:
    """This machine's :class:`CpuInfo` (probed once)."""
    caps: Dict[str, Any] = {}
    try:  # torch >= 2.7
        caps = dict(torch.cpu.get_capabilities())
    except (AttributeError, RuntimeError):
        pass
    try:
        onednn = bool(torch.backends.mkldnn.is_available()
                      and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn = False
    flag = lambda key: bool(caps.get(key, False))  # noqa: E731
    return CpuInfo(name=str(caps.get('cpu_name') or 'CPU'), avx2=flag('avx2'),
                   avx512=flag('avx512_f'), avx512_bf16=flag('avx512_bf16'),
                   amx_bf16=flag('amx_bf16'), avx512_vnni=flag('avx512_vnni'),
                   avx_vnni=flag('avx_vnni'), amx_int8=flag('amx_int8'), onednn_bf16=onednn)
