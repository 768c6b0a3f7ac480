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
import json
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import training
import util

ROOT = Path(__file__).resolve().parent
K_SWEEP = (1, 2, 4, 6, 8, 10)  # support examples per class at test time, Q = 10 (part 3)
ONE_SHOT_TEST = ((1, 15),)  # (support, query) of the 5-way 1-shot test tasks (parts 1 and 2)
SWEEP_TESTS = ONE_SHOT_TEST + tuple((shot, 10) for shot in K_SWEEP)
# The second handout's stability comparison (extra credit), in its own setting: its first-order
# MAML (Problem 1: 5-way 5-shot, 5 inner steps at inner lr 0.4, 15 queries, 1000 iterations)
# against MAML++ with the same flags and seeds (the inner lr is maml.py's default, 0.4). Seed 0
# of each is that method's run of the second handout.
STABILITY_SETTING = ('--num_support', '5', '--num_inner_steps', '5')
STABILITY_METHODS = {'fomaml': ('--first_order',), 'mamlpp': ('--mamlpp',)}
STABILITY_SEEDS = (0, 1, 2)
STABILITY_ITERATIONS = 1001  # the handout's 1000 iterations, and a checkpoint at step 1000
TINY = {'iterations': 1, 'batch_size': 1, 'test_tasks': 4}  # --scale tiny: one of everything
# Flags that say where and how fast a run goes, not what it computes.
PLACEMENT_FLAGS = ('log_dir', 'checkpoint_step', 'resume', 'test', 'device', 'amp', 'num_workers',
                   'cache', 'compile', 'backend', 'num_test_tasks', 'datadir', 'tasks')


@dataclasses.dataclass(frozen=True)
class Run:
    name: str  # its log dir under --log_root
    script: str
    flags: tuple  # the handout's flags, as a student types them
    iterations: int  # the full length
    tests: tuple = ()  # (num_support, num_query) of each --test at the last checkpoint

    @property
    def save_interval(self):
        """The script's steps between checkpoints: its own SAVE_INTERVAL (run_metabolism.py's,
        as run_bio.sh's run saves), else the shared loop's."""
        return getattr(script_module(self.script), 'SAVE_INTERVAL', training.SAVE_INTERVAL)

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


def latest_checkpoint(log_dir):
    """The step of the newest state{step}.pt in log_dir, or -1."""
    return max(training.checkpoint_steps(log_dir), default=-1)


def stability_name(method, seed):
    """The log dir name of one run of the stability comparison: seed 0 is the method's own
    5-shot run ({method}_5shot), the others {method}_5shot_seed_{seed}."""
    return f'{method}_5shot' + (f'_seed_{seed}' if seed else '')


def stability_run(method, seed):
    """A run of the comparison; seed 0's is also tested, as the second handout asks."""
    return Run(stability_name(method, seed), 'maml.py',
               STABILITY_METHODS[method] + STABILITY_SETTING + (('--seed', str(seed)) if seed else ()),
               STABILITY_ITERATIONS, () if seed else ((5, 15),))


def run_bio_command():
    """(flags, iterations) of the assignment's metabolism command, read from run_bio.sh, their one
    spelling: its run_metabolism.py flags but the placement ones (--datadir, --device), and its
    --num_train_iterations."""
    script = (ROOT / 'run_bio.sh').read_text().replace('\\\n', ' ')
    line = next(line for line in script.splitlines() if line.startswith('exec '))
    tokens = shlex.split(line)
    tokens = tokens[next(i for i, token in enumerate(tokens)
                         if token.endswith('run_metabolism.py')) + 1:]
    flags = dict(zip(tokens[::2], tokens[1::2]))
    iterations = int(flags.pop('--num_train_iterations'))
    kept = [(flag, value) for flag, value in flags.items()
            if flag.removeprefix('--') not in PLACEMENT_FLAGS]
    return tuple(token for pair in kept for token in pair), iterations


RUNS = (
    # First handout, part 1: ProtoNet
    Run('protonet_5shot', 'protonet.py', ('--num_support', '5'), 5000, ONE_SHOT_TEST),
    Run('protonet_1shot', 'protonet.py', ('--num_support', '1'), 5000, SWEEP_TESTS),
    # Part 2: MAML
    Run('maml_inner_lr_0.4', 'maml.py', (), 15000, ONE_SHOT_TEST),
    Run('maml_inner_lr_0.04', 'maml.py', ('--inner_lr', '0.04'), 15000, ONE_SHOT_TEST),
    Run('maml_inner_lr_0.04_5_steps', 'maml.py', ('--inner_lr', '0.04', '--num_inner_steps', '5'),
        15000, ONE_SHOT_TEST),
    Run('maml_learned_inner_lrs', 'maml.py', ('--learn_inner_lrs',), 15000, SWEEP_TESTS),
    # Part 4: ProtoNet on TDC Metabolism, run_bio.sh's command
    Run('metabolism', 'run_metabolism.py', *run_bio_command(), ((5, 10),)),
    # Second handout: first-order MAML (1000 iterations), MAML++, the transfer baseline
    *(stability_run(method, 0) for method in STABILITY_METHODS),
    Run('transfer_5shot', 'maml_transfer.py', (), 5000, ((5, 15),)),
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

    @classmethod
    def of(cls, run, scale, log_root, datadir=None):
        flags = list(run.flags)
        if datadir and run.script == 'run_metabolism.py':
            flags += ['--datadir', datadir]
        test_tasks = training.NUM_TEST_TASKS
        if scale == 'tiny':
            iterations, test_tasks = TINY['iterations'], TINY['test_tasks']
            flags += ['--batch_size', str(TINY['batch_size'])]
        elif scale == 'full':
            iterations = run.iterations
        else:
            iterations = max(1, round(run.iterations * scale))
        flags += ['--num_train_iterations', str(iterations)]
        return cls(run, Path(log_root) / run.name, iterations, flags, test_tasks)

    @property
    def last_checkpoint(self):
        return self.run.last_checkpoint(self.iterations)

    def args(self, extra=()):
        """The script's parsed flags for these flags plus extra."""
        return script_module(self.run.script).parse_args(
            [*self.flags, '--log_dir', str(self.log_dir), *extra])

    def test_flags(self, shot, query):
        return ['--test', '--checkpoint_step', str(self.last_checkpoint), '--num_support',
                str(shot), '--num_query', str(query), '--num_test_tasks', str(self.test_tasks)]

    def test_result(self, shot, query):
        """Where the --test result JSON of (shot, query) goes."""
        return Path(training.test_result_path(self.args(self.test_flags(shot, query)),
                                              self.log_dir))

    def trained(self):
        return self.run.reached(self.log_dir, self.iterations) == self.iterations

    def tests_to_do(self):
        return [test for test in self.run.tests if not self.test_result(*test).is_file()]

    def check_made_alike(self):
        """A log dir made with other flags (another scale) is never trained on or overwritten."""
        record = self.log_dir / training.FLAGS_FILE
        if not record.is_file():
            return
        made = json.loads(record.read_text())['flags']
        wanted = vars(self.args())
        differ = [f'--{key} {made.get(key)} (this scale: {value})' for key, value in wanted.items()
                  if key not in PLACEMENT_FLAGS and made.get(key) != value]
        if differ:
            raise util.UserError(f'{self.log_dir} holds a run made with {", ".join(differ)}; '
                                 'pass another --log_root (or --scale), or move that log dir away')

    def state(self):
        if self.trained():
            to_do = len(self.tests_to_do())
            return f'trained; {to_do} of {len(self.run.tests)} tests to do' if to_do else 'done'
        latest = latest_checkpoint(self.log_dir)
        if latest >= 0:
            return f'stopped at checkpoint {latest} of {self.last_checkpoint}'
        return 'to do'


def script_module(script):
    """The module of a script, for its parse_args (imported when needed: run_metabolism's
    imports are heavier)."""
    import importlib
    return importlib.import_module(script.removesuffix('.py'))


class Job:
    """One subprocess: a training (or resumed training) run, or one --test."""

    def __init__(self, plan, extra, label, total):
        self.plan, self.extra, self.label, self.total = plan, extra, label, total

    def command(self, passthrough):
        return [sys.executable, str(ROOT / self.plan.run.script), *self.plan.flags,
                '--log_dir', str(self.plan.log_dir), *self.extra, *passthrough]

    def execute(self, passthrough, description):
        """Runs the command, its output appended to the run's console.log a line at a time (so
        that `tail -f` follows it); a tqdm bar follows the printed iterations. A stop signal
        goes on to the command (in a process group of its own, so that a terminal's Ctrl-C
        reaches it once), which saves and stops; then this stops too (util.Stopped)."""
        from tqdm import tqdm
        command = self.command(passthrough)
        self.plan.log_dir.mkdir(parents=True, exist_ok=True)
        console = self.plan.log_dir / 'console.log'
        signals = []  # those passed on

        def pass_on(signum):
            process.send_signal(signum)
            signals.append(signum)
        with open(console, 'a', buffering=1) as log, \
                tqdm(total=self.total, desc=description, unit='it', leave=True) as bar, \
                subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, process_group=0,
                                 stderr=subprocess.STDOUT, text=True) as process, \
                util.on_stop_signals(pass_on):
            log.write(f'$ {shlex.join(command[1:])}\n')
            last = ''
            for line in process.stdout:
                log.write(line)
                last = line.strip() or last
                if line.startswith('Iteration '):
                    bar.update(int(line.split()[1].rstrip(':')) + 1 - bar.n)
                elif line.startswith('Accuracy over'):
                    bar.update(self.total - bar.n)
        if signals:
            raise util.Stopped(f'Stopped by {signal.Signals(signals[0]).name} in '
                               f'{self.plan.run.name}, its work saved; run the same command '
                               'again to continue', signals[0])
        if process.returncode:
            raise util.UserError(f'{self.plan.run.name} failed ({last}); its output is in '
                                 f'{console}. Fix the cause and run again: finished work is kept')


def jobs(plan):
    """The subprocesses that finish a run: training from its latest checkpoint, then tests."""
    plan.check_made_alike()
    work = []
    if not plan.trained():
        start = latest_checkpoint(plan.log_dir)
        work.append(Job(plan, ['--resume'],
                        'train' if start < 0 else f'resume at {start + 1}', plan.iterations))
    for shot, query in plan.run.tests:
        if not plan.test_result(shot, query).is_file():
            work.append(Job(plan, plan.test_flags(shot, query), f'test K={shot} Q={query}', 1))
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
                             'six runs), or a prefix such as maml for every run named maml_...')
    parser.add_argument('--list', action='store_true', help='print the runs and their state')
    parser.add_argument('--datadir', default=None,
                        help="passed on to run_metabolism.py (default: its own, ./data/metabolism)")
    parser.add_argument('--device', default='cpu', help="passed on: 'cpu' or 'gpu'")
    parser.add_argument('--amp', default='none', choices=training.AMP_CHOICES, help='passed on')
    return parser.parse_args(argv)


if __name__ == '__main__':
    util.cli(lambda: main(parse_args()))
