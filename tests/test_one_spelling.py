"""Facts spelled once: experiments.py's metabolism run is run_bio.sh's command, a run's name
and length follow its flags as its script parses them (defaults included), and report.py
names runs only through experiments.py."""
import shlex
from pathlib import Path

import experiments
import maml
import maml_transfer
import report

ROOT = Path(__file__).resolve().parents[1]


def run_bio_command():
    """run_bio.sh's run_metabolism.py flags: {flag: value}."""
    script = (ROOT / 'run_bio.sh').read_text().replace('\\\n', ' ')
    line = next(line for line in script.splitlines() if line.startswith('exec '))
    tokens = shlex.split(line)
    tokens = tokens[next(i for i, token in enumerate(tokens)
                         if token.endswith('run_metabolism.py')) + 1:]
    return dict(zip(tokens[::2], tokens[1::2]))


def test_the_metabolism_run_is_run_bio_sh_s_command():
    flags = run_bio_command()
    assert set(flags) - set(experiments.METABOLISM_FLAGS[::2]) == {
        '--num_train_iterations', '--datadir', '--device'}  # the length, and where it runs
    run = experiments.METABOLISM
    assert dict(zip(run.flags[::2], run.flags[1::2])).items() <= flags.items()
    assert run.iterations == int(flags['--num_train_iterations'])


def test_a_run_is_named_after_its_flags_as_its_script_parses_them(monkeypatch):
    """Another default in maml.py or maml_transfer.py renames the runs that rely on it."""
    parse_maml, parse_transfer = maml.parse_args, maml_transfer.parse_args
    monkeypatch.setattr(maml, 'parse_args', lambda argv: parse_maml(['--inner_lr', '0.3', *argv]))
    monkeypatch.setattr(maml_transfer, 'parse_args', lambda argv: parse_transfer(
        ['--num_support', '3', '--num_train_iterations', '7', *argv]))
    assert experiments.maml_run(()).name == 'maml_inner_lr_0.3'
    assert experiments.maml_run(('--inner_lr', '0.04', '--num_inner_steps', '5')).name == \
        'maml_inner_lr_0.04_5_steps'
    transfer = experiments.transfer_run()
    assert (transfer.name, transfer.tests, transfer.iterations) == ('transfer_3shot', ((3, 15),), 7)
    assert experiments.MAML_DEFAULT_LR.name == f'maml_inner_lr_{parse_maml([]).inner_lr}'


def test_report_py_names_no_run_itself():
    source = (ROOT / 'report.py').read_text()
    spelled = [run.name for run in experiments.RUNS
               if f"'{run.name}'" in source or f'"{run.name}"' in source]
    assert not spelled, f'report.py spells {spelled}: use experiments.py\'s runs'
