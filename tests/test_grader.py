"""grader.py: the assignment's ids and points; hidden tests skip in one line where the solution
is absent; wrong implementations lose their points. Every graded test passing, with the
assignment's framing and Gradescope's results.json, is test_homework.py's autograder run."""

from conftest import assert_gradescope_results

import grader

SPEC_POINTS = {'1b-0-hidden': 8, '2a-0-basic': 2, '2a-1-basic': 2, '2a-2-basic': 4,
               '2a-3-hidden': 4, '2b-0-basic': 5, '2b-1-hidden': 7}


def test_the_graded_tests_are_the_assignments_ids_and_points():
    """The grading itself, all 32 points with the assignment's framing, runs once, through
    the autograder (test_homework.py: assert_graded_in_full)."""
    assert grader.POINTS == SPEC_POINTS
    assert [test_id for test_id, *_ in grader.TESTS] == list(SPEC_POINTS)


def test_without_the_solution_hidden_tests_skip_in_one_line_and_visible_ones_count(
        capsys, tmp_path):
    visible = ['2a-0-basic', '2a-1-basic']
    assert grader.run(['1b-0-hidden', *visible], solution_name='no_such_solution',
                      gradescope=tmp_path / 'results.json') == (4, 4)
    output = capsys.readouterr().out
    skip = ('----- SKIP 1b-0-hidden: ProtoNet _step: loss and accuracies equal a plain '
            'implementation [hidden, 8 points: runs only where the solution module '
            'no_such_solution imports]')
    assert skip in output.splitlines() and '----- START 1b-0-hidden' not in output
    results = assert_gradescope_results(tmp_path / 'results.json', 4, 4)
    assert results['output'] == skip
    assert [test['name'].split(':')[0] for test in results['tests']] == visible


def test_a_wrong_implementation_loses_the_points(capsys, monkeypatch, tmp_path):
    logits = grader.protonet.prototype_logits  # negated: the farthest prototype wins
    monkeypatch.setattr(grader.protonet, 'prototype_logits', lambda *args: -logits(*args))
    assert grader.run(['1b-0-hidden'], gradescope=tmp_path / 'results.json') == (0, 8)
    assert 'FAIL: AssertionError' in capsys.readouterr().out
    (test,) = assert_gradescope_results(tmp_path / 'results.json', 0, 8)['tests']
    assert test['status'] == 'failed' and test['output'].startswith('FAIL: AssertionError')


def test_prototypes_divided_by_the_number_of_classes_lose_the_points(capsys, monkeypatch):
    """Support sums divided by N instead of each class's K (the same when K == N)."""
    def wrong_divisor(latents_support, labels_support, latents_query, num_way):
        one_hot = grader.torch.nn.functional.one_hot(labels_support, num_way).to(
            latents_support.dtype)
        prototypes = (one_hot.unsqueeze(-1) * latents_support.unsqueeze(2)).sum(1) / num_way
        return -(latents_query.unsqueeze(2) - prototypes.unsqueeze(1)).pow(2).sum(-1)

    monkeypatch.setattr(grader.protonet, 'prototype_logits', wrong_divisor)
    assert grader.run(['1b-0-hidden']) == (0, 8)
    assert 'FAIL: AssertionError' in capsys.readouterr().out


def test_gradients_as_a_dict_lose_the_points_of_2a_0_and_2a_1(capsys, monkeypatch):
    """Our own earlier mistake: a dict iterates over its keys, so `for grad in gradients`
    (the assignment's grader) meets strings."""
    inner_loop = grader.maml.MAML._inner_loop

    def dict_gradients(self, *args, **kwargs):
        parameters, accuracies, gradients = inner_loop(self, *args, **kwargs)
        return parameters, accuracies, dict(zip(parameters, gradients))

    monkeypatch.setattr(grader.maml.MAML, '_inner_loop', dict_gradients)
    assert grader.run(['2a-0-basic', '2a-1-basic']) == (0, 4)
    output = capsys.readouterr().out
    assert output.count('FAIL: AssertionError: gradients must be the sequence') == 2
