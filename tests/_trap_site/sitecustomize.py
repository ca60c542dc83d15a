"""Started with BLIP_DEVICE_TRAP=1 and this folder on PYTHONPATH (tests/conftest.py `launch` does both), a script's
process runs under tests/_device_trap.ImplicitDeviceTrap from its first line: torchrun ranks and the entry scripts
are guarded as the in-process tests are."""
import os
import sys

if os.environ.get("BLIP_DEVICE_TRAP") == "1":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from _device_trap import ImplicitDeviceTrap

    ImplicitDeviceTrap().__enter__()
    sys.path.pop(0)
