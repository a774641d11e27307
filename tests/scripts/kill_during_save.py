"""Run `speedrun train` and SIGKILL the process half-way through writing its Nth checkpoint (after
the weights file is written, before the checkpoint is renamed into place)."""

import os
import signal
import sys

from speedrun import checkpoint
from speedrun.cli import main

KILL_ON = int(os.environ["SPEEDRUN_TEST_KILL_ON_SAVE"])
calls = 0
original = checkpoint.save_model


def save_model(*args, **kwargs):
    global calls
    calls += 1
    original(*args, **kwargs)
    if calls == KILL_ON:
        os.kill(os.getpid(), signal.SIGKILL)


checkpoint.save_model = save_model
sys.exit(main(sys.argv[1:]))
