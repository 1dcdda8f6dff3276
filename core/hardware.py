"""What this CPU offers the techniques: where latency is measured, the instructions decide how much int8
and half precision can gain (docs/bench_quantization.md: measured with VNNI on 2026-11-29, without on 2026-12-06)."""
from __future__ import annotations

import os
import platform

import torch


def capabilities() -> dict:
    """PyTorch's reading of this CPU's flags (empty on an older PyTorch)."""
    try:
        return dict(torch.cpu.get_capabilities())
    except Exception:
        return {}


def int8_vnni(caps: dict | None = None) -> bool | None:
    """Whether this x86 CPU has 8-bit dot-product instructions (VNNI in any form); None off x86."""
    caps = capabilities() if caps is None else caps
    if (caps.get("architecture") or platform.machine()) not in ("x86_64", "x86", "AMD64"):
        return None
    return bool(caps.get("avx512_vnni") or caps.get("avx_vnni") or caps.get("amx_int8"))


def cpu_summary() -> dict:
    """Name, cores, vector instructions, and one line each on what int8 and bf16 can do here."""
    from .training import bf16_training_supported
    caps = capabilities()
    arch = caps.get("architecture") or platform.machine()
    vnni = int8_vnni(caps)
    if vnni is None:
        int8 = "int8: no 16-bit saturation on this architecture"
    elif not vnni:
        int8 = ("int8: no VNNI, so int8 gains little speed here (about 1.5x at batch 1 for a ResNet-34) "
                "and its weights use 7 bits")
    else:
        int8 = "int8: VNNI 8-bit dot products, so int8 runs several times faster than fp32"
    bf16 = bf16_training_supported("cpu")
    return {
        "name": caps.get("cpu_name") or platform.processor() or arch,
        "architecture": arch,
        "cores": caps.get("num_physical_cores") or os.cpu_count(),
        "vector": torch.backends.cpu.get_cpu_capability(),
        "int8_vnni": vnni,
        "bf16": bf16,
        "int8_line": int8,
        "bf16_line": ("bf16: native (training uses bfloat16 autocast)" if bf16
                      else "bf16: not native (training runs in fp32; the bf16 mode is refused)"),
    }


def cpu_id(summary: dict | None = None) -> str:
    """The CPU a latency was timed on, as results record it: name, cores and vector instructions."""
    s = summary or cpu_summary()
    return f"{s['name']}, {s['cores']} cores, {s['vector']}"


def cpu_line(summary: dict | None = None) -> str:
    """One line for the CLI and the app's home page."""
    s = summary or cpu_summary()
    return f"{cpu_id(s)}; {s['int8_line']}; {s['bf16_line']}"
