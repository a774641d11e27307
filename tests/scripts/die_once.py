"""Run `speedrun train` under torchrun, but make one rank SIGKILL itself in the middle of the first
attempt, as a crashed GPU or a killed process would. torchrun's restart then resumes the job."""

import os
import signal
import sys

from speedrun import train
from speedrun.cli import main

DIE_AT = int(os.environ["SPEEDRUN_TEST_DIE_AT_STEP"])
DIE_RANK = int(os.environ.get("SPEEDRUN_TEST_DIE_RANK", "1"))
first_attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0
original = train.Trainer.train_step


def train_step(self, step):
    if first_attempt and step == DIE_AT and self.rt.rank == DIE_RANK:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, step)


train.Trainer.train_step = train_step
sys.exit(main(sys.argv[1:]))
