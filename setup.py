"""Build nf4kit: the Python package plus nf4kit._C, compiled by CMake + ninja.

Environment:
  NF4KIT_NO_EXT=1      skip the extension (pure-Python install; the torch backend serves)
  NF4KIT_NO_CUDA=1     build the CPU kernels only, even if nvcc is found
  NF4KIT_CUDA_ARCHS    CUDA architectures for CMake (default "80;90")
  NF4KIT_BUILD_JOBS    parallel compile jobs (default: CPU count)
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if os.environ.get("NF4KIT_NO_EXT") == "1":
            print("nf4kit: NF4KIT_NO_EXT=1, skipping the compiled extension")
            return
        import pybind11

        out_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(os.environ.get("NF4KIT_BUILD_DIR", Path(self.build_temp) / "cmake")).resolve()
        _drop_stale_cache(build_dir)
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake = shutil.which("cmake") or "cmake"
        args = [
            cmake, "-S", str(ROOT), "-B", str(build_dir),
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DNF4KIT_OUTPUT_DIR={out_path.parent}",
            f"-DNF4KIT_OUTPUT_NAME={out_path.name}",
            f"-DNF4KIT_WITH_CUDA={'OFF' if os.environ.get('NF4KIT_NO_CUDA') == '1' else 'ON'}",
            f"-DNF4KIT_CUDA_ARCHS={os.environ.get('NF4KIT_CUDA_ARCHS', '80;90')}",
        ]
        if shutil.which("ninja"):
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={shutil.which('ninja')}"]
        subprocess.run(args, check=True)
        jobs = os.environ.get("NF4KIT_BUILD_JOBS", str(os.cpu_count() or 2))
        subprocess.run([cmake, "--build", str(build_dir), "-j", jobs], check=True)
        if not out_path.exists():
            raise RuntimeError(f"nf4kit: CMake did not produce {out_path}")


def _drop_stale_cache(build_dir: Path) -> None:
    """pip builds in a throw-away environment whose cmake and ninja paths CMake caches: a second
    build in the same tree would call the deleted ones.  Start over when they are gone."""
    cache = build_dir / "CMakeCache.txt"
    if not cache.exists():
        return
    for line in cache.read_text(errors="replace").splitlines():
        for key in ("CMAKE_COMMAND:INTERNAL=", "CMAKE_MAKE_PROGRAM:FILEPATH="):
            if line.startswith(key) and not Path(line[len(key):]).exists():
                shutil.rmtree(build_dir, ignore_errors=True)
                return


setup(
    packages=["nf4kit", "nf4kit.backends", "nf4kit.integrations", "nf4kit.triton_kernels", "nf4kit.data"],
    package_dir={"nf4kit": "python/nf4kit", "nf4kit.triton_kernels": "triton_kernels"},
    ext_modules=[CMakeExtension("nf4kit._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
