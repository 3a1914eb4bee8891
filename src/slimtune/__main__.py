"""`python -m slimtune` is the `slimtune` command.

A process of a torchrun job (WORLD_SIZE > 1) leaves through `os._exit` once its output is flushed: its work is done
and its process group destroyed, but the interpreter's teardown then sometimes races torch's gloo threads and aborts
("terminate called without an active exception", exit -6: seen about once in 15 two-process runs on the CPU, torch
2.11 and 2.13), failing a finished run.
"""
import os
import sys

from slimtune.cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
