"""experiments.py and report.py end to end at tiny scale, on the real data: every run of both
handouts, every figure and table, numbers and points checked against what the runs wrote.

The tiny tree's 40 jobs run in this process (`run_here`), each the command experiments.py
would start, as `python script flags...` runs it: a subprocess would spend most of its 4 s
importing torch. experiments.py's own subprocesses, their signals and console.log are
tested by test_a_second_call_does_no_work here and by test_preemption.py."""
import contextlib
import io
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import experiments
import float64_run
import report
import run_metabolism
import training
import util

ROOT = Path(__file__).resolve().parents[1]


def run_script(*argv):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True)


def run_here(job, passthrough, description):
    """Job.execute in this process: the job's command as `python script flags...` runs it
    (float64_run.run_main), its printed output appended to the run's console.log after the
    command line."""
    script, *flags = job.command(passthrough)[1:]
    job.plan.log_dir.mkdir(parents=True, exist_ok=True)
    with open(job.plan.log_dir / 'console.log', 'a') as log, contextlib.redirect_stdout(log):
        print(f'$ {shlex.join([script, *flags])}')
        float64_run.run_main(script, flags)


def test_a_script_run_here_sees_the_tests_patches_of_its_module(monkeypatch):
    """The tiny tree's 8 validation tasks for its metabolism run reach that run: run_here runs
    the imported module's main, not a fresh copy of the file (as runpy would), whose own
    NUM_VAL_TASKS would be 2400."""
    calls = []
    monkeypatch.setattr(run_metabolism, 'NUM_VAL_TASKS', 8)
    monkeypatch.setattr(run_metabolism.metabolism, 'MetabolismTasks', lambda *args: None)
    monkeypatch.setattr(training, 'main', lambda *args, **kwargs: calls.append(kwargs))
    float64_run.run_main('run_metabolism.py', [])
    assert calls == [{'num_val_tasks': 8}]


@pytest.fixture(scope='module')
def tiny(tmp_path_factory, built):
    """(log root, report folder, experiments.py's printed output, {slug: figure}): the whole
    list."""
    root = tmp_path_factory.mktemp('experiments')
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setattr(experiments.Job, 'execute', run_here)
        # The assignment's 2400 validation tasks are most of the tree's time; 8 show the same
        # files (test_run_metabolism.py checks the 2400).
        patch.setattr(run_metabolism, 'NUM_VAL_TASKS', 8)
        experiments.main(experiments.parse_args(['--scale', 'tiny', '--log_root',
                                                 str(root / 'logs'), '--datadir', str(built[0])]))
    figures = report.write_report(root / 'logs', root / 'report')
    return root / 'logs', root / 'report', printed.getvalue(), figures


def tables(markdown):
    """{table title: [row cells]} of REPORT.md."""
    found = {}
    for title, body in re.findall(r'\*\*Table \d+: (.+?)\.\*\*.*?\n\n((?:\|.*\n)+)', markdown):
        found[title] = [[cell.strip() for cell in line.strip('|\n').split('|')]
                        for line in body.splitlines()[2:]]
    return found


def result(log_root, name, shot, query):
    paths = list((log_root / name).glob(f'test.way_*.support_{shot}.query_{query}.*json'))
    assert len(paths) == 1, paths
    value = json.loads(paths[0].read_text())
    return f"{value['mean']:.3f} ± {value['ci95']:.3f}"


def test_every_figure_and_table_is_produced(tiny):
    log_root, out, _, figures = tiny
    markdown = (out / 'REPORT.md').read_text()
    assert 'Not in the report yet' not in markdown
    pngs = sorted(path.name for path in (out / 'figures').iterdir())
    readme = (ROOT / 'README.md').read_text()
    counted = re.search(r'(\d+) captioned figures and (\d+)\s+tables', readme)  # the README's
    assert (len(pngs), len(report.TABLES)) == tuple(map(int, counted.groups()))
    assert pngs == [f'figure{n:02d}_{f.slug}.png' for n, f in enumerate(report.FIGURES, 1)]
    for number, png in enumerate(pngs, 1):
        assert (out / 'figures' / png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
        assert f'![Figure {number}](figures/{png})' in markdown
    assert set(tables(markdown)) == {table.title for table in report.TABLES}
    # tiny runs are shortened, and every figure and table says so
    captions = re.findall(r'\*\*(?:Figure|Table) \d+:.*', markdown)
    assert len(captions) == len(report.FIGURES) + len(report.TABLES)
    assert all('Shortened runs:' in caption for caption in captions)
    for slug in ('k_sweep', 'second_handout', 'stability', 'maml_inner_lr'):
        legend = [text.get_text() for text in figures[slug].axes[0].get_legend().texts
                  if not text.get_text().startswith("the handout's")]  # the bar: no run
        ours = [label for label in legend if "the 2023 report's" not in label]
        assert ours and all('(shortened: 1 of ' in label for label in ours), legend


def test_the_report_is_deterministic(tiny, tmp_path):
    """A second report of the same runs: REPORT.md and every figure byte for byte the same."""
    log_root, out, _, _ = tiny
    report.write_report(log_root, tmp_path)
    assert (tmp_path / 'REPORT.md').read_text() == (out / 'REPORT.md').read_text()
    first = sorted((out / 'figures').iterdir())
    assert [path.name for path in sorted((tmp_path / 'figures').iterdir())] == [
        path.name for path in first]
    for path in first:
        assert (tmp_path / 'figures' / path.name).read_bytes() == path.read_bytes(), path.name


def test_the_report_numbers_are_the_json_results(tiny):
    log_root, out, _, _ = tiny
    found = tables((out / 'REPORT.md').read_text())
    protonet = {row[0]: row for row in found['ProtoNet: test accuracy on 5-way 1-shot tasks']}
    for name in ('protonet_5shot', 'protonet_1shot'):
        assert protonet[name][1] == result(log_root, name, 1, 15)
    assert protonet['protonet_5shot'][2] == '0.985 ± 0.002'  # the 2022 report's
    maml = {row[0]: row[1] for row in found['MAML: test accuracy on 5-way 1-shot tasks']}
    assert maml == {name: result(log_root, name, 1, 15) for name in report.MAML_RUNS}
    for row in found['More support data at test time: test accuracy against K']:
        shot = int(row[0])
        assert row[1] == result(log_root, 'protonet_1shot', shot, 10)
        assert row[3] == result(log_root, 'maml_learned_inner_lrs', shot, 10)
    metabolism = found['ProtoNet on TDC Metabolism'][0]
    assert metabolism[2] == result(log_root, 'metabolism', 5, 10)
    events = EventAccumulator(str(log_root / 'metabolism'))
    events.Reload()
    accuracy, ci95 = (events.Scalars(tag)[-1].value
                      for tag in ('val_accuracy/query', 'val_accuracy/ci95'))
    assert metabolism[1] == f'{accuracy:.3f} ± {ci95:.3f} (iteration 0)'
    second = {row[0]: row[2] for row in found['Second handout: 5-way 5-shot']}
    assert second == {name: result(log_root, name, 5, 15) for name in report.SECOND_HANDOUT_RUNS}
    assert found['Training stability: test accuracy by seed'] == [
        [str(seed), *(result(log_root, experiments.stability_name(method, seed), 5, 15)
                      for method in ('fomaml', 'mamlpp'))] for seed in experiments.STABILITY_SEEDS]
    commands = {row[0]: row[1] for row in found['Every run and how it was made']}
    assert set(commands) == {run.name for run in experiments.RUNS}
    assert commands['fomaml_5shot'].startswith('`maml.py --first_order --num_support 5 '
                                               '--num_inner_steps 5 --batch_size 1')


def test_a_figure_draws_the_logged_scalars(tiny):
    log_root, _, _, figures = tiny
    events = EventAccumulator(str(log_root / 'maml_inner_lr_0.4'))
    events.Reload()
    lines = {line.get_label(): line.get_xydata() for line in figures['maml_metrics'].axes[0].lines}
    assert len(lines) == 6
    for tag, label in report.MAML_METRICS.items():
        logged = [(event.step, event.value) for event in events.Scalars(tag)]
        np.testing.assert_allclose(lines[label], logged, rtol=1e-6)
    sweep = figures['k_sweep'].axes[0].containers  # one errorbar each: (line, caps, bars)
    for container, offset, name in zip(sweep, (-0.1, 0.1), report.SWEEP_MODELS):
        points = container.lines[0].get_xydata()
        np.testing.assert_allclose(points[:, 0], np.array(experiments.K_SWEEP) + offset)
        np.testing.assert_allclose(points[:, 1], [float(result(log_root, name, shot, 10).split()[0])
                                                  for shot in experiments.K_SWEEP], atol=5e-4)
    # the stability study: one panel per method, every seed drawn from its own run's events
    panels = figures['stability'].axes
    assert [ax.get_title() for ax in panels] == list(report.STABILITY_METHODS.values())
    for ax, method in zip(panels, report.STABILITY_METHODS):
        assert len(ax.lines) == len(experiments.STABILITY_SEEDS)
        for line, seed in zip(ax.lines, experiments.STABILITY_SEEDS):
            events = EventAccumulator(str(log_root / experiments.stability_name(method, seed)))
            events.Reload()
            logged = [(event.step, event.value)
                      for event in events.Scalars(report.VAL_QUERY['maml.py'])]
            np.testing.assert_allclose(line.get_xydata(), logged, rtol=1e-6)


def test_the_stability_figure_and_table_show_each_seed_that_has_run(tiny, tmp_path):
    """Seed 0 of both methods is all the figure and the seeds' table need; another seed is drawn
    and tested, and named in the caption's note, once its run has a checkpoint; until then the
    note names it as not yet run and the table says so."""
    log_root = tmp_path / 'logs'
    shutil.copytree(tiny[0], log_root)
    for name in ('fomaml_5shot_seed_1', 'mamlpp_5shot_seed_2'):
        shutil.rmtree(log_root / name)
    figure, = (figure for figure in report.FIGURES if figure.slug == 'stability')
    drawn = {}
    markdown = report.render_item(figure, 1, report.Runs(log_root), tmp_path, drawn)
    assert [[line.get_label().split(' (')[0] for line in ax.lines]
            for ax in drawn['stability'].axes] == [['seed 0', 'seed 2'], ['seed 0', 'seed 1']]
    note, unrun = markdown.split('Shortened runs: ')[1].split(' Not yet run: ')
    assert unrun.strip() == 'fomaml_5shot_seed_1, mamlpp_5shot_seed_2.'
    assert [entry.split(',')[0] for entry in note.split('; ')] == [
        'fomaml_5shot', 'mamlpp_5shot', 'fomaml_5shot_seed_2', 'mamlpp_5shot_seed_1']
    assert set(figure.runs) == {'fomaml_5shot', 'mamlpp_5shot'}
    table, = (table for table in report.TABLES if table.build is report.stability_rows)
    rows = tables(report.render_item(table, 1, report.Runs(log_root), tmp_path, drawn))
    assert [row[1:] for row in rows[table.title]] == [
        [result(log_root, 'fomaml_5shot', 5, 15), result(log_root, 'mamlpp_5shot', 5, 15)],
        ['not run', result(log_root, 'mamlpp_5shot_seed_1', 5, 15)],
        [result(log_root, 'fomaml_5shot_seed_2', 5, 15), 'not run']]


def test_a_second_call_does_no_work(tiny):
    log_root, _, first, _ = tiny
    assert f'{len(experiments.RUNS)} runs in {log_root}' in first
    before = {path: path.stat().st_mtime_ns for path in log_root.rglob('*')}
    again = run_script('experiments.py', '--scale', 'tiny', '--log_root', str(log_root))
    assert again.returncode == 0 and 'all done already' in again.stdout
    assert {path: path.stat().st_mtime_ns for path in log_root.rglob('*')} == before
    listed = run_script('experiments.py', '--scale', 'tiny', '--log_root', str(log_root), '--list')
    states = [line.split()[-1] for line in listed.stdout.splitlines()]
    assert states == ['done'] * len(experiments.RUNS)


def test_a_stopped_run_resumes_from_its_latest_checkpoint(tmp_path, monkeypatch):
    """A run of 5 iterations with a checkpoint every 2, stopped before its last checkpoint (as
    a run killed at iteration 3 is: its checkpoint 4 removed), resumes at 3, then is tested."""
    monkeypatch.setattr(training, 'SAVE_INTERVAL', 2)
    run = experiments.BY_NAME['protonet_5shot']
    plan = experiments.Plan(run, tmp_path / run.name, 5,
                            [*run.flags, '--batch_size', '2', '--num_query', '2',
                             '--num_train_iterations', '5'], 4)
    train = experiments.jobs(plan)[0]
    run_here(train, [], train.label)
    (plan.log_dir / 'state4.pt').unlink()
    assert plan.state() == 'stopped at checkpoint 2 of 4'
    todo = experiments.jobs(plan)
    assert [job.label for job in todo] == ['resume at 3', 'test K=1 Q=15']
    for job in todo:
        run_here(job, [], job.label)
    assert 'Loaded checkpoint iteration 2.' in (plan.log_dir / 'console.log').read_text()
    assert plan.state() == 'done' and experiments.jobs(plan) == []


def test_a_job_follows_its_files_not_its_printed_lines(tmp_path, monkeypatch):
    """A training job's bar follows its checkpoints: a command that prints iteration 4's line
    and a test's line, but saves only checkpoint 2 of a 6-iteration run (a checkpoint every 2
    steps), has done 3 iterations. What it printed is in console.log; a failing command is
    one line naming its last line."""
    import tqdm
    monkeypatch.setattr(training, 'SAVE_INTERVAL', 2)
    plan = experiments.Plan(experiments.BY_NAME['protonet_5shot'], tmp_path, 6,
                            ['--num_train_iterations', '6'], 4)
    job = experiments.jobs(plan)[0]  # training
    script = ("import pathlib, sys; print('Iteration 4: loss: 1.000'); "
              "print('Accuracy over 600 test tasks: mean 0.500'); "
              "pathlib.Path(sys.argv[1], 'state2.pt').touch(); sys.exit(sys.argv[2] == 'fail')")
    bars = []

    class Recorded(tqdm.tqdm):
        def close(self):
            bars.append(self.n)
            super().close()
    monkeypatch.setattr(tqdm, 'tqdm', Recorded)
    for outcome in ('pass', 'fail'):
        monkeypatch.setattr(experiments.Job, 'command', lambda self, passthrough: [
            sys.executable, '-c', script, str(tmp_path), outcome])
        if outcome == 'pass':
            job.execute([], 'train')
        else:
            with pytest.raises(util.UserError, match=r'failed \(Accuracy over 600 test tasks: '
                                                     r'mean 0.500\); its output is in'):
                job.execute([], 'train')
    assert bars and set(bars) == {3}, bars
    assert (tmp_path / 'console.log').read_text().count('Iteration 4: loss: 1.000\n') == 2


def test_a_job_bar_prints_only_when_it_moves(tmp_path, monkeypatch, capsys):
    """While a command runs without saving, its bar writes nothing new: a log that is not a
    terminal gets one frame at the start, one for the checkpoint saved, and one at the end, not
    one per poll."""
    plan = experiments.Plan(experiments.BY_NAME['protonet_5shot'], tmp_path, 6,
                            ['--num_train_iterations', '6'], 4)
    job = experiments.jobs(plan)[0]
    script = ("import pathlib, sys, time; time.sleep(0.5); "
              "pathlib.Path(sys.argv[1], 'state5.pt').touch()")
    monkeypatch.setattr(experiments.Job, 'POLL_SECONDS', 0.01)
    monkeypatch.setattr(experiments.Job, 'command', lambda self, passthrough: [
        sys.executable, '-c', script, str(tmp_path)])
    job.execute([], 'train')
    frames = [frame for frame in capsys.readouterr().err.split('\r') if frame.strip()]
    assert len(frames) == 3 and '6/6' in frames[-1], frames


def test_a_resumed_job_bar_starts_where_its_checkpoints_are(tmp_path, monkeypatch, capsys):
    """A run continued from a checkpoint starts its bar there, not at 0: no jump to count as
    speed (tqdm's rate and time left cover the new iterations only)."""
    monkeypatch.setattr(training, 'SAVE_INTERVAL', 2)  # checkpoints 0, 2, 4 of 6 iterations
    plan = experiments.Plan(experiments.BY_NAME['protonet_5shot'], tmp_path, 6,
                            ['--num_train_iterations', '6'], 4)
    job = experiments.jobs(plan)[0]
    (tmp_path / 'state2.pt').touch()
    script = "import pathlib, sys; pathlib.Path(sys.argv[1], 'state5.pt').touch()"
    monkeypatch.setattr(experiments.Job, 'command', lambda self, passthrough: [
        sys.executable, '-c', script, str(tmp_path)])
    job.execute([], 'train')
    frames = [frame for frame in capsys.readouterr().err.split('\r') if frame.strip()]
    assert '3/6' in frames[0] and '6/6' in frames[-1], frames


def test_bad_input_is_a_one_line_error(tiny, tmp_path, capsys):
    log_root = tiny[0]
    for argv, message in (
            (['--scale', '2'], "--scale must be 'full', 'tiny' or a fraction in (0, 1], got '2'"),
            (['--only', 'protonet_2shot'], 'no run named protonet_2shot'),
            (['--scale', '0.5', '--log_root', str(log_root), '--only', 'protonet_1shot'],
             f'{log_root / "protonet_1shot"} holds a run made with --num_support 1 --batch_size 1 '
             '--num_train_iterations 1 (this scale: --num_support 1 --num_train_iterations '
             '2500)')):
        with pytest.raises(SystemExit) as exit:
            util.cli(lambda: experiments.main(experiments.parse_args(argv)))
        assert exit.value.code == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1]
    missing = run_script('report.py', '--log_root', str(tmp_path / 'none'))
    assert missing.returncode == 2 and 'no runs in' in missing.stderr


def test_a_damaged_flags_json_is_one_line(tmp_path, capsys):
    (tmp_path / 'protonet_1shot').mkdir()
    record = tmp_path / 'protonet_1shot' / training.FLAGS_FILE
    record.write_text('{"argv": ["--num_sup')  # cut short
    for main in (lambda: experiments.main(experiments.parse_args(
            ['--log_root', str(tmp_path), '--only', 'protonet_1shot'])),
                 lambda: report.main(report.parse_args(['--log_root', str(tmp_path)]))):
        with pytest.raises(SystemExit) as exit:
            util.cli(main)
        assert exit.value.code == 2
        assert capsys.readouterr().err.startswith(f'error: {record} is not a JSON record (')
