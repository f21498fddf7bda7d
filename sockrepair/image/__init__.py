"""Connection images: the versioned, checksummed binary format (format.py defines it with construct, _codec.py is the
fast codec held to it), the JSON view (jsonview.py), the text view that `inspect`, `show` and `criu show` share
(text.py), and directories of images (directory.py)."""

from sockrepair.image._codec import decode, encode, find_problem

__all__ = ["decode", "encode", "find_problem"]
