"""The kernel sources compile on a CPU machine: nvcc alone for the kernel, g++ with torch's headers for the binding."""

from __future__ import annotations

import shutil
import subprocess
import sysconfig

import pytest

from fewstep.kernels.cuda import csrc_dir


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_kernel_compiles_with_nvcc(tmp_path, arch):
    src = csrc_dir()
    result = subprocess.run(
        ["nvcc", "-c", str(src / "attention_jvp.cu"), "-o", str(tmp_path / "k.o"), f"-arch={arch}", "-O3",
         "-std=c++17", "-Xptxas", "-v", "-I", str(src)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "k.o").stat().st_size > 0
    assert result.stderr.count("Compiling entry function") == 12  # 3 dtypes × 2 head dims × (primal, tangent)


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")
def test_binding_compiles_against_torch_headers():
    from torch.utils.cpp_extension import include_paths

    flags = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}", f"-I{csrc_dir()}"]
    result = subprocess.run(
        ["g++", "-std=c++20", "-fsyntax-only", "-w", *flags, "-DTORCH_EXTENSION_NAME=fewstep_attention_jvp",
         str(csrc_dir() / "attention_jvp_binding.cpp")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
