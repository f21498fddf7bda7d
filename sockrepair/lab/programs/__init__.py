"""Plain programs that know nothing of sockrepair, used by the demo and the tests as migration subjects. They are
run as scripts (by path), never imported by the package."""

from pathlib import Path

ECHO_SERVER = Path(__file__).with_name("echo_server.py")
