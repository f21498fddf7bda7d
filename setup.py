"""Generates the out-of-line ABI module from sockrepair/engine/decl/ before the package is copied (also for editable installs)."""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class BuildPyWithFFI(build_py):
    def run(self) -> None:
        spec = importlib.util.spec_from_file_location("_ffi_build", HERE / "sockrepair" / "engine" / "_ffi_build.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.ffibuilder.emit_python_code(str(HERE / "sockrepair" / "engine" / "_cdefs.py"))
        super().run()


setup(cmdclass={"build_py": BuildPyWithFFI})
