"""report.py is honest about runs and shows the course's numbers: report.py and experiments.py
agree on how far a run got (its latest checkpoint), a run stopped early is reported with the
iterations it reached, a run that only started is left out, and the figures draw the reports'
numbers beside ours."""
import re
import sys
import warnings

import numpy as np
import pytest

import experiments
import report
import training
import util


def make_run(log_root, name, iterations, checkpoints, monkeypatch):
    """A log dir as a run of experiments.RUNS started for `iterations` leaves it: its flags.json
    (the script's own parse_args and run_record) and checkpoints at the given steps (empty files:
    only their names say how far a run got)."""
    run = experiments.BY_NAME[name]
    argv = [*run.flags, '--num_train_iterations', str(iterations)]
    monkeypatch.setattr(sys, 'argv', [run.script, *argv])
    log_dir = log_root / name
    args = experiments.script_module(run.script).parse_args(argv)
    util.atomic_write_json(training.run_record(args), log_dir / training.FLAGS_FILE)
    for step in checkpoints:
        (log_dir / f'state{step}.pt').touch()


@pytest.fixture
def stopped(tmp_path, monkeypatch):
    """(log root, REPORT.md, {slug: figure}): protonet_5shot asked for its full 5000 iterations
    but stopped after checkpoint 300, protonet_1shot full length, maml_inner_lr_0.4 started and
    stopped before its first checkpoint."""
    log_root = tmp_path / 'logs'
    make_run(log_root, 'protonet_5shot', 5000, range(0, 301, 100), monkeypatch)
    make_run(log_root, 'protonet_1shot', 5000, range(0, 4901, 100), monkeypatch)
    make_run(log_root, 'maml_inner_lr_0.4', 15000, [], monkeypatch)
    figures = report.write_report(log_root, tmp_path / 'report')
    return log_root, (tmp_path / 'report' / 'REPORT.md').read_text(), figures


def test_a_run_reaches_its_latest_checkpoint_or_all_once_its_last_is_saved(tmp_path):
    run = experiments.BY_NAME['protonet_5shot']
    assert run.reached(tmp_path, 5000) == 0
    (tmp_path / 'state0.pt').touch()
    (tmp_path / 'state300.pt').touch()
    assert run.reached(tmp_path, 5000) == 301
    (tmp_path / 'state4900.pt').touch()
    assert run.reached(tmp_path, 5000) == 5000
    # run_bio.sh's run saves every 2000 steps (run_metabolism.py's interval): 8000 end at 6000
    metabolism = experiments.BY_NAME['metabolism']
    assert metabolism.last_checkpoint(8000) == 6000 and metabolism.reached(tmp_path, 8000) == 4901


def test_a_stopped_run_is_reported_with_the_iterations_it_reached(stopped):
    log_root, markdown, figures = stopped
    caption = re.search(r'\*\*Figure \d+: ProtoNet: trained 5-way 5-shot vs 5-way 1-shot\.\*\*.*',
                        markdown)[0]
    assert caption.endswith(' Shortened runs: protonet_5shot, 301 of 5000 iterations.')
    legend = [text.get_text() for text in figures['protonet_shots'].axes[0].get_legend().texts]
    assert legend == ['trained 5-way 5-shot (shortened: 301 of 5000 iterations)',
                      'trained 5-way 1-shot']
    rows = re.findall(r'^\| (\w+) \| `.*` \| (.+) \| .+ \|$', markdown, re.M)
    assert rows == [('protonet_5shot', '301 of 5000'), ('protonet_1shot', '5000 of 5000')]
    # experiments.py reads the same: resume the first, the second trained
    plans = {name: experiments.Plan.of(experiments.BY_NAME[name], 'full', log_root)
             for name in ('protonet_5shot', 'protonet_1shot')}
    assert plans['protonet_5shot'].state() == 'stopped at checkpoint 300 of 4900'
    assert plans['protonet_1shot'].trained()


def test_a_run_without_a_checkpoint_is_left_out(stopped):
    _, markdown, figures = stopped
    assert 'maml_metrics' not in figures and '| maml_inner_lr_0.4 |' not in markdown
    left_out = markdown[markdown.index('Not in the report yet'):]
    assert 'MAML, inner learning rate 0.4: the six accuracy metrics' in left_out


@pytest.mark.parametrize('label', [None, 'a run'])
def test_a_figure_has_a_legend_only_of_labelled_lines_and_never_warns(label, tmp_path):
    figure = report.Figure('P1', 'lines', 'title', 'caption', (),
                           lambda ax, runs: ax.plot([0, 1], [0.5, 0.9], label=label))
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # "No artists with labels found to put in legend"
        drawn = report.render(figure, None, tmp_path / 'lines.png')
    assert (drawn.axes[0].get_legend() is not None) == (label is not None)


def test_the_figures_carry_the_reports_numbers(tmp_path, monkeypatch):
    log_root = tmp_path / 'logs'
    for name in ('protonet_1shot', 'maml_learned_inner_lrs', 'metabolism', 'fomaml_5shot',
                 'mamlpp_5shot', 'transfer_5shot'):
        run = experiments.BY_NAME[name]
        make_run(log_root, name, run.iterations, [run.last_checkpoint(run.iterations)],
                 monkeypatch)
    figures = report.write_report(log_root, tmp_path / 'report')
    sweep = figures['k_sweep'].axes[0].containers[2:]  # after ours: the 2023 report's Table 2
    assert len(sweep) == 2
    for model, (container, offset) in enumerate(zip(sweep, (-0.25, 0.25))):
        reported = np.array([report.REPORTED['k_sweep_2023'][shot][model]
                             for shot in experiments.K_SWEEP])
        np.testing.assert_allclose(container.lines[0].get_xydata(),
                                   np.stack([np.array(experiments.K_SWEEP) + offset,
                                             reported[:, 0]], 1))
        bars = np.array(container.lines[2][0].get_segments())  # (K, 2 ends, (x, y))
        np.testing.assert_allclose(bars[:, 1, 1] - bars[:, 0, 1], 2 * reported[:, 1])
    levels = {slug: {line.get_ydata()[0]: line.get_label() for line in figures[slug].axes[0].lines
                     if len(set(line.get_ydata())) == 1}
              for slug in ('metabolism_validation', 'fomaml', 'second_handout')}
    assert levels['metabolism_validation'] == {
        0.76: "the 2022 report's final validation, 0.760 ± 0.004",
        0.72: "the 2023 report's final validation, 0.720 ± 0.004"}
    for slug in ('fomaml', 'second_handout'):
        assert levels[slug] == {0.8: "the handout's bar for first-order MAML (0.80)"}
