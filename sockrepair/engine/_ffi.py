"""The one FFI of the project (declarations from cdefs/, generated at install) and libc opened in ABI mode."""

from __future__ import annotations

from sockrepair.engine._cdefs import ffi

lib = ffi.dlopen(None)

__all__ = ["ffi", "lib"]
