"""How figures name the machine they were measured on."""
import contextlib
import os
import platform


def cpu_model_name(cpuinfo="/proc/cpuinfo"):
    """The CPU as figures should name it: lscpu's model name, then family/model and the widest vector ISA it has,
    and the cores this process may use, e.g. "AMD EPYC (family 25 model 17, avx512_bf16, 2 cores)". The model name
    alone does not tell an AVX-512 EPYC from an AVX2-only one, whose speeds differ by ~1.5x."""
    fields = {}
    with contextlib.suppress(OSError):
        with open(cpuinfo) as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    name = fields.get("model name") or platform.processor() or "unknown"
    flags = set(fields.get("flags", "").split())
    isa = next((flag for flag in ("amx_tile", "avx512_bf16", "avx512f", "avx2") if flag in flags), None)
    details = [f"family {fields['cpu family']} model {fields['model']}"] if "cpu family" in fields else []
    details += [isa] if isa else []
    details.append(f"{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} cores")
    return f"{name} ({', '.join(details)})"
