"""Unit tests of the algorithms, graded as in the assignment: `python grader.py [test_id]`.

Visible tests (`-basic`) run anywhere. Hidden tests (`-hidden`) compare with the solution module
(`--solution`, default reference.py: plain, loop-per-task implementations that share nothing with
the code under test but the equations) and run only where it is importable; elsewhere (the
students' copy, `python homework.py starter`) each is skipped in one line. Points come from
points.json. `--gradescope PATH` also writes Gradescope's results.json there.
"""
import importlib
import json
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

import maml
import omniglot
import protonet
import util

TESTS = []
POINTS = json.loads(Path(__file__).with_name('points.json').read_text())  # test id -> points
DEFAULT_SOLUTION = 'reference'
VISIBILITY = {False: 'visible', True: 'after_published'}  # Gradescope's, by hidden


def graded(test_id, title, max_seconds):
    """Registers a test function; it passes when it returns without raising in time. A hidden
    test (its id ends in -hidden, as the assignment's) takes the solution module as argument."""
    def register(function):
        TESTS.append((test_id, title, max_seconds, function))
        return function
    return register


def is_hidden(test_id):
    return test_id.endswith('-hidden')


def omniglot_batch(batch_size, num_way, num_support, num_query, seed=0):
    """A fixed batch of training tasks of the real Omniglot data, asked for with the keywords
    the assignment's grader uses."""
    loader = omniglot.get_omniglot_dataloader(
        split='train', batch_size=batch_size, num_way=num_way, num_support=num_support,
        num_query=num_query, num_tasks_per_epoch=batch_size, num_workers=1, seed=seed)
    return next(iter(loader))


# ----- the graded tests -----
@graded('1b-0-hidden', 'ProtoNet _step: loss and accuracies equal a plain implementation',
        max_seconds=60)
def test_protonet_step(solution):
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as log_dir:
        model = protonet.ProtoNet(0.001, log_dir, 'cpu')
    # Two tasks of more shots than ways: prototypes divided by anything but each class's count
    # (the number of classes, the number of tasks) give other numbers.
    task_batch = omniglot_batch(batch_size=2, num_way=5, num_support=7, num_query=6)
    loss, accuracy_support, accuracy_query = model._step(task_batch)
    expected = solution.protonet_step(solution.protonet_network_like(model._network), task_batch)
    assert loss.dim() == 0 and loss.requires_grad, 'the loss must be a 0-dim tensor with grad'
    assert isinstance(accuracy_support, np.float64) and isinstance(accuracy_query, np.float64)
    torch.testing.assert_close(loss, expected[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([accuracy_support, accuracy_query], expected[1:], atol=1e-12)


def maml_model():
    """The MAML configuration of the assignment's tests, seeded."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as log_dir:
        return maml.MAML(num_outputs=5, num_inner_steps=1, inner_lr=0.4, learn_inner_lrs=False,
                         outer_lr=0.001, log_dir=log_dir, device='cpu')


def maml_task(seed=0):
    """One 5-way 1-shot 15-query training task: (images, labels) of its support set."""
    images_support, labels_support, _, _ = omniglot_batch(1, 5, 1, 15, seed=seed)[0]
    return images_support, labels_support


def check_inner_loop_gradients(train):
    """_inner_loop's third value read as the assignment's grader reads it, `for grad in
    gradients`: the tensors torch.autograd.grad returns, one per meta-parameter in
    _meta_parameters order, requiring grad exactly when train."""
    model = maml_model()
    _, _, gradients = model._inner_loop(*maml_task(), train=train)
    assert isinstance(gradients, (tuple, list)), (
        f'gradients must be the sequence torch.autograd.grad returns, got a '
        f'{type(gradients).__name__}')
    shapes = [tuple(grad.shape) for grad in gradients]
    expected = [tuple(value.shape) for value in model._meta_parameters.values()]
    assert shapes == expected, f'gradient shapes {shapes}, expected {expected} (parameter order)'
    assert all(grad.requires_grad == train for grad in gradients), (
        f'with train={train}, every gradient must {"" if train else "not "}require grad')


@graded('2a-0-basic', 'MAML _inner_loop(train=False): no gradient requires grad',
        max_seconds=60)
def test_inner_loop_eval_gradients():
    check_inner_loop_gradients(train=False)


@graded('2a-1-basic', 'MAML _inner_loop(train=True): every gradient requires grad',
        max_seconds=60)
def test_inner_loop_train_gradients():
    check_inner_loop_gradients(train=True)


@graded('2a-2-basic', 'MAML _inner_loop: adapted parameter shapes and number of accuracies',
        max_seconds=60)
def test_inner_loop_shapes():
    expected = {'conv0': (32, 1, 3, 3), 'b0': (32,), 'conv1': (32, 32, 3, 3), 'b1': (32,),
                'conv2': (32, 32, 3, 3), 'b2': (32,), 'conv3': (32, 32, 3, 3), 'b3': (32,),
                'w4': (5, 32), 'b4': (5,)}
    for train in (False, True):
        parameters, accuracies, _ = maml_model()._inner_loop(*maml_task(), train=train)
        shapes = {key: tuple(value.shape) for key, value in parameters.items()}
        assert shapes == expected, f'train={train}: adapted shapes {shapes}, expected {expected}'
        assert len(accuracies) == 2, f'{len(accuracies)} accuracies for 1 inner step, expected 2'


@graded('2a-3-hidden', 'MAML _inner_loop: adapted parameters and accuracies equal a plain '
        'implementation', max_seconds=60)
def test_inner_loop_values(solution):
    # In float64: in float32 the convolution biases' gradients (zero in exact arithmetic, as
    # batch norm follows) are rounding noise of the size of the tolerance.
    for seed in range(2):
        images, labels = maml_task(seed)
        images = images.double()
        model = solution.maml_in_float64(maml_model())
        inner_lrs = {key: lr.item() for key, lr in model._inner_lrs.items()}  # float32's 0.4
        expected, expected_accuracies, _ = solution.maml_adapt(
            solution.leaf_copies(model._meta_parameters), inner_lrs, images, labels, 1,
            create_graph=False)
        for train in (False, True):
            parameters, accuracies, _ = model._inner_loop(images, labels, train=train)
            for key in solution.MAML_KEYS:
                torch.testing.assert_close(parameters[key].detach(), expected[key].detach(),
                                           rtol=1e-9, atol=1e-12, msg=lambda m: f'{key}: {m}')
            np.testing.assert_allclose(accuracies, expected_accuracies, atol=1e-12)


@graded('2b-0-basic', 'MAML _outer_step: 0-dim loss, support accuracies of shape (2,), '
        'float64 query accuracy', max_seconds=120)
def test_outer_step_types():
    task_batch = omniglot_batch(batch_size=2, num_way=5, num_support=1, num_query=15)
    for train in (True, False):
        loss, accuracies_support, accuracy_query = maml_model()._outer_step(task_batch, train)
        assert isinstance(loss, torch.Tensor) and loss.dim() == 0, 'the loss must be a 0-dim tensor'
        assert loss.requires_grad == train, f'train={train}: loss.requires_grad is wrong'
        assert isinstance(accuracies_support, np.ndarray) and accuracies_support.shape == (2,), (
            f'support accuracies must be a numpy array of shape (2,), got {accuracies_support!r}')
        assert type(accuracy_query) is np.float64, (
            f'the query accuracy must be a numpy float64, got {type(accuracy_query)}')


@graded('2b-1-hidden', 'MAML _outer_step: loss, accuracies and meta-gradient equal a plain '
        'implementation', max_seconds=300)
def test_outer_step_values(solution):
    task_batch = omniglot_batch(batch_size=4, num_way=5, num_support=1, num_query=15)
    model = maml_model()
    inner_lrs = dict.fromkeys(solution.MAML_KEYS, 0.4)
    expected = solution.maml_outer_step(solution.leaf_copies(model._meta_parameters),
                                         inner_lrs, task_batch, num_steps=1)
    loss, accuracies_support, accuracy_query = model._outer_step(task_batch, train=True)
    torch.testing.assert_close(loss, expected[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(accuracies_support, expected[1], atol=1e-12)
    np.testing.assert_allclose(accuracy_query, expected[2], atol=1e-12)
    # The meta-gradient, through the inner gradient (second order), matches too: in float64,
    # since float32 second derivatives through batch norm on 5 images keep only ~3 digits.
    model_64 = solution.maml_in_float64(maml_model())
    batch_64 = solution.to_float64(task_batch)
    weights = solution.leaf_copies(model_64._meta_parameters)
    model_64._outer_step(batch_64, train=True)[0].backward()
    solution.maml_outer_step(weights, inner_lrs, batch_64, num_steps=1)[0].backward()
    for key, weight in weights.items():
        torch.testing.assert_close(model_64._meta_parameters[key].grad, weight.grad,
                                   rtol=1e-6, atol=1e-9, msg=lambda m: f'd loss / d {key}: {m}')
    with torch.no_grad():
        loss_eval, accuracies_eval, query_eval = model._outer_step(task_batch, train=False)
    torch.testing.assert_close(loss_eval, expected[0].detach(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(accuracies_eval, expected[1], atol=1e-12)
    np.testing.assert_allclose(query_eval, expected[2], atol=1e-12)


def import_solution(name):
    """The solution module hidden tests compare with, or None where it is not importable."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name != name:  # the solution is there, but something it imports is not
            raise
        return None


def run_test(function, arguments, max_seconds):
    """Runs one test: (passed, seconds, the failure's line or None)."""
    start = time.perf_counter()
    try:
        function(*arguments)
        failure = None
    except Exception as error:  # a failed test is reported, then grading goes on
        failure = f'FAIL: {type(error).__name__}: {error}'
    seconds = time.perf_counter() - start
    if failure is None and seconds > max_seconds:
        failure = f'FAIL: took longer than the {max_seconds} seconds allowed'
    return failure is None, seconds, failure


def gradescope_test(test_id, title, score, failure):
    """One test's entry of Gradescope's results.json."""
    return {'name': f'{test_id}: {title}', 'score': score, 'max_score': POINTS[test_id],
            'status': 'failed' if failure else 'passed',
            'visibility': VISIBILITY[is_hidden(test_id)], 'output': failure or 'passed'}


def run(test_ids, solution_name=DEFAULT_SOLUTION, gradescope=None):
    """Runs the chosen tests with the assignment's framing, hidden ones only where the solution
    imports; writes Gradescope's results.json to the path `gradescope` if given; returns
    (points got, points max) of the tests run."""
    solution = import_solution(solution_name)
    got = total = 0
    entries, skipped = [], []
    for test_id, title, max_seconds, function in TESTS:
        if test_ids and test_id not in test_ids:
            continue
        points = POINTS[test_id]
        if is_hidden(test_id) and solution is None:
            skipped.append(f'----- SKIP {test_id}: {title} [hidden, {points} points: runs only '
                           f'where the solution module {solution_name} imports]')
            print(skipped[-1])
            continue
        print(f'----- START {test_id}: {title}')
        arguments = (solution,) if is_hidden(test_id) else ()
        passed, seconds, failure = run_test(function, arguments, max_seconds)
        if failure:
            print(failure)
        got += points if passed else 0
        total += points
        print(f'----- END {test_id} [took {timedelta(seconds=seconds)} '
              f'(max allowed {max_seconds} seconds), {points if passed else 0}/{points} points]')
        entries.append(gradescope_test(test_id, title, points if passed else 0, failure))
    print(f'========== END GRADING [{got}/{total} points]')
    if gradescope:
        Path(gradescope).write_text(json.dumps(
            {'score': got, 'output': '\n'.join(skipped), 'tests': entries}, indent=2) + '\n')
    return got, total


def parse_args(argv=None):
    """The flags: test ids to run (all when none is given; an unknown one is one line and exit
    2), --solution and --gradescope."""
    known = sorted(test[0] for test in TESTS)
    parser = util.argument_parser(description=__doc__.split('\n')[0])
    parser.add_argument('test_ids', nargs='*', default=[], metavar='test_id',
                        help=f"tests to run: {', '.join(known)}")
    parser.add_argument('--solution', default=DEFAULT_SOLUTION, metavar='MODULE',
                        help='the solution module hidden tests compare with; where it does not '
                             'import, they are skipped')
    parser.add_argument('--gradescope', metavar='PATH',
                        help="also write Gradescope's results.json to PATH")
    args = parser.parse_args(argv)
    test_ids = args.test_ids
    unknown = [test_id for test_id in test_ids if test_id not in known]
    if unknown:
        print(f"error: unknown test id {', '.join(unknown)}; known: {', '.join(known)}",
              file=sys.stderr)
        sys.exit(2)
    return args


if __name__ == '__main__':
    arguments = parse_args()
    got, total = run(arguments.test_ids, arguments.solution, arguments.gradescope)
    sys.exit(0 if got == total else 1)
