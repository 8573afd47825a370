"""What machine the numbers came from, and a rough nominal peak MAC rate for the roofline."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

# Distributions whose versions matter for the numbers (read from metadata: nothing is imported).
VERSIONED = ("ai-edge-litert", "tflite-runtime", "tensorflow", "tensorflow-cpu", "keras", "numpy", "Pillow")


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def cpuinfo(text: str | None = None) -> dict:
    """Model name, MHz and feature flags from /proc/cpuinfo (x86 and ARM spellings)."""
    text = _read("/proc/cpuinfo") if text is None else text
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        key, _, value = line.partition(":")
        key = key.strip().lower()
        fields.setdefault(key, value.strip())   # first CPU's values
    model = (fields.get("model name") or fields.get("model") or fields.get("hardware")
             or platform.processor() or "unknown")
    flags = (fields.get("flags") or fields.get("features") or "").split()
    mhz = None
    max_khz = _read("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").strip()
    if max_khz.isdigit():
        mhz = int(max_khz) / 1000.0
    elif fields.get("cpu mhz"):
        try:
            mhz = float(fields["cpu mhz"])
        except ValueError:
            mhz = None
    return {"model": model, "mhz": mhz, "flags": flags}


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def versions() -> dict:
    out = {}
    for dist in VERSIONED:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def os_name() -> str:
    for line in _read("/etc/os-release").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip().strip('"') + f" (kernel {platform.release()})"
    return platform.platform()


def macs_per_cycle(arch: str, flags: list[str]) -> dict:
    """Per-core MACs/cycle for int8 and fp32, from ISA flags. An estimate: assumes two full-width
    vector FMA/dot-product pipes (server x86 with AVX-512; Cortex-A76-class ARM)."""
    f = set(flags)
    arch = arch.lower()
    if arch in ("x86_64", "amd64", "i686", "i386"):
        if "avx512_vnni" in f or "avx512vnni" in f:
            basis = "AVX-512 VNNI: 2 x 64 int8 MACs (VPDPBUSD zmm); 2 x 16 fp32 FMA"
            if "amx_int8" in f:
                basis += ("; AMX-INT8 is also present: a runtime using AMX tiles (~1024 int8 MACs/cycle) can "
                          "exceed this vector-unit estimate")
            return {"int8": 128, "fp32": 32, "basis": basis}
        if "avx512f" in f:
            return {"int8": 64, "fp32": 32, "basis": "AVX-512 without VNNI: ~2 x 32 int8 MACs; 2 x 16 fp32 FMA"}
        if "avx_vnni" in f:
            return {"int8": 64, "fp32": 16, "basis": "AVX-VNNI: 2 x 32 int8 MACs (ymm); 2 x 8 fp32 FMA"}
        if "avx2" in f:
            return {"int8": 32, "fp32": 16, "basis": "AVX2: ~2 x 16 int8 MACs (VPMADDUBSW); 2 x 8 fp32 FMA"}
        return {"int8": 16, "fp32": 8, "basis": "SSE: rough guess"}
    if arch in ("aarch64", "arm64"):
        if "asimddp" in f:
            return {"int8": 32, "fp32": 8, "basis": "NEON dot product: 2 x 16 int8 MACs (SDOT); 2 x 4 fp32 FMA"}
        return {"int8": 16, "fp32": 8, "basis": "NEON without dot product: ~2 x 8 int8 MACs (SMLAL); 2 x 4 fp32 FMA"}
    return {"int8": None, "fp32": None, "basis": f"unknown architecture {arch}"}


def nominal_peak(info: dict, threads: int, precision: str) -> float | None:
    """Estimated peak GMAC/s on `threads` cores: cores x GHz x MACs/cycle. None when unknown."""
    per = info["peak_estimate"]["macs_per_cycle"].get(precision)
    mhz = info["cpu_mhz"]
    if not per or not mhz:
        return None
    return min(threads, info["cores"]) * (mhz / 1000.0) * per


def describe_machine() -> dict:
    cpu = cpuinfo()
    arch = platform.machine()
    per = macs_per_cycle(arch, cpu["flags"])
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    mem_kb = next((int(line.split()[1]) for line in _read("/proc/meminfo").splitlines()
                   if line.startswith("MemTotal:")), None)
    interesting = [fl for fl in cpu["flags"] if fl in (
        "avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16",
        "asimd", "asimddp", "fphp", "asimdhp", "i8mm", "sve")]
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "cpu_model": cpu["model"],
        "cpu_mhz": cpu["mhz"],
        "cores": usable_cores(),
        "architecture": arch,
        "os": os_name(),
        "python": f"{platform.python_implementation()} {sys.version.split()[0]}",
        "memory_gb": round(mem_kb / 1024 / 1024, 1) if mem_kb else None,
        "isa_flags": interesting,
        "load_average_at_start": load,
        "versions": versions(),
        "peak_estimate": {"macs_per_cycle": {"int8": per["int8"], "fp32": per["fp32"]}, "basis": per["basis"],
                          "note": "ESTIMATE: cores x nominal GHz x MACs/cycle from ISA flags; not measured"},
    }
