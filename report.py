"""The report of experiments.py's runs: numbered, captioned figures and tables in one REPORT.md.

    python report.py                       # reads logs/experiments, writes report/
    python report.py --scale tiny          # reads logs/experiments_tiny, writes report_tiny/
    python report.py --log_root DIR --out DIR

It reads each run's TensorBoard event files (TensorBoard's EventAccumulator), its flags.json and
its --test result JSONs, and draws every plot the handouts ask for, with labelled lines; the
tables put our test accuracies with their 95% intervals beside the numbers of the two filled-in
reports of the course (CS 330 Autumn 2022 and 2023). How far a run got is experiments.py's measure
(experiments.Run.reached: its latest checkpoint); a run that got less far than the handouts ask
is named as shortened, with the iterations it reached, on every figure and table that uses it.
Runs without a checkpoint yet are left out and listed.
"""
import dataclasses
from pathlib import Path

import numpy as np

import experiments
import maml
import maml_transfer
import protonet
import training
import util

LEARNERS = {'protonet.py': protonet.ProtoNet, 'run_metabolism.py': protonet.ProtoNet,
            'maml.py': maml.MAML, 'maml_transfer.py': maml_transfer.TransferLearner}
VAL_QUERY = {script: training.scalar_tag('val', learner.TEST_METRIC)
             for script, learner in LEARNERS.items()}
VAL_CI95 = training.scalar_tag('val', 'ci95')


def accuracy_metrics(learner):
    """{TensorBoard tag: legend label} of a learner's accuracies on training and validation
    tasks, as training.MetaLearner._log writes them."""
    return {training.scalar_tag(split, key): f'{name} {label.removesuffix(" accuracy")}'
            for split, name in (('train', 'train'), ('val', 'validation'))
            for key, label in learner.METRICS.items() if key != 'loss'}


# The runs' names, experiments.py's (each spelled once, there)
PROTONET_5SHOT, PROTONET_1SHOT = experiments.PROTONET_5SHOT.name, experiments.PROTONET_1SHOT.name
MAML_RUNS = tuple(run.name for run in (experiments.MAML_DEFAULT_LR, experiments.MAML_SMALL_LR,
                                       experiments.MAML_SMALL_LR_5_STEPS,
                                       experiments.MAML_LEARNED_LRS))
MAML_DEFAULT_LR, MAML_SMALL_LR, MAML_SMALL_LR_5_STEPS, MAML_LEARNED_LRS = MAML_RUNS
METABOLISM = experiments.METABOLISM.name
SECOND_HANDOUT_RUNS = FOMAML, MAMLPP, TRANSFER = tuple(
    run.name for run in (experiments.FOMAML, experiments.MAMLPP, experiments.TRANSFER))
ONE_SHOT_TEST, = experiments.ONE_SHOT_TEST  # (support, query) of the 5-way 1-shot test tasks


def inner_lr(run):
    """The inner learning rate a MAML run of experiments.py trains with (maml.py's default where
    its flags leave it)."""
    return experiments.parsed(run.script, run.flags).inner_lr


LR, SMALL_LR = inner_lr(experiments.MAML_DEFAULT_LR), inner_lr(experiments.MAML_SMALL_LR)


PROTONET_METRICS = accuracy_metrics(protonet.ProtoNet)
MAML_METRICS = accuracy_metrics(maml.MAML)
PARTS = {'P1': 'Part 1: Prototypical networks', 'P2': 'Part 2: MAML',
         'P3': 'Part 3: more support data at test time', 'P4': 'Part 4: TDC Metabolism',
         'H2': 'Second handout: first-order MAML, MAML++ and transfer learning',
         'RUNS': 'The runs'}
P1, P2, P3, P4, H2, RUNS = PARTS
FOMAML_BAR = 0.80  # the second handout: at least this validation query accuracy in 1000 steps
# Copied by hand from two students' filled-in reports of the homework (CS 330 Autumn 2022 and
# 2023), as printed there: (mean, 95% interval or None where not given).
REPORTED = {
    'protonet_test': {PROTONET_5SHOT: {'2022': (0.985, 0.002), '2023': (0.983, None)},
                      PROTONET_1SHOT: {'2022': (0.984, 0.002), '2023': (0.985, None)}},
    'k_sweep_2023': {  # Table 2 of the 2023 report: K -> (ProtoNet, MAML with learned lrs)
        1: ((0.985, 0.003), (0.979, 0.003)), 2: ((0.994, 0.001), (0.990, 0.002)),
        4: ((0.995, 0.001), (0.993, 0.001)), 6: ((0.996, 0.001), (0.994, 0.001)),
        8: ((0.996, 0.001), (0.996, 0.002)), 10: ((0.997, 0.001), (0.996, 0.001))},
    'metabolism_val': {'2022': (0.76, 0.004), '2023': (0.720, 0.004)},
}


def events(log_dir):
    """A run's TensorBoard event files, read (TensorBoard's own reader, every point kept)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    accumulator = EventAccumulator(str(log_dir), size_guidance={'scalars': 0})
    accumulator.Reload()
    return accumulator


def scalars(logged, tag):
    """(steps, values) of one scalar of a run's events, sorted by step; a step logged twice (a
    resumed run) keeps its last value; empty where the tag is not logged."""
    if tag not in logged.Tags()['scalars']:
        return [], []
    by_step = {event.step: event.value for event in logged.Scalars(tag)}
    return sorted(by_step), [by_step[step] for step in sorted(by_step)]


def interval(mean, ci95):
    return f'{mean:.3f} ± {ci95:.3f}' if ci95 is not None else f'{mean:.3f}'


class Runs:
    """The runs of one log root as experiments.py made them; `saved` holds those with a
    checkpoint, the ones the report can show."""

    def __init__(self, log_root):
        self.root = Path(log_root)
        self._events = {}  # each run's event files, read once
        self.reached = {run.name: self._reached(run) for run in experiments.RUNS}
        self.saved = {run.name: run for run in experiments.RUNS if self.reached[run.name]}

    def _reached(self, run):
        """The iterations the run reached (experiments.Run.reached), 0 where it never started."""
        log_dir = self.root / run.name
        if not (log_dir / training.FLAGS_FILE).is_file():
            return 0
        return run.reached(log_dir, self.asked(run.name))

    def flags(self, name):
        return util.read_json(self.root / name / training.FLAGS_FILE)

    def asked(self, name):
        """The iterations the run was started for (its --num_train_iterations)."""
        return self.flags(name)['flags']['num_train_iterations']

    def iterations(self, name):
        """'N of M': the iterations the run reached of the handout's."""
        return f'{self.reached[name]} of {self.saved[name].iterations}'

    def shortened(self, name):
        """'' for a full-length run, else ' (shortened: N of M iterations)'."""
        full_length = self.reached[name] >= self.saved[name].iterations
        return '' if full_length else f' (shortened: {self.iterations(name)} iterations)'

    def events(self, name):
        if name not in self._events:
            self._events[name] = events(self.root / name)
        return self._events[name]

    def curve(self, name, tag=None):
        return scalars(self.events(name), tag or VAL_QUERY[self.saved[name].script])

    def test(self, name, shot, query):
        """The result JSON of the --test of (shot, query) that experiments.py runs at the last
        checkpoint of the iterations the run was started for, or None."""
        path = self.saved[name].test_result(self.root / name, self.asked(name), shot, query)
        return util.read_json(path) if path.is_file() else None

    def note(self, names):
        """The sentence every figure and table ends with: which of its runs were shortened."""
        short = [f'{name}, {self.iterations(name)} iterations'
                 for name in names if self.shortened(name)]
        return (' Shortened runs: ' + '; '.join(short) + '.') if short else \
            ' Every run full length.'


@dataclasses.dataclass
class Figure:
    part: str
    slug: str
    title: str
    caption: str
    runs: tuple  # the runs it needs
    draw: object  # (ax, runs) -> None; with panels > 1, (list of axes, runs)
    panels: int = 1  # side by side, one y scale
    also: tuple = ()  # runs it draws too, each once it has a checkpoint (more seeds)


def draw_curves(labels, tag=None):
    """Validation query accuracy (or tag) of several runs, one labelled line each."""
    def draw(ax, runs):
        for name, label in labels.items():
            steps, values = runs.curve(name, tag)
            ax.plot(steps, values, marker='o', markersize=2, label=label + runs.shortened(name))
        ax.set_ylabel('validation query accuracy' if tag is None else tag)
    return draw


def draw_metrics(name, metrics):
    """Several logged metrics of one run."""
    def draw(ax, runs):
        for tag, label in metrics.items():
            steps, values = runs.curve(name, tag)
            ax.plot(steps, values, label=label, linestyle='-' if tag.startswith('val') else ':',
                    marker='o', markersize=2)
        ax.set_ylabel('accuracy')
    return draw


def draw_inner_lrs(name):
    def draw(ax, runs):
        for tag in sorted(tag for tag in runs.events(name).Tags()['scalars']
                          if tag.startswith(f'{maml.INNER_LR_TAG}/')):
            ax.plot(*runs.curve(name, tag), label=tag.removeprefix(f'{maml.INNER_LR_TAG}/'),
                    marker='o', markersize=2)
        ax.set_ylabel('inner learning rate')
    return draw


def draw_k_sweep(ax, runs):
    """Ours (filled, shifted by 0.1 to either side), then Table 2 of the 2023 report beside
    each (open, shifted by 0.25), every point with its 95% interval."""
    for model, (offset, (name, label)) in enumerate(zip((-0.1, 0.1), SWEEP_MODELS.items())):
        results = [runs.test(name, shot, experiments.SWEEP_QUERY) for shot in experiments.K_SWEEP]
        shots = [shot + offset for shot, result in zip(experiments.K_SWEEP, results) if result]
        results = [result for result in results if result]
        ax.errorbar(shots, [r['mean'] for r in results], yerr=[r['ci95'] for r in results],
                    marker='o', capsize=3, color=f'C{model}', label=label + runs.shortened(name))
    for model, (offset, label) in enumerate(zip((-0.25, 0.25), SWEEP_MODELS.values())):
        reported = [REPORTED['k_sweep_2023'][shot][model] for shot in experiments.K_SWEEP]
        ax.errorbar(np.array(experiments.K_SWEEP) + offset, [mean for mean, _ in reported],
                    yerr=[ci95 for _, ci95 in reported], marker='o', markerfacecolor='none',
                    linestyle='--', capsize=3, color=f'C{model}',
                    label=f"{label.split(' (')[0]}: the 2023 report's Table 2")
    ax.set_xlabel('support examples per class at test time (K), Q = 10')
    ax.set_xticks(experiments.K_SWEEP)
    ax.set_ylabel('test accuracy (95% interval)')


def draw_metabolism(ax, runs):
    steps, accuracies = runs.curve(METABOLISM)
    _, ci95 = runs.curve(METABOLISM, VAL_CI95)
    ax.errorbar(steps, accuracies, yerr=ci95, marker='o', capsize=3,
                label='validation query accuracy, 95% interval' + runs.shortened(METABOLISM))
    for (year, (mean, ci95)), color in zip(REPORTED['metabolism_val'].items(), ('C1', 'C2')):
        ax.axhline(mean, color=color, linestyle='--',
                   label=f"the {year} report's final validation, {interval(mean, ci95)}")
    ax.set_ylabel('validation query accuracy')


def draw_fomaml_bar(ax):
    ax.axhline(FOMAML_BAR, color='grey', linestyle='--',
               label=f"the handout's bar for first-order MAML ({FOMAML_BAR:.2f})")


def draw_fomaml(ax, runs):
    draw_curves({FOMAML: 'first-order MAML, 5 inner steps'})(ax, runs)
    draw_fomaml_bar(ax)


def draw_second_handout(ax, runs):
    draw_curves({FOMAML: 'first-order MAML', MAMLPP: 'MAML++',
                 TRANSFER: 'transfer learning'})(ax, runs)
    draw_fomaml_bar(ax)


STABILITY_METHODS = {'fomaml': 'first-order MAML', 'mamlpp': 'MAML++'}
MORE_SEEDS = tuple(name for name in experiments.STABILITY_RUNS if name not in (FOMAML, MAMLPP))


def draw_stability(axes, runs):
    """One panel per method, side by side on one scale, each seed with a checkpoint its own
    line."""
    for ax, (method, label) in zip(axes, STABILITY_METHODS.items()):
        for seed in experiments.STABILITY_SEEDS:
            name = experiments.stability_name(method, seed)
            if name not in runs.saved:
                continue
            steps, values = runs.curve(name)
            ax.plot(steps, values, marker='o', markersize=2,
                    label=f'seed {seed}' + runs.shortened(name))
        ax.set_title(label, fontsize=10)
    axes[0].set_ylabel('validation post-adaptation query accuracy')


SWEEP_MODELS = {PROTONET_1SHOT: 'ProtoNet (trained 5-way 1-shot)',
                MAML_LEARNED_LRS: 'MAML, learned inner lrs (trained 5-way 1-shot)'}
FIGURES = (
    Figure(P1, 'protonet_metrics', 'ProtoNet, 5-way 5-shot: the four accuracy metrics',
           'Support and query accuracy on training tasks (dotted) and validation tasks (solid).',
           (PROTONET_5SHOT,), draw_metrics(PROTONET_5SHOT, PROTONET_METRICS)),
    Figure(P1, 'protonet_shots', 'ProtoNet: trained 5-way 5-shot vs 5-way 1-shot',
           'Validation query accuracy of the two ProtoNets (their own task shapes).',
           (PROTONET_5SHOT, PROTONET_1SHOT),
           draw_curves({PROTONET_5SHOT: 'trained 5-way 5-shot',
                        PROTONET_1SHOT: 'trained 5-way 1-shot'})),
    Figure(P2, 'maml_metrics', f'MAML, inner learning rate {LR}: the six accuracy metrics',
           'Pre- and post-adaptation accuracies on training tasks (dotted) and validation tasks '
           '(solid), 5-way 1-shot, one inner step.', (MAML_DEFAULT_LR,),
           draw_metrics(MAML_DEFAULT_LR, MAML_METRICS)),
    Figure(P2, 'maml_inner_lr', f'MAML: inner learning rate {LR} vs {SMALL_LR}',
           'Validation post-adaptation query accuracy, one inner step.',
           (MAML_DEFAULT_LR, MAML_SMALL_LR),
           draw_curves({MAML_DEFAULT_LR: f'inner lr {LR}', MAML_SMALL_LR: f'inner lr {SMALL_LR}'})),
    Figure(P2, 'maml_inner_steps', f'MAML, inner learning rate {SMALL_LR}: 1 vs 5 inner steps',
           'Validation post-adaptation query accuracy.', (MAML_SMALL_LR, MAML_SMALL_LR_5_STEPS),
           draw_curves({MAML_SMALL_LR: '1 inner step', MAML_SMALL_LR_5_STEPS: '5 inner steps'})),
    Figure(P2, 'maml_learned_lrs',
           f'MAML: learned vs fixed inner learning rates (both start at {LR})',
           'Validation post-adaptation query accuracy.', (MAML_DEFAULT_LR, MAML_LEARNED_LRS),
           draw_curves({MAML_DEFAULT_LR: f'fixed inner lr {LR}',
                        MAML_LEARNED_LRS: 'learned inner lrs'})),
    Figure(P2, 'learned_lrs', 'MAML: the learned inner learning rates',
           'One learning rate per parameter tensor (conv0..3, b0..3: convolutions and biases; '
           f'w4, b4: the linear layer), as training learns them from {LR}.',
           (MAML_LEARNED_LRS,), draw_inner_lrs(MAML_LEARNED_LRS)),
    Figure(P3, 'k_sweep', 'More support data at test time (K sweep)',
           'Test accuracy of the two 1-shot-trained models on 5-way K-shot tasks with 10 queries '
           'per class, error bars the 95% interval over the test tasks, beside Table 2 of the '
           '2023 report (open markers, dashed; the sets of points are shifted apart to be told '
           'apart).', tuple(SWEEP_MODELS), draw_k_sweep),
    Figure(P4, 'metabolism_validation', 'ProtoNet on TDC Metabolism',
           "Validation query accuracy, 2-way 5-shot tasks of the validation data sets, error bars "
           "the 95% interval over about 2,400 tasks (the assignment's validation), against the "
           "final validation accuracy of the two reports (dashed).",
           (METABOLISM,), draw_metabolism),
    Figure(H2, 'fomaml', 'First-order MAML, 5-way 5-shot, 5 inner steps (second handout)',
           'Validation post-adaptation query accuracy, against the bar the handout sets.',
           (FOMAML,), draw_fomaml),
    Figure(H2, 'second_handout', 'First-order MAML, MAML++ and the transfer-learning baseline',
           'Validation post-adaptation query accuracy on 5-way 5-shot tasks; for the transfer '
           'baseline, a new linear layer fitted to each task on the pre-trained, frozen features; '
           "dashed, the handout's bar for first-order MAML.",
           SECOND_HANDOUT_RUNS, draw_second_handout),
    Figure(H2, 'stability', 'Training stability: first-order MAML vs MAML++ (second handout, '
           'extra credit)', 'Validation post-adaptation query accuracy in the handout\'s setting '
           f'(5-way 5-shot, 15 queries, 5 inner steps at inner learning rate {LR}, 1000 '
           f'iterations), seeds {", ".join(map(str, experiments.STABILITY_SEEDS))} for both '
           "methods, each line naming its seed; a seed's run is drawn once it has a checkpoint.",
           (FOMAML, MAMLPP), draw_stability, panels=2, also=MORE_SEEDS),
)


def render(figure, runs, path):
    """Draws one figure to a PNG; returns the matplotlib figure (its lines are the data)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, figure.panels, figsize=(7 * figure.panels, 4.5), sharey=True,
                             squeeze=False)
    axes = list(axes[0])
    figure.draw(axes[0] if figure.panels == 1 else axes, runs)
    for ax in axes:
        if not ax.get_xlabel():
            ax.set_xlabel('training iteration')
        if ax.get_legend_handles_labels()[0]:  # a legend only of labelled lines (matplotlib warns)
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    (axes[0].set_title if figure.panels == 1 else fig.suptitle)(figure.title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig


# ----- tables -----
@dataclasses.dataclass
class Table:
    part: str
    title: str
    caption: str
    runs: tuple  # the runs it needs
    build: object  # runs -> (header, rows)
    also: tuple = ()  # as Figure's


def test_cell(runs, name, shot, query):
    result = runs.test(name, shot, query)
    return interval(result['mean'], result['ci95']) if result else 'not tested'


def own_shape_cell(runs, name):
    """The test cell of a run tested once, on its training shape."""
    (shape,) = experiments.BY_NAME[name].tests
    return test_cell(runs, name, *shape)


def reported_cell(value):
    return interval(*value) if value else '—'


def last_validation(runs, name, tag=None):
    steps, values = runs.curve(name, tag)
    return f'{values[-1]:.3f} (iteration {steps[-1]})' if steps else '—'


def protonet_rows(runs):
    return (['trained as', 'ours', '2022 report', '2023 report'],
            [[name, test_cell(runs, name, *ONE_SHOT_TEST),
              *(reported_cell(REPORTED['protonet_test'][name][year]) for year in ('2022', '2023'))]
             for name in (PROTONET_5SHOT, PROTONET_1SHOT)])


def maml_rows(runs):
    return ['run', 'ours'], [[name, test_cell(runs, name, *ONE_SHOT_TEST)] for name in MAML_RUNS]


def k_sweep_rows(runs):
    return (['K', 'ProtoNet (ours)', 'ProtoNet (2023 report)', 'MAML, learned lrs (ours)',
             'MAML (2023 report)'],
            [[str(shot), test_cell(runs, PROTONET_1SHOT, shot, experiments.SWEEP_QUERY),
              reported_cell(REPORTED['k_sweep_2023'][shot][0]),
              test_cell(runs, MAML_LEARNED_LRS, shot, experiments.SWEEP_QUERY),
              reported_cell(REPORTED['k_sweep_2023'][shot][1])] for shot in experiments.K_SWEEP])


def metabolism_rows(runs):
    steps, accuracies = runs.curve(METABOLISM)
    _, ci95 = runs.curve(METABOLISM, VAL_CI95)
    last = f'{interval(accuracies[-1], ci95[-1])} (iteration {steps[-1]})' if steps else '—'
    return (['', 'validation query accuracy', 'test accuracy'],
            [['ours', last, own_shape_cell(runs, METABOLISM)],
             *([f'{year} report', reported_cell(value), '—']
               for year, value in REPORTED['metabolism_val'].items())])


def second_handout_rows(runs):
    return (['run', 'last validation', 'test accuracy'],
            [[name, last_validation(runs, name),
              own_shape_cell(runs, name)]
             for name in SECOND_HANDOUT_RUNS])


def stability_rows(runs):
    return (['seed', *STABILITY_METHODS.values()],
            [[str(seed), *(stability_cell(runs, experiments.stability_name(method, seed))
                           for method in STABILITY_METHODS)]
             for seed in experiments.STABILITY_SEEDS])


def stability_cell(runs, name):
    if name not in runs.saved:
        return 'not run'
    return own_shape_cell(runs, name)


def runs_rows(runs):
    return (['run', 'command', 'iterations', 'last started'],
            [[name, f"`{' '.join([record['script'], *record['argv']])}`",
              runs.iterations(name), record['date']]
             for name, record in ((name, runs.flags(name)) for name in runs.saved)])


TABLES = (
    Table(P1, 'ProtoNet: test accuracy on 5-way 1-shot tasks',
          'Both ProtoNets tested on 5-way 1-shot test tasks (15 queries per class) at their last '
          'checkpoint, mean ± 95% interval, beside the two reports.',
          (PROTONET_5SHOT, PROTONET_1SHOT), protonet_rows),
    Table(P2, 'MAML: test accuracy on 5-way 1-shot tasks',
          'Test tasks with 15 queries per class, at the last checkpoint (the reports give no such '
          "table; the 2023 report's K = 1, Q = 10 value for learned inner lrs is in the K sweep "
          'table).', MAML_RUNS, maml_rows),
    Table(P3, 'More support data at test time: test accuracy against K',
          'Models trained on 5-way 1-shot tasks, tested on 5-way K-shot tasks with Q = 10, mean ± '
          '95% interval, beside Table 2 of the 2023 report.', tuple(SWEEP_MODELS), k_sweep_rows),
    Table(P4, 'ProtoNet on TDC Metabolism',
          "Last validation query accuracy with its 95% interval (about 2,400 tasks; the reports' "
          '0.004 is the spread of batch means, about half an interval over tasks) and the test '
          'accuracy.', (METABOLISM,), metabolism_rows),
    Table(H2, 'Second handout: 5-way 5-shot',
          'Last validation post-adaptation query accuracy and the test accuracy; the '
          f"handout's bar for first-order MAML is {FOMAML_BAR:.2f} on validation within 1000 "
          'iterations.', SECOND_HANDOUT_RUNS, second_handout_rows),
    Table(H2, 'Training stability: test accuracy by seed',
          "Each seed's run of both methods at its last checkpoint, on 5-way 5-shot test tasks "
          "with 15 queries per class drawn with that seed (the same tasks for both methods), "
          'mean ± 95% interval.', (FOMAML, MAMLPP), stability_rows, also=MORE_SEEDS),
    Table(RUNS, 'Every run and how it was made',
          "Each run's command (its log dir's flags.json holds every flag, TensorBoard's HPARAMS "
          "tab the same), its length against the handouts', and when it started.", (), runs_rows),
)


def markdown_table(header, rows):
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    return '\n'.join(lines + ['| ' + ' | '.join(row) + ' |' for row in rows])


def write_report(log_root, out):
    """Draws every figure whose runs have a checkpoint and builds every table, part by part, into
    out/REPORT.md and out/figures/; returns {slug: matplotlib figure}."""
    runs = Runs(log_root)
    figures_dir = Path(out) / 'figures'
    figures_dir.mkdir(parents=True, exist_ok=True)
    for stale in figures_dir.glob('figure*.png'):
        stale.unlink()
    ready = [item for item in FIGURES + TABLES if set(item.runs) <= set(runs.saved)]
    lines, drawn, numbers = [f'# Few-shot meta-learning: the report\n\nRuns read from '
                             f'`{log_root}`.'], {}, {Figure: 0, Table: 0}
    for part, heading in PARTS.items():
        items = [item for item in ready if item.part == part]
        if items:
            lines.append(f'\n## {heading}\n')
        for item in items:
            numbers[type(item)] += 1
            lines.append(render_item(item, numbers[type(item)], runs, figures_dir, drawn))
    missing = [item.title for item in FIGURES + TABLES if item not in ready]
    if missing:
        lines.append('\nNot in the report yet, their runs without a checkpoint: '
                     + '; '.join(missing)
                     + '. Run `python experiments.py`, then this again.')
    with util.atomic_file(Path(out) / 'REPORT.md', 'w') as file:
        file.write('\n'.join(lines) + '\n')
    return drawn


def render_item(item, number, runs, figures_dir, drawn):
    """One figure (drawn to a PNG) or table as Markdown with its number and caption."""
    shown = [*item.runs, *(name for name in item.also if name in runs.saved)]
    unrun = [name for name in item.also if name not in runs.saved]
    note = runs.note(shown or runs.saved) + (f' Not yet run: {", ".join(unrun)}.' if unrun else '')
    if isinstance(item, Figure):
        path = figures_dir / f'figure{number:02d}_{item.slug}.png'
        drawn[item.slug] = render(item, runs, path)
        return (f'![Figure {number}](figures/{path.name})\n\n**Figure {number}: {item.title}.** '
                f'{item.caption}{note}\n')
    header, rows = item.build(runs)
    return f'**Table {number}: {item.title}.** {item.caption}{note}\n\n' \
           f'{markdown_table(header, rows)}\n'


def main(args):
    log_root = args.log_root or experiments.default_log_root(args.scale)
    if not Path(log_root).is_dir():
        raise util.UserError(f'no runs in {log_root}; run `python experiments.py` first '
                             '(same --scale / --log_root)')
    out = args.out or f'report{experiments.scale_suffix(args.scale)}'
    drawn = write_report(log_root, out)
    print(f'Wrote {Path(out) / "REPORT.md"} with {len(drawn)} figures.')


def parse_args(argv=None):
    parser = util.argument_parser(description=__doc__.split('\n')[0])
    parser.add_argument('--scale', type=experiments.parse_scale, default='full',
                        help="which experiments.py scale to read ('full', 'tiny' or a fraction)")
    parser.add_argument('--log_root', default=None, help="the runs' root (default: the scale's)")
    parser.add_argument('--out', default=None,
                        help="where REPORT.md and figures/ go (default report, or report_tiny, "
                             "report_scale_F)")
    return parser.parse_args(argv)


if __name__ == '__main__':
    util.cli(lambda: main(parse_args()))
