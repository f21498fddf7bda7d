"""Build step: every header in cdefs/ goes into ONE out-of-line ABI-mode FFI (no compiler, no pycparser at import).

setup.py runs this and writes sockrepair/_cdefs.py, which `sockrepair._ffi` imports.
"""

from pathlib import Path

from cffi import FFI

CDEFS = Path(__file__).resolve().parent.parent / "cdefs"

ffibuilder = FFI()
for header in sorted(CDEFS.glob("*.h")):
    ffibuilder.cdef(header.read_text(), override=False)
ffibuilder.set_source("sockrepair._cdefs", None)
