"""A run survives its machine: stop signals, a second signal while saving, a damaged newest
checkpoint, a torchrun worker killed mid-run, a signal to the torchrun launcher, experiments.py
stopped and started again.

Real processes and real signals, on the CPU. Training runs go through stop_run.py (float64, a
checkpoint every step; float64_run.py says why), which stops them at a chosen point; the
uninterrupted runs they are compared with run once per module, in this process.
"""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import experiments
import float64_run
import util
from test_distributed import TORCHRUN, assert_same_tensors, in_process, load

ROOT = Path(__file__).resolve().parents[1]
TASKS = ['--num_way', '3', '--num_support', '1', '--num_query', '2', '--batch_size', '2']
STEPS = 5
SCRIPTS = {'protonet.py': [], 'maml.py': ['--learn_inner_lrs']}  # MAML second order


def train_flags(script, log_dir, *extra):
    return [*TASKS, *SCRIPTS[script], '--num_train_iterations', str(STEPS),
            '--log_dir', str(log_dir), *extra]


def start(script, log_dir, *extra, command=(sys.executable, 'tests/stop_run.py'), **env):
    """stop_run.py training script in log_dir, as a process whose output is piped."""
    return subprocess.Popen([*command, script, *train_flags(script, log_dir, *extra)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS='1', **env))


def finish(process, timeout=300):
    """(exit status, stdout, stderr) of a process once it ends."""
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def resume(script, log_dir):
    """--resume in this process, to the end of the run; returns its printed lines."""
    return in_process(float64_run.run, script, train_flags(script, log_dir, '--resume'))


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    """script -> the log dir of its uninterrupted STEPS-step float64 run (once per module),
    made with --resume in an empty log dir; printed[script] its lines."""
    cache, printed = {}, {}

    def get(script):
        if script not in cache:
            cache[script] = tmp_path_factory.mktemp(script.removesuffix('.py'))
            printed[script] = resume(script, cache[script])
        return cache[script]
    get.printed = printed
    return get


def assert_same_checkpoints(log_dir, reference, steps):
    for step in steps:
        assert_same_tensors(load(log_dir / f'state{step}.pt'),
                            load(reference / f'state{step}.pt'), f'state{step}')


@pytest.mark.parametrize('script, signame', [('protonet.py', 'SIGTERM'), ('maml.py', 'SIGTERM'),
                                             ('protonet.py', 'SIGUSR1')])
def test_a_signal_saves_its_step_and_resume_ends_as_an_uninterrupted_run(
        tmp_path, uninterrupted, script, signame):
    step = random.Random(signame + script).randrange(1, STEPS - 1)
    status, out, err = finish(start(script, tmp_path, SIGNAL=signame, SIGNAL_STEP=str(step)))
    signum = signal.Signals[signame]
    assert status == 128 + signum, err
    assert err.splitlines()[-1] == (
        f'Stopped by {signame} after iteration {step}, saved in {tmp_path}/state{step}.pt; '
        f'continue with: python {ROOT / script} {" ".join(train_flags(script, tmp_path))} '
        '--resume')  # sys.argv[0] as float64_run sets it
    assert sorted(p.name for p in tmp_path.glob('state*')) == [f'state{s}.pt'
                                                               for s in range(step + 1)]
    assert load(tmp_path / f'state{step}.pt')['step'] == step
    printed = resume(script, tmp_path)
    assert f'Loaded checkpoint iteration {step}.\nStarting training at iteration {step + 1}.' \
        in printed
    assert_same_checkpoints(tmp_path, uninterrupted(script), range(STEPS))


def saving(process, step):
    """Waits until process prints 'Saving {step}' (stop_run.py's SLOW_SAVE)."""
    for line in process.stdout:
        if line.strip() == f'Saving {step}':
            return
    pytest.fail(f'the run ended before saving step {step}: {process.stderr.read()}')


def test_a_second_sigint_while_saving_ends_the_run_with_no_partial_file(tmp_path):
    process = start('protonet.py', tmp_path, SLOW_SAVE='2')
    saving(process, 2)
    process.send_signal(signal.SIGINT)  # the first: save this step, then stop
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)  # the second, while that save writes: stop now
    status, _, err = finish(process)
    assert status == 130, err
    assert err.splitlines()[-1] == 'Interrupted; the last checkpoint written is intact.'
    assert sorted(p.name for p in tmp_path.iterdir() if 'state' in p.name or 'tmp' in p.name) \
        == ['state0.pt', 'state1.pt']
    assert load(tmp_path / 'state1.pt')['step'] == 1


def test_resume_passes_over_a_killed_save_and_a_damaged_checkpoint(tmp_path, uninterrupted,
                                                                   capsys):
    """SIGKILL in the middle of step 3's save leaves its temp file; then the newest checkpoint
    (step 2) is cut short, as by a full disk. --resume takes step 1 and ends as the
    uninterrupted run; --checkpoint_step 2 is one line."""
    process = start('protonet.py', tmp_path, SLOW_SAVE='3')
    saving(process, 3)
    process.kill()
    assert finish(process)[0] == -signal.SIGKILL
    assert len(list(tmp_path.glob('.tmp_*'))) == 1 and not (tmp_path / 'state3.pt').exists()
    damaged = tmp_path / 'state2.pt'
    damaged.write_bytes(damaged.read_bytes()[:damaged.stat().st_size // 2])
    capsys.readouterr()
    with pytest.raises(SystemExit) as explicit:
        in_process(float64_run.run, 'protonet.py',
                   train_flags('protonet.py', tmp_path, '--checkpoint_step', '2'))
    assert explicit.value.code == 2
    assert capsys.readouterr().err == (f'error: checkpoint {damaged} is corrupt or unreadable '
                                       '(RuntimeError); pick another --checkpoint_step, or '
                                       '--resume to take the newest one that loads\n')
    printed = resume('protonet.py', tmp_path)
    assert (f'Checkpoint {damaged} is damaged (RuntimeError); trying the one before it.\n'
            'Loaded checkpoint iteration 1.\n') in printed
    assert_same_checkpoints(tmp_path, uninterrupted('protonet.py'), range(2, STEPS))


def test_resume_without_a_checkpoint_starts_fresh_and_says_so(uninterrupted):
    log_dir = uninterrupted('protonet.py')
    assert uninterrupted.printed['protonet.py'].startswith(
        f'log_dir: {log_dir}\nNo checkpoint in {log_dir} to resume from; starting fresh.\n'
        'Starting training at iteration 0.\n')


def test_torchrun_restarts_a_group_whose_worker_was_killed_and_ends_as_one_process(
        tmp_path, uninterrupted):
    """Two gloo processes; rank 1 is SIGKILLed in step 2 of torchrun's first attempt (after
    checkpoints 0 and 1); --max-restarts=1 starts both again, and they --resume. (Without
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 the restarted processes can read the dead ones'
    addresses from the store torchrun keeps across attempts, and fail to connect.) Three
    steps: beyond them the biases that batch norm cancels drift past 1e-9 between 1 and 2
    processes, restarted or not (Adam scales their ~1e-17 gradients up; float64_run.py)."""
    process = start('protonet.py', tmp_path, '--resume', '--num_train_iterations', '3',
                    command=(*TORCHRUN, '--max-restarts=1', 'tests/stop_run.py'),
                    SIGNAL='SIGKILL', SIGNAL_STEP='2', SIGNAL_RANK='1',
                    TORCH_DISABLE_SHARE_RDZV_TCP_STORE='1')
    status, out, err = finish(process)
    assert status == 0, err[-3000:]
    assert 'Starting training at iteration 0.' in out  # the first attempt
    # the second: rank 0 saved step 1 before rank 1 passed step 1's stop check
    assert 'Loaded checkpoint iteration 1.\nStarting training at iteration 2.\n' in out
    assert_same_checkpoints(tmp_path, uninterrupted('protonet.py'), [2])


def test_experiments_stopped_by_sigterm_and_started_again_does_no_finished_work_twice(tmp_path):
    """experiments.py passes the signal on to the run under way and exits 143; started again,
    it leaves every file of the runs already done as it was and finishes the rest."""
    command = [sys.executable, 'experiments.py', '--scale', 'tiny', '--log_root', str(tmp_path),
               '--only', 'protonet_5shot', 'fomaml_5shot_seed_1']  # trained and tested, trained
    env = dict(os.environ, OMP_NUM_THREADS='1')
    first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env=env)
    console = tmp_path / 'fomaml_5shot_seed_1' / 'console.log'  # the first run is done
    while first.poll() is None and not (console.is_file() and '$ ' in console.read_text()):
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 143, stderr
    assert 'Stopped by SIGTERM in fomaml_5shot_seed_1' in stderr, stderr
    done = {path: path.stat().st_mtime_ns for path in (tmp_path / 'protonet_5shot').iterdir()}
    assert any(path.name.startswith('test.') for path in done)  # trained and tested
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert {path: path.stat().st_mtime_ns for path in (tmp_path / 'protonet_5shot').iterdir()
            } == done
    listed = subprocess.run([*command, '--list'], cwd=ROOT, capture_output=True, text=True,
                            env=env).stdout
    assert 'fomaml_5shot_seed_1' in listed, listed
    assert 'stopped' not in listed and 'to do' not in listed, listed


def test_a_signal_as_experiments_logs_a_command_stops_it_before_the_command_starts(
        tmp_path, monkeypatch):
    """The window a busy machine once hit: SIGTERM just as the command line goes to
    console.log, before the command exists. It is caught (not the default exit by the
    signal), the command never starts, and the run stops as after any signal."""
    plan = experiments.Plan.of(experiments.BY_NAME['protonet_5shot'], 'tiny', tmp_path)
    job = experiments.Job(plan, [], 'train', 1, lambda: 0)
    started = []
    monkeypatch.setattr(experiments.shlex, 'join', lambda words: os.kill(os.getpid(),
                                                                        signal.SIGTERM) or '')
    monkeypatch.setattr(experiments.subprocess, 'Popen', lambda *args, **kwargs: started.append(1))
    with pytest.raises(util.Stopped, match='Stopped by SIGTERM in protonet_5shot'):
        job.execute([], 'train')
    assert not started and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_torchrun_passes_a_signal_on_and_its_processes_stop_after_the_same_step(
        tmp_path, uninterrupted):
    """Slurm's SIGUSR1 reaches the launcher (`torchrun --signals-to-handle=...,SIGUSR1`; here
    rank 0 sends it to its parent in step 1): torchrun sends it to both processes, which stop
    after the same step, rank 0 saving it and printing once how to continue. The step is the
    one the signal reached them in (1, or later on a busy machine); --resume with one process
    then ends the run.
    Checkpoints are compared up to step 2 (past three steps, test_torchrun_restarts... says
    why)."""
    process = start('protonet.py', tmp_path,
                    command=(*TORCHRUN, '--signals-to-handle=SIGTERM,SIGINT,SIGUSR1',
                             'tests/stop_run.py'),
                    SIGNAL='SIGUSR1', SIGNAL_STEP='1', SIGNAL_LAUNCHER='1')
    status, _, err = finish(process)
    assert status != 0, err[-3000:]  # torchrun itself ends by the signal
    stopped = [line for line in err.splitlines() if line.startswith('Stopped by ')]
    assert len(stopped) == 1, err[-3000:]
    step = int(stopped[0].split()[5].rstrip(','))
    assert 1 <= step < STEPS - 1 and stopped[0] == (
        f'Stopped by SIGUSR1 after iteration {step}, saved in {tmp_path}/state{step}.pt; '
        f'continue with: torchrun --nproc_per_node=2 {ROOT / "protonet.py"} '
        f'{" ".join(train_flags("protonet.py", tmp_path))} --resume')
    assert sorted(p.name for p in tmp_path.glob('state*')) == [f'state{s}.pt'
                                                               for s in range(step + 1)]
    printed = resume('protonet.py', tmp_path)
    assert f'Loaded checkpoint iteration {step}.\nStarting training at iteration {step + 1}.' \
        in printed
    assert_same_checkpoints(tmp_path, uninterrupted('protonet.py'), range(3))
    assert (tmp_path / f'state{STEPS - 1}.pt').is_file()
