"""mamlpp_stability.py: the one command runs every method and seed, draws the figure from the
logged validations, and does no work the second time."""
import re
import subprocess
import sys
from pathlib import Path

import mamlpp_stability

ROOT = Path(__file__).resolve().parents[1]
TINY = ['--', '--num_train_iterations', '2', '--batch_size', '1', '--num_query', '1',
        '--num_inner_steps', '1']


def run(tmp_path):
    return subprocess.run([sys.executable, 'mamlpp_stability.py', '--seeds', '0', '1',
                           '--log_dir', str(tmp_path / 'logs'),
                           '--figure', str(tmp_path / 'figure.png'), *TINY],
                          cwd=ROOT, capture_output=True, text=True)


def test_one_command_runs_both_methods_over_the_seeds_then_skips_them(tmp_path):
    first = run(tmp_path)
    assert first.returncode == 0, first.stderr
    assert (tmp_path / 'figure.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    runs = sorted(p.name for p in (tmp_path / 'logs').iterdir())
    assert runs == ['MAML++.seed_0', 'MAML++.seed_1', 'MAML.seed_0', 'MAML.seed_1']
    assert first.stdout.count('--mamlpp') == 2 and first.stdout.count('maml.py') == 4
    for method, seed, accuracy in re.findall(r'^(MAML\+*) seed (\d): last validation '
                                             r'accuracy ([\d.]+) at iteration 0$',
                                             first.stdout, re.M):
        steps, accuracies = mamlpp_stability.validation_curve(
            tmp_path / 'logs' / f'{method}.seed_{seed}')
        assert steps == [0] and f'{accuracies[0]:.3f}' == accuracy
    second = run(tmp_path)
    assert second.returncode == 0 and 'maml.py' not in second.stdout
    assert second.stdout.count('done, skipped') == 4


def test_a_failing_run_is_a_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, 'mamlpp_stability.py', '--seeds', '0',
                             '--log_dir', str(tmp_path), '--', '--num_inner_steps', '-1'],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith('error: maml.py failed for')
