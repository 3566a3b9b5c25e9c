"""What the machine can run natively: CPU model and instruction-set flags, native bf16.

The fastest path differs between machines (recipes/README.md, "Speed on a CPU"): bf16 is 5x fp32 on
an Intel Xeon with AMX, 1.3-1.5x on an AMD Zen 5 with AVX512-BF16, and an emulation far slower than
fp32 on a CPU with neither. These helpers say which case a machine is; `ftkit.speed` then measures.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

# The flags that decide the fast paths: fp32 width (avx2, avx512f), native bf16 (avx512_bf16,
# amx_bf16), int8 dot products (avx512_vnni, avx_vnni, amx_int8); all avx512*/amx* are kept.
_RELEVANT = ("avx2", "fma", "avx_vnni", "avx_vnni_int8")
BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # best first


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:  # not Linux: no flags known, so nothing is assumed native
        return ""


def cpu_flags() -> set[str]:
    """The CPU's instruction-set flags as Linux lists them (empty set where /proc/cpuinfo is absent)."""
    for line in _cpuinfo().splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_info() -> dict:
    """CPU model, cores, and the flags that matter for speed (avx2, avx512*, amx*, vnni), for results
    files. `cpu_id` (vendor, family, model, stepping) tells machines apart where the model name does
    not: a VM's "AMD EPYC" was a Zen 1 (family 23 model 1) in one session, a Zen 3 (25/1) in another."""
    fields = {}
    for line in _cpuinfo().splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:  # the first processor's block
            fields[key.strip()] = value.strip()
    model = fields.get("model name") or platform.processor() or platform.machine()
    flags = cpu_flags()
    relevant = sorted(f for f in flags if f in _RELEVANT or f.startswith(("avx512", "amx")) or "vnni" in f)
    info = {"cpu": model, "cores": os.cpu_count(), "cpu_flags": relevant}
    if "cpu family" in fields:
        info["cpu_id"] = "{} family {} model {} stepping {}".format(
            *(fields.get(key, "?") for key in ("vendor_id", "cpu family", "model", "stepping"))
        )
    return info


def has_vnni() -> bool:
    """True if the CPU has int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX-INT8)."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def native_bf16(device: str = "cpu") -> str | None:
    """Why `device` runs bf16 natively (`amx_bf16`, `avx512_bf16`, `cuda`), or None where bf16 would be
    emulated in fp32 instructions (AVX2-only and plain AVX-512 CPUs: slower than fp32)."""
    if device == "cuda":
        import torch

        return "cuda" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else None
    flags = cpu_flags()
    return next((f for f in BF16_FLAGS if f in flags), None)
