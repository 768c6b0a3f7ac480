"""Every experiment of both handouts in one command, then `python report.py` for the report.

    python experiments.py                  # full length, as the handouts ask (GPU hours)
    python experiments.py --scale tiny     # the same list with tiny budgets (minutes on a CPU)
    python experiments.py --scale 0.1      # every run at a tenth of its length
    python experiments.py --list           # the runs and how far each is
    python experiments.py --only protonet_1shot maml_learned_inner_lrs   # some of them
    python experiments.py --only stability # FO-MAML vs MAML++ over 3 seeds (extra credit)

Each run is the script a student would run (protonet.py, maml.py, run_metabolism.py,
maml_transfer.py) with the handout's flags, in its own log dir `{log_root}/{name}`, followed by
its `--test` evaluations at its last checkpoint (for the 1-shot ProtoNet and learned-lr MAML,
the K sweep too). A run whose last checkpoint is saved is not trained again, a stopped one
resumes from its latest checkpoint (--resume), and a test whose result JSON exists is not
repeated, so the command can be stopped and started again: SIGTERM, SIGINT (Ctrl-C) or SIGUSR1
goes on to the run in progress, which saves a checkpoint of its step and stops. Each run's
printed output is kept in its log dir as console.log.
"""
import argparse
import dataclasses
import functools
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import training
import util

ROOT = Path(__file__).resolve().parent
K_SWEEP = (1, 2, 4, 6, 8, 10)  # support examples per class at test time (part 3)
ONE_SHOT_TEST = ((1, 15),)  # (support, query) of the 5-way 1-shot test tasks (parts 1 and 2)
SWEEP_QUERY = 10  # queries per class of the K sweep's test tasks
SWEEP_TESTS = ONE_SHOT_TEST + tuple((shot, SWEEP_QUERY) for shot in K_SWEEP)
# The second handout's stability comparison (extra credit), in its own setting: its first-order
# MAML (Problem 1: 5-way 5-shot, 5 inner steps at inner lr 0.4, 15 queries, 1000 iterations)
# against MAML++ with the same flags and seeds (the inner lr is maml.py's default, 0.4). Seed 0
# of each is that method's run of the second handout.
STABILITY_SETTING = ('--num_support', '5', '--num_inner_steps', '5')
STABILITY_METHODS = {'fomaml': ('--first_order',), 'mamlpp': ('--mamlpp',)}
STABILITY_SEEDS = (0, 1, 2)
STABILITY_ITERATIONS = 1001  # the handout's 1000 iterations, and a checkpoint at step 1000
# run_bio.sh's run_metabolism.py flags, but the placement ones (--datadir, --device) and
# --num_train_iterations (run_metabolism.py's default, 8000); tests/test_one_spelling.py holds
# run_bio.sh to them
METABOLISM_FLAGS = ('--num_way', '2', '--num_support', '5', '--num_query', '10',
                    '--batch_size', '4', '--learning_rate', '0.0005')
TINY = {'iterations': 1, 'batch_size': 1, 'test_tasks': 4}  # --scale tiny: one of everything


def script_module(script):
    """The module of a script, for its parse_args."""
    import importlib
    return importlib.import_module(script.removesuffix('.py'))


def parsed(script, flags=()):
    """The script's flags as it parses them, its defaults included (argparse.Namespace)."""
    return script_module(script).parse_args(list(flags))


@dataclasses.dataclass(frozen=True)
class Run:
    name: str  # its log dir under --log_root
    script: str
    flags: tuple  # the handout's flags, as a student types them
    iterations: int  # the full length
    tests: tuple = ()  # (num_support, num_query) of each --test at the last checkpoint
    checkpoint_interval: int = None  # the script's steps between checkpoints; None: the loop's

    @classmethod
    def of(cls, name, script, flags, tests=(), iterations=None, checkpoint_interval=None):
        """A run whose full length is iterations, or else the script's default."""
        return cls(name, script, flags, iterations or parsed(script, flags).num_train_iterations,
                   tests, checkpoint_interval)

    @property
    def save_interval(self):
        return self.checkpoint_interval or training.SAVE_INTERVAL

    def last_checkpoint(self, iterations):
        """The step of the last checkpoint a run of that many iterations saves."""
        return (iterations - 1) // self.save_interval * self.save_interval

    def reached(self, log_dir, iterations):
        """How far a run asked for that many iterations got in log_dir, in iterations: all of
        them once it saved its last checkpoint (it is finished), else its latest checkpoint's
        step + 1 (what a resume keeps), 0 before its first checkpoint. experiments.py resumes
        and report.py reports by this one measure."""
        latest = latest_checkpoint(log_dir)
        return iterations if latest >= self.last_checkpoint(iterations) else latest + 1

    def test_flags(self, iterations, shot, query):
        """The --test flags of (shot, query) at the last checkpoint of a run of iterations."""
        return ['--test', '--checkpoint_step', str(self.last_checkpoint(iterations)),
                '--num_support', str(shot), '--num_query', str(query)]

    def test_result(self, log_dir, iterations, shot, query):
        """Where that --test writes its result JSON (training.test_result_path)."""
        args = parsed(self.script, [*self.flags, *self.test_flags(iterations, shot, query)])
        return Path(training.test_result_path(args, log_dir))


def latest_checkpoint(log_dir):
    """The step of the newest state{step}.pt in log_dir, or -1."""
    return max(training.checkpoint_steps(log_dir), default=-1)


def protonet_run(shots, tests):
    """The first handout's part 1: a ProtoNet trained 5-way shots-shot."""
    return Run.of(f'protonet_{shots}shot', 'protonet.py', ('--num_support', str(shots)), tests)


def maml_run(flags, tests=ONE_SHOT_TEST):
    """The first handout's part 2, named after its inner loop as maml.py parses the flags (its
    defaults included): maml_learned_inner_lrs, or maml_inner_lr_{lr}[_{L}_steps]."""
    args = parsed('maml.py', flags)
    steps = f'_{args.num_inner_steps}_steps' if args.num_inner_steps > 1 else ''
    name = 'maml_learned_inner_lrs' if args.learn_inner_lrs else f'maml_inner_lr_{args.inner_lr}'
    return Run.of(name + steps, 'maml.py', flags, tests)


def stability_name(method, seed):
    """The log dir name of one run of the stability comparison: seed 0 is the method's own
    {method}_{K}shot run, the others {method}_{K}shot_seed_{seed}."""
    shots = parsed('maml.py', STABILITY_SETTING).num_support
    return f'{method}_{shots}shot' + (f'_seed_{seed}' if seed else '')


def stability_run(method, seed):
    """A run of the comparison, tested on its training shape as the second handout asks; each
    seed's test tasks are its own, the same for both methods."""
    flags = STABILITY_METHODS[method] + STABILITY_SETTING + (('--seed', str(seed)) if seed else ())
    args = parsed('maml.py', flags)
    return Run.of(stability_name(method, seed), 'maml.py', flags,
                  ((args.num_support, args.num_query),), STABILITY_ITERATIONS)


def shaped_run(name, script, flags=(), checkpoint_interval=None):
    """A run tested once, on tasks of its own training shape (the script's defaults where its
    flags leave them)."""
    args = parsed(script, flags)
    return Run.of(name, script, flags, ((args.num_support, args.num_query),),
                  checkpoint_interval=checkpoint_interval)


def metabolism_run():
    """The first handout's part 4, run_bio.sh's command (run_metabolism.py saves every
    run_metabolism.SAVE_INTERVAL steps)."""
    return shaped_run('metabolism', 'run_metabolism.py', METABOLISM_FLAGS,
                      script_module('run_metabolism.py').SAVE_INTERVAL)


def transfer_run():
    """The second handout's transfer baseline, at maml_transfer.py's defaults (5-way 5-shot)."""
    return shaped_run(f'transfer_{parsed("maml_transfer.py").num_support}shot',
                      'maml_transfer.py')


# Every run, by the names report.py uses: each name is spelled once, here or in its function.
PROTONET_5SHOT = protonet_run(5, ONE_SHOT_TEST)
PROTONET_1SHOT = protonet_run(1, SWEEP_TESTS)
MAML_DEFAULT_LR = maml_run(())
MAML_SMALL_LR = maml_run(('--inner_lr', '0.04'))
MAML_SMALL_LR_5_STEPS = maml_run(('--inner_lr', '0.04', '--num_inner_steps', '5'))
MAML_LEARNED_LRS = maml_run(('--learn_inner_lrs',), SWEEP_TESTS)
METABOLISM = metabolism_run()
FOMAML, MAMLPP = (stability_run(method, 0) for method in STABILITY_METHODS)
TRANSFER = transfer_run()
RUNS = (
    PROTONET_5SHOT, PROTONET_1SHOT,  # first handout, part 1: ProtoNet
    MAML_DEFAULT_LR, MAML_SMALL_LR, MAML_SMALL_LR_5_STEPS, MAML_LEARNED_LRS,  # part 2: MAML
    METABOLISM,  # part 4: ProtoNet on TDC Metabolism
    FOMAML, MAMLPP, TRANSFER,  # second handout
    *(stability_run(method, seed) for method in STABILITY_METHODS for seed in STABILITY_SEEDS[1:]),
)
BY_NAME = {run.name: run for run in RUNS}
STABILITY_RUNS = tuple(stability_name(method, seed)
                       for method in STABILITY_METHODS for seed in STABILITY_SEEDS)
GROUPS = {'stability': STABILITY_RUNS}  # what --only takes besides the runs' names


def parse_scale(text):
    """'full', 'tiny' or a fraction in (0, 1] of every run's length."""
    if text in ('full', 'tiny'):
        return text
    try:
        fraction = float(text)
    except ValueError:
        fraction = 0
    if not 0 < fraction <= 1:
        raise argparse.ArgumentTypeError(f"--scale must be 'full', 'tiny' or a fraction in "
                                         f"(0, 1], got {text!r}")
    return 'full' if fraction == 1 else fraction


def scale_suffix(scale):
    """'' for full length, else '_tiny' or '_scale_F': what names a scale's log root and report."""
    return {'full': '', 'tiny': '_tiny'}.get(scale, f'_scale_{scale}')


def default_log_root(scale):
    return f'logs/experiments{scale_suffix(scale)}'


@dataclasses.dataclass
class Plan:
    """What a run at a scale is: its training command's flags and its tests'."""
    run: Run
    log_dir: Path
    iterations: int
    flags: list  # the training flags, the run's own then the scale's
    test_tasks: int
    placement: list = dataclasses.field(default_factory=list)  # where the data is: --datadir

    @classmethod
    def of(cls, run, scale, log_root, datadir=None):
        flags = list(run.flags)
        test_tasks = training.NUM_TEST_TASKS
        if scale == 'tiny':
            iterations, test_tasks = TINY['iterations'], TINY['test_tasks']
            flags += ['--batch_size', str(TINY['batch_size'])]
        elif scale == 'full':
            iterations = run.iterations
        else:
            iterations = max(1, round(run.iterations * scale))
        flags += ['--num_train_iterations', str(iterations)]
        placement = ['--datadir', datadir] if datadir and run is METABOLISM else []
        return cls(run, Path(log_root) / run.name, iterations, flags, test_tasks, placement)

    @property
    def last_checkpoint(self):
        return self.run.last_checkpoint(self.iterations)

    def test_flags(self, shot, query):
        return [*self.run.test_flags(self.iterations, shot, query),
                '--num_test_tasks', str(self.test_tasks)]

    def test_result(self, shot, query):
        """Where the --test result JSON of (shot, query) goes."""
        return self.run.test_result(self.log_dir, self.iterations, shot, query)

    def trained(self):
        return self.run.reached(self.log_dir, self.iterations) == self.iterations

    def tests_to_do(self):
        return [test for test in self.run.tests if not self.test_result(*test).is_file()]

    def check_made_alike(self):
        """A log dir made with other training flags (another scale) is never trained on or
        overwritten: its flags.json's command line, up to --log_dir (Job.command), is this
        plan's flags."""
        record = self.log_dir / training.FLAGS_FILE
        if not record.is_file():
            return
        argv = util.read_json(record)['argv']
        made = argv[:argv.index('--log_dir')] if '--log_dir' in argv else argv
        if made != self.flags:
            raise util.UserError(f'{self.log_dir} holds a run made with {shlex.join(made)} '
                                 f'(this scale: {shlex.join(self.flags)}); pass another '
                                 '--log_root (or --scale), or move that log dir away')

    def state(self):
        if self.trained():
            to_do = len(self.tests_to_do())
            return f'trained; {to_do} of {len(self.run.tests)} tests to do' if to_do else 'done'
        latest = latest_checkpoint(self.log_dir)
        if latest >= 0:
            return f'stopped at checkpoint {latest} of {self.last_checkpoint}'
        return 'to do'


class Job:
    """One subprocess: a training (or resumed training) run, or one --test; done() -> how
    much of total its files say is done (the run's checkpoints, the test's result JSON)."""
    POLL_SECONDS = 1.0  # how often the progress bar reads the files

    def __init__(self, plan, extra, label, total, done):
        self.plan, self.extra, self.label, self.total, self.done = plan, extra, label, total, done

    def command(self, passthrough):
        return [sys.executable, str(ROOT / self.plan.run.script), *self.plan.flags,
                '--log_dir', str(self.plan.log_dir), *self.plan.placement, *self.extra,
                *passthrough]

    def execute(self, passthrough, description):
        """Runs the command, its output appended to the run's console.log (unbuffered, so that
        `tail -f` follows it); a tqdm bar follows what its files say is done. A stop signal
        goes on to the command (in a process group of its own, so that a terminal's Ctrl-C
        reaches it once), which saves and stops; then this stops too (util.Stopped)."""
        from tqdm import tqdm
        command = self.command(passthrough)
        self.plan.log_dir.mkdir(parents=True, exist_ok=True)
        console = self.plan.log_dir / 'console.log'
        process, signals = None, []  # the command once started; the signals that came

        def pass_on(signum):
            signals.append(signum)
            if process is not None:
                process.send_signal(signum)
        # The handlers come first: a signal as the command line is logged stops us here.
        with util.on_stop_signals(pass_on), open(console, 'a', buffering=1) as log, \
                tqdm(total=self.total, initial=self.done(), desc=description, unit='it',
                     leave=True) as bar:
            log.write(f'$ {shlex.join(command[1:])}\n')
            if not signals:
                with subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                      process_group=0, env=dict(os.environ, PYTHONUNBUFFERED='1')
                                      ) as process:
                    while not finished(process, self.POLL_SECONDS):
                        advance(bar, self.done())
            advance(bar, self.done())
        if signals:
            raise util.Stopped(f'Stopped by {signal.Signals(signals[0]).name} in '
                               f'{self.plan.run.name}, its work saved; run the same command '
                               'again to continue', signals[0])
        if process.returncode:
            raise util.UserError(f'{self.plan.run.name} failed ({last_line(console)}); its '
                                 f'output is in {console}. Fix the cause and run again: '
                                 'finished work is kept')


def advance(bar, done):
    """Moves bar to done; only when it moved, as tqdm prints a line for every update, even by
    0, into a log that is not a terminal."""
    if done != bar.n:
        bar.update(done - bar.n)


def finished(process, seconds):
    """Whether process ended within seconds."""
    try:
        process.wait(timeout=seconds)
        return True
    except subprocess.TimeoutExpired:
        return False


def last_line(path):
    """The last non-empty line of a text file (what a failed command said last)."""
    lines = [line.strip() for line in Path(path).read_text(errors='replace').splitlines()]
    return next((line for line in reversed(lines) if line), '')


def jobs(plan):
    """The subprocesses that finish a run: training from its latest checkpoint, then tests."""
    plan.check_made_alike()
    work = []
    if not plan.trained():
        start = latest_checkpoint(plan.log_dir)
        work.append(Job(plan, ['--resume'], 'train' if start < 0 else f'resume at {start + 1}',
                        plan.iterations,
                        functools.partial(plan.run.reached, plan.log_dir, plan.iterations)))
    for shot, query in plan.tests_to_do():
        result = plan.test_result(shot, query)
        work.append(Job(plan, plan.test_flags(shot, query), f'test K={shot} Q={query}', 1,
                        lambda result=result: int(result.is_file())))
    return work


def select(names):
    """The runs named: a run's name, a group's (`stability`: its six runs), or else a prefix
    (`maml`: every run named maml_...); all if none."""
    def runs_of(name):
        if name in BY_NAME:
            return [BY_NAME[name]]
        if name in GROUPS:
            return [BY_NAME[member] for member in GROUPS[name]]
        return [run for run in RUNS if run.name.startswith(name + '_')]
    chosen = {name: runs_of(name) for name in names}
    unknown = [name for name, runs in chosen.items() if not runs]
    if unknown:
        raise util.UserError(f'no run named {", ".join(unknown)}; `python experiments.py --list` '
                             'names them')
    return [run for run in RUNS if any(run in runs for runs in chosen.values())] if names \
        else list(RUNS)


def main(args):
    log_root = args.log_root or default_log_root(args.scale)
    plans = [Plan.of(run, args.scale, log_root, args.datadir) for run in select(args.only)]
    if args.list:
        width = max(len(plan.run.name) for plan in plans)
        for plan in plans:
            print(f'{plan.run.name:{width}}  {plan.run.script:18} {plan.iterations:6} iterations  '
                  f'{plan.state()}')
        return
    todo = [job for plan in plans for job in jobs(plan)]
    passthrough = ['--device', args.device, '--amp', args.amp]
    for number, job in enumerate(todo, start=1):
        job.execute(passthrough, f'[{number}/{len(todo)}] {job.plan.run.name}: {job.label}')
    print(f'{len(plans)} runs in {log_root}: ' + ('all done already' if not todo else
                                                  f'{len(todo)} jobs done') +
          f'. Next: python report.py --log_root {log_root}')


def parse_args(argv=None):
    parser = util.argument_parser(description=__doc__.split('\n')[0])
    parser.add_argument('--scale', type=parse_scale, default='full',
                        help="'full' (the handouts' lengths), 'tiny' (a few iterations, for a "
                             "quick check) or a fraction of every run's length")
    parser.add_argument('--log_root', default=None,
                        help='where the runs go (default logs/experiments, or '
                             'logs/experiments_tiny, logs/experiments_scale_F)')
    parser.add_argument('--only', nargs='+', default=[], metavar='NAME',
                        help='run only these (see --list): names, the group stability (its '
                             'six runs), or a prefix such as maml for every run named maml_...; '
                             "they run in --list's order, whatever the order given")
    parser.add_argument('--list', action='store_true', help='print the runs and their state')
    parser.add_argument('--datadir', default=None,
                        help="passed on to run_metabolism.py (default: its own, ./data/metabolism)")
    parser.add_argument('--device', default='cpu', help="passed on: 'cpu' or 'gpu'")
    parser.add_argument('--amp', default='none', choices=training.AMP_CHOICES, help='passed on')
    return parser.parse_args(argv)


if __name__ == '__main__':
    util.cli(lambda: main(parse_args()))
