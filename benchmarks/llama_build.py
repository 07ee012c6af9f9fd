"""How the llama.cpp peer is built here, and what the installed build says it was built with.

``python -m benchmarks.llama_build`` prints the ``CMAKE_ARGS`` for building
llama-cpp-python on this machine; ``--check`` says whether the installed build
must be (re)built; ``--installed`` prints what it was compiled with (JSON). The
Makefile's bench target uses the first two; bench.json records :func:`describe`.

Why not ggml's default ``GGML_NATIVE=ON``: ``-march=native`` turns on every
instruction set the CPU advertises, AMX included, and ggml's AMX kernels crash
(SIGSEGV while loading a model) where the CPU advertises AMX but the process may
not use its tile state: virtual machines and containers (issue 17). So the build
is ``GGML_NATIVE=OFF`` with each x86 instruction set ggml knows set ON or OFF
from ``/proc/cpuinfo`` and AMX always OFF: the fastest llama.cpp that runs here.
On other architectures nothing is printed and ggml's own defaults apply.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import re
import subprocess
import sys
from pathlib import Path

from .isolate import exit_text

# ggml CMake option -> the /proc/cpuinfo flags it needs (all of them). GGML_AVX512
# compiles with -mavx512f/cd/vl/dq/bw (ggml-cpu/CMakeLists.txt), so it needs all five.
GGML_X86 = {
    "GGML_SSE42": ("sse4_2",),
    "GGML_AVX": ("avx",),
    "GGML_AVX2": ("avx2",),
    "GGML_FMA": ("fma",),
    "GGML_F16C": ("f16c",),
    "GGML_BMI2": ("bmi2",),
    "GGML_AVX_VNNI": ("avx_vnni",),
    "GGML_AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    "GGML_AVX512_VBMI": ("avx512vbmi",),
    "GGML_AVX512_VNNI": ("avx512_vnni",),
    "GGML_AVX512_BF16": ("avx512_bf16",),
}
AMX_OFF = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The flags of the first CPU in ``path`` (empty when there is none, e.g. not Linux)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, val = line.partition(":")
                if key.strip() == "flags":
                    return set(val.split())
    except OSError:
        pass
    return set()


def cmake_args(flags: set[str], arch: str | None = None) -> list[str]:
    """ggml CMake options for a CPU with ``flags``: portable (no -march=native), AMX off.

    Every option is given explicitly: with ``GGML_NATIVE=OFF`` ggml turns SSE4.2,
    AVX, AVX2, BMI2, FMA and F16C on by default, which a CPU without them cannot run.
    """
    arch = arch or platform.machine()
    if arch.lower() not in ("x86_64", "amd64", "i686", "i386"):
        return []
    args = ["-DGGML_NATIVE=OFF"]
    for opt, needs in GGML_X86.items():
        args.append(f"-D{opt}={'ON' if all(f in flags for f in needs) else 'OFF'}")
    args += [f"-D{opt}=OFF" for opt in AMX_OFF]
    return args


def expected_features(flags: set[str], arch: str | None = None) -> list[str]:
    """The names ``llama_print_system_info()`` shows for a build made with :func:`cmake_args` here."""
    on = [a[2:].split("=")[0] for a in cmake_args(flags, arch) if a.endswith("=ON")]
    return [o[len("GGML_"):] for o in on if o != "GGML_SSE42"]  # SSE4.2 has no name of its own there


def system_info(text: str) -> dict:
    """Parse ``llama_print_system_info()`` into ``{"features": [...], "raw": text}``.

    The text looks like ``CPU : SSE3 = 1 | AVX = 1 | AVX512 = 1 | LLAMAFILE = 1 | ...``
    and names what the library was compiled with (ggml lists the features that are on).
    """
    on = [name for name, val in re.findall(r"([A-Za-z0-9_]+)\s*=\s*([0-9]+)", text) if val != "0"]
    return {"features": on, "raw": text.strip()}


def installed_build() -> dict:
    """What the importable llama-cpp-python was compiled with: version, features, AMX or not.

    Raises ImportError when it is not installed. Loads no model; still, callers
    run it in a child process (``--installed``) so a broken library costs nothing.
    """
    import llama_cpp

    raw = llama_cpp.llama_print_system_info()
    info = system_info(raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw))
    info["version"] = getattr(llama_cpp, "__version__", None)
    info["amx"] = any(f.startswith("AMX") for f in info["features"])
    return info


def describe(timeout: float = 120.0) -> dict:
    """The llama.cpp peer's build for bench.json: what is installed, and what this CPU calls for.

    ``installed`` is None when llama-cpp-python is absent, or ``{"error": ...}``
    when asking it failed; ``missing`` lists instruction sets this CPU has that
    the installed build lacks (a slower peer than the portable build would be).
    """
    flags = cpu_flags()
    simd = sorted(f for f in flags if f.startswith(("amx", "avx", "sse4")) or f in ("fma", "f16c", "bmi2"))
    out: dict = {"cpu_flags": simd, "cmake_args_for_this_cpu": cmake_args(flags),
                 "expected_features": expected_features(flags), "installed": None}
    out["installed"] = _ask_installed(timeout)
    if out["installed"] and "error" not in out["installed"]:
        out["installed"]["missing"] = [f for f in out["expected_features"] if f not in out["installed"]["features"]]
    out["summary"] = summary(out)
    return out


def _ask_installed(timeout: float) -> dict | None:
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.llama_build", "--installed"],
                              cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"asking llama-cpp-python for its build hung for {timeout:g} s"}
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])[-240:]
        return {"error": f"asking llama-cpp-python for its build: {exit_text(proc.returncode)}; {tail}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summary(build: dict | None) -> str:
    """One line for the table: what the llama.cpp peer was compiled with."""
    inst = (build or {}).get("installed")
    if not inst:
        return "llama-cpp-python is not installed"
    if "error" in inst:
        return inst["error"]
    isa = [f for f in inst["features"] if f not in ("LLAMAFILE", "OPENMP", "REPACK", "KLEIDIAI", "ACCELERATE")]
    line = f"llama-cpp-python {inst.get('version')} compiled for {' '.join(isa) or 'no SIMD extensions'}"
    if inst.get("amx"):
        line += " **with AMX** (crashes where the CPU advertises AMX but the process may not use it; " \
                "rebuild with `make bench`)"
    else:
        line += ", AMX off"
    if inst.get("missing"):
        line += f"; lacks {' '.join(inst['missing'])}, which this CPU has (a slower peer than it could be)"
    return line


def check() -> int:
    """Exit status for the Makefile: 0 when the installed build runs here, 1 when it must be (re)built.

    1 when llama-cpp-python is missing, cannot say how it was built, or has AMX
    kernels; a build that merely lacks an instruction set of this CPU gets a note.
    """
    if importlib.util.find_spec("llama_cpp") is None:
        print("llama-cpp-python is not installed", file=sys.stderr)
        return 1
    inst = describe()["installed"]
    if "error" in inst:
        print(inst["error"], file=sys.stderr)
        return 1
    if inst["amx"]:
        print(summary({"installed": inst}), file=sys.stderr)
        return 1
    if inst["missing"]:  # runs, only slower: say so, but do not rebuild on every make bench
        print(f"note: {summary({'installed': inst})}; make bench LLAMA_REBUILD=1 rebuilds it", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.llama_build",
                                 description="Print CMAKE_ARGS for a portable llama-cpp-python build on this CPU "
                                             "(GGML_NATIVE=OFF, the CPU's instruction sets, AMX off).")
    ap.add_argument("--installed", action="store_true", help="print the installed build as JSON")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 when llama-cpp-python is missing, broken or built with AMX")
    a = ap.parse_args(argv)
    if a.installed:
        print(json.dumps(installed_build()))
        return 0
    if a.check:
        return check()
    print(" ".join(cmake_args(cpu_flags())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
