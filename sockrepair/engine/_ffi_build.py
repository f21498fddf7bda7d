"""Build step: every header in decl/ goes into ONE out-of-line ABI-mode FFI (no compiler, no pycparser at import).

setup.py runs this at build time and writes sockrepair/engine/_cdefs.py, which `sockrepair.engine._ffi` imports. The
headers are package data, so an sdist carries them and a wheel can be built from it."""

from pathlib import Path

from cffi import FFI

DECL = Path(__file__).resolve().parent / "decl"

ffibuilder = FFI()
for header in sorted(DECL.glob("*.h")):
    ffibuilder.cdef(header.read_text(), override=False)
ffibuilder.set_source("sockrepair.engine._cdefs", None)
