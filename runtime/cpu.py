"""What this CPU can run, read from /proc/cpuinfo (no TVM compiler needed)."""

from __future__ import annotations

import platform
from functools import lru_cache

# LLVM feature names → /proc/cpuinfo flag names where they differ
_FLAG_NAMES = {"sse4.2": "sse4_2", "avx512vnni": "avx512_vnni", "dotprod": "asimddp"}


@lru_cache(maxsize=1)
def host_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):  # x86, aarch64
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def host_arch() -> str:
    m = platform.machine()
    return {"AMD64": "x86_64", "arm64": "aarch64"}.get(m, m)


def missing_features(required: list[str]) -> list[str]:
    flags = host_flags()
    if not flags:
        return []  # cannot tell; let it run
    return [f for f in required if _FLAG_NAMES.get(f, f) not in flags]
