"""float64_run.py's run (float64, a checkpoint every step), made to be stopped at a known point
for tests/test_preemption.py; the environment says where:

    SIGNAL=NAME SIGNAL_STEP=N [SIGNAL_RANK=R] [SIGNAL_LAUNCHER=1]   this process sends itself
        (or, with SIGNAL_LAUNCHER, its parent: the torchrun that started it) signal NAME in the
        middle of step N (before its optimizer step), if its RANK is R (default 0), and only in
        torchrun's first attempt (TORCHELASTIC_RESTART_COUNT), so a restart runs through
    SLOW_SAVE=N   the checkpoint of step N is written half, then 'Saving N' is printed and the
        process waits a minute before writing the rest: a test's signals land inside the save

    python tests/stop_run.py protonet.py FLAGS...
"""
import io
import os
import signal
import sys
import time

import torch

import float64_run
import training

SLOW_SAVE_SECONDS = 60


def signal_in_step(train_step):
    """train_step, which in step SIGNAL_STEP first sends this process (or its launcher)
    SIGNAL."""
    signum = signal.Signals[os.environ['SIGNAL']]
    when = (int(os.environ['SIGNAL_STEP']), os.environ.get('SIGNAL_RANK', '0'), '0')
    target = os.getppid() if os.environ.get('SIGNAL_LAUNCHER') else os.getpid()

    def step(self, task_batch, number):
        if (number, os.environ.get('RANK', '0'),
                os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')) == when:
            os.kill(target, signum)
        return train_step(self, task_batch, number)
    return step


def slow_save_of(step, save):
    """MetaLearner._save, which writes the checkpoint of step in two halves a minute apart."""
    def slow_torch_save(obj, file):
        data = io.BytesIO()
        real_save(obj, data)
        file.write(data.getvalue()[:len(data.getvalue()) // 2])
        file.flush()
        print(f'Saving {step}', flush=True)
        time.sleep(SLOW_SAVE_SECONDS)
        file.write(data.getvalue()[len(data.getvalue()) // 2:])

    def slow(self, checkpoint_step, loader_states=None):
        if checkpoint_step != step:
            return save(self, checkpoint_step, loader_states)
        torch.save = slow_torch_save
        try:
            return save(self, checkpoint_step, loader_states)
        finally:
            torch.save = real_save
    real_save = torch.save
    return slow


if __name__ == '__main__':
    if 'SIGNAL' in os.environ:
        training.MetaLearner._train_step = signal_in_step(training.MetaLearner._train_step)
    if 'SLOW_SAVE' in os.environ:
        training.MetaLearner._save = slow_save_of(int(os.environ['SLOW_SAVE']),
                                                  training.MetaLearner._save)
    float64_run.run(sys.argv[1], sys.argv[2:])
