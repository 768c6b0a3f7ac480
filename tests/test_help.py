"""Every script's --help: each flag with its default, read from the script's own parser."""
import argparse
import importlib
import re

import pytest

import util

SCRIPTS = ['protonet', 'maml', 'maml_transfer', 'run_metabolism', 'experiments', 'report',
           'grader', 'homework', 'benchmarks.benchmark', 'benchmarks.course_protonet',
           'benchmarks.time_to_accuracy', 'benchmarks.torchrun_speed']


def help_of(module_name, monkeypatch, capsys):
    """(parser, --help's text) of a script: the parser its parse_args builds through
    util.argument_parser, and what `--help` printed before exiting with status 0."""
    parsers = []

    def recorded(*args, **kwargs):
        parsers.append(argument_parser(*args, **kwargs))
        return parsers[-1]

    argument_parser = util.argument_parser
    monkeypatch.setattr(util, 'argument_parser', recorded)
    with pytest.raises(SystemExit) as exit:
        importlib.import_module(module_name).parse_args(['--help'])
    assert exit.value.code == 0
    (parser,) = parsers
    return parser, capsys.readouterr().out


def shown_flags(parser):
    """The parser's flags that --help lists (not -h itself, nor a hidden one)."""
    return [action for action in parser._actions
            if action.option_strings and action.help is not argparse.SUPPRESS
            and not isinstance(action, argparse._HelpAction)]


@pytest.mark.parametrize('module_name', SCRIPTS)
def test_help_lists_every_flag_with_its_default(module_name, monkeypatch, capsys):
    parser, text = help_of(module_name, monkeypatch, capsys)
    entries = re.split(r'\n(?=  -)', text)  # one entry per flag, wrapped over lines
    for action in shown_flags(parser):
        flag = action.option_strings[-1]
        (entry,) = [entry for entry in entries if re.match(rf'  {flag}\b', entry)]
        assert f'(default: {action.default})' in ' '.join(entry.split()), (flag, entry)


# The assignment's flags and defaults (SPEC.md), which ours keep.
ASSIGNMENT_DEFAULTS = {'log_dir': None, 'num_way': 5, 'num_support': 1, 'num_query': 15,
                       'batch_size': 16, 'test': False, 'checkpoint_step': -1, 'num_workers': 2,
                       'cache': False, 'device': 'cpu'}
SCRIPT_DEFAULTS = {
    'protonet': {'learning_rate': 0.001, 'num_train_iterations': 5000, 'compile': False,
                 'backend': 'inductor'},
    'maml': {'num_inner_steps': 1, 'inner_lr': 0.4, 'learn_inner_lrs': False, 'outer_lr': 0.001,
             'num_train_iterations': 15000}}


@pytest.mark.parametrize('module_name', SCRIPT_DEFAULTS)
def test_the_assignments_flags_keep_its_defaults(module_name):
    flags = vars(importlib.import_module(module_name).parse_args([]))
    expected = ASSIGNMENT_DEFAULTS | SCRIPT_DEFAULTS[module_name]
    assert {name: flags[name] for name in expected} == expected


def test_grader_help_names_the_test_ids(monkeypatch, capsys):
    _, text = help_of('grader', monkeypatch, capsys)
    assert text.startswith('usage: ')
    import grader
    for test_id, *_ in grader.TESTS:
        assert test_id in text


def test_grader_refuses_an_unknown_test_id_in_one_line(capsys):
    import grader
    with pytest.raises(SystemExit) as exit:
        grader.parse_args(['2a-9-basic'])
    assert exit.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith('error: unknown test id 2a-9-basic; known: 1b-0-hidden')
