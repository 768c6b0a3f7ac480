"""Small helpers shared by every script: accuracy, devices, user errors, atomic saves,
downloads."""
import argparse
import contextlib
import hashlib
import json
import os
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm


TORCHRUN_ERROR_WAIT_SECONDS = 5  # torchrun checks its processes every 0.1 s
CUBLAS_WORKSPACE = ':4096:8'  # what deterministic cuBLAS needs (CUDA's reproducibility notes)
MPS_BF16_MIN_MACOS = (14, 0)
BF16_MIN_CAPABILITY = 8  # bfloat16 arithmetic from Ampere (compute capability 8.0) on
DOWNLOAD_TIMEOUT_SECONDS = 60  # a stalled connection is an error, not a hang
DOWNLOAD_FAILED = 'could not download'  # how a download's UserError begins
MIN_PYTHON = (3, 11)  # what requirements.txt installs on (numpy 2.4, Pillow 13, matplotlib 3.11)
# What ends a run early, its checkpoint saved: a terminal's Ctrl-C, what spot machines,
# notebook services and schedulers send before they stop a job, what clusters send before a
# time limit (Slurm's --signal=USR1@SECONDS).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def check_python(version):
    """Exits with one line and status 2 on a Python older than MIN_PYTHON, where the pinned
    requirements do not install and the code would fail later, deep in a call (zip(strict=...))
    instead. Called as util is imported, so by every script, the grader and the tests."""
    if tuple(version[:2]) < MIN_PYTHON:
        print(f'error: Python {version[0]}.{version[1]} is too old; this project and its pinned '
              f'requirements need Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer',
              file=sys.stderr)
        sys.exit(2)


check_python(sys.version_info)


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing data, wrong checkpoint).

    `cli` prints it as one line and exits with status 2; bugs still raise normally.
    """


class Stopped(Exception):
    """A run stopped by one of STOP_SIGNALS after saving its work; `cli` prints the message
    (where RANK is 0, once under torchrun) and exits with status 128 + the signal's number,
    as a shell reports a process that the signal ended (SIGTERM 143, SIGINT 130, SIGUSR1 138).
    """

    def __init__(self, message, signum):
        super().__init__(message)
        self.status = 128 + signum


@contextlib.contextmanager
def on_stop_signals(handler):
    """Calls handler(signum) on each of STOP_SIGNALS in the block, instead of ending the
    process; the previous handlers come back after it. Main thread only, as Python's signals."""
    previous = {signum: signal.signal(signum, lambda signum, frame: handler(signum))
                for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def score(logits, labels):
    """Returns the mean accuracy of a model's predictions on a set of examples.

    Args:
        logits (torch.Tensor): model predicted logits
            shape (examples, classes)
        labels (torch.Tensor): classification labels from 0 to num_classes - 1
            shape (examples,)
    """
    assert logits.dim() == 2
    assert labels.dim() == 1
    assert logits.shape[0] == labels.shape[0]
    y = torch.argmax(logits, dim=-1) == labels
    y = y.type(torch.float)
    return torch.mean(y).item()


def accuracy_per_task(logits, labels):
    """Accuracy of each task of a batch (each row of logits), a float32 tensor of shape
    logits.shape[:-2] on logits' device: the float32 mean that score takes, so the two give
    the same numbers. It stays on the device; `to_host` reads it when it is needed.

    Args:
        logits (torch.Tensor): shape (num_tasks, ..., examples, classes)
        labels (torch.Tensor): int64, shape (num_tasks, examples), or one that broadcasts
            against logits.shape[:-1]
    """
    return (logits.argmax(-1) == labels).float().mean(-1)


def to_host(values):
    """A tensor of metrics as a numpy float64 array: one copy to the host, then float64 there
    (a device may have no float64, as Apple's MPS)."""
    return values.detach().cpu().numpy().astype(np.float64)


def host_to_device(tensor, device):
    """A host tensor (often a temporary) on the device, without the host waiting where that is
    safe: on CUDA, whose copy from pageable memory is staged before it returns. Elsewhere (MPS
    may read the source after it was freed: pytorch/pytorch#139550) the copy completes first."""
    return tensor.to(device, non_blocking=device.type == 'cuda')


def mean_and_ci95(values):
    """Mean and half-width of the 95% confidence interval, 1.96 * std / sqrt(n), as the course."""
    values = np.asarray(values, dtype=np.float64)
    return values.mean(), 1.96 * values.std() / np.sqrt(len(values))


def get_device(name):
    """Maps the --device flag to a torch.device: 'gpu' is CUDA, else Apple MPS, else the CPU."""
    if name == 'cpu':
        return torch.device('cpu')
    if name == 'gpu':
        if torch.cuda.is_available():
            return torch.device('cuda')
        if torch.backends.mps.is_available():
            return torch.device('mps')
        print(f'No GPU found (neither CUDA nor MPS): {no_cuda_reason()}; using the CPU.')
        return torch.device('cpu')
    raise UserError(f"unknown device '{name}'; use --device cpu or --device gpu")


def no_cuda_reason():
    """Why CUDA is not available, in words: a torch built without CUDA, or CUDA's own reason
    as it fails to start (no driver, a driver older than the build's torch.version.cuda, no
    device), so that a mismatched wheel is seen before a run trains slowly on the CPU."""
    if torch.version.cuda is None:
        return f'torch {torch.__version__} is built without CUDA (install a CUDA build of it)'
    try:
        torch.cuda.init()
    except RuntimeError as error:
        return (f'torch {torch.__version__} is built for CUDA {torch.version.cuda}, which does '
                f'not start: {str(error).splitlines()[0]}')
    return 'CUDA starts but finds no device'


def make_deterministic(device, amp):
    """On CUDA, the same seed gives the same weights: deterministic cuDNN and cuBLAS
    algorithms (a convolution's backward is otherwise free to sum in any order) and, for
    float32 training (--amp none), no TF32, so that matrix products and convolutions round as
    float32 does on the CPU. Elsewhere nothing to do: CPU and MPS kernels repeat themselves.

    Args:
        device (torch.device): the training device
        amp (str): --amp; with 'bf16' products run in bfloat16 anyway, and TF32 is left on
    """
    if device.type != 'cuda':
        return
    os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', CUBLAS_WORKSPACE)  # before cuBLAS starts
    torch.use_deterministic_algorithms(True, warn_only=True)
    # Deterministic mode would also fill each new tensor (one more kernel per allocation);
    # every tensor here is written before it is read.
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    if amp == 'none':
        torch.backends.cuda.matmul.fp32_precision = 'ieee'
        # The old flag too, first (it resets conv's): inductor's max-autotune convolution
        # templates (--compile) still read it, and reading it raises while it disagrees with
        # the new ones.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.conv.fp32_precision = 'ieee'


def bf16_problem(device):
    """Why device has no bfloat16 arithmetic, in words, or None where it has: a CUDA GPU of
    compute capability below 8.0 (such as the T4 and V100), where PyTorch emulates it, slower
    than float32, or fails; Apple's MPS before macOS 14. What check_amp refuses --amp bf16 for,
    and what tests/test_gpu.py and the benchmark skip bfloat16 for."""
    if device.type == 'mps' and not torch.backends.mps.is_macos_or_newer(*MPS_BF16_MIN_MACOS):
        return 'bfloat16 on Apple GPUs needs macOS 14 or newer'
    if device.type != 'cuda':
        return None
    major, minor = torch.cuda.get_device_capability(device)
    if major < BF16_MIN_CAPABILITY:
        return (f'{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) '
                f'has no bfloat16 arithmetic')
    return None


def check_amp(device, amp):
    """One line for --amp bf16 where the device has no bfloat16 (bf16_problem)."""
    problem = bf16_problem(device) if amp == 'bf16' else None
    if problem:
        raise UserError(f'{problem}; use --amp none')


def check_positive(**values):
    """Raises UserError for the first flag whose value is not positive."""
    for name, value in values.items():
        if not value > 0:
            raise UserError(f'--{name} must be positive, got {value}; pass a value above 0')


def seed_everything(seed):
    """Seeds torch (initial weights) and numpy; task sampling has generators of its own."""
    torch.manual_seed(seed)
    np.random.seed(seed)


@contextlib.contextmanager
def atomic_file(path, mode='wb'):
    """Opens a temp file in path's folder (created if missing) for writing, and renames it to
    path when the block ends; if the block raises, or Ctrl-C stops it, the temp file goes and
    whatever was at path stays intact: never a half-written file.

    Args:
        path (str or Path): the file to write
        mode (str): 'wb' or 'w'
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.tmp_')
    try:
        with os.fdopen(fd, mode) as file:
            yield file
        os.replace(tmp, path)
    except BaseException:  # a signal's KeyboardInterrupt can come after the rename, too
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def copy_into(live, saved):
    """Copies each tensor of saved into the live tensor of the same key, in place: an optimizer
    holding the live tensors goes on training them. (Swapping in the saved tensors, as the
    original assignment's MAML did, leaves the optimizer updating orphans: training stops.)

    Args:
        live (dict[str, Tensor]): the learner's tensors, any device
        saved (dict[str, Tensor]): a checkpoint's, same keys and shapes
    """
    with torch.no_grad():
        for key, value in live.items():
            value.copy_(saved[key])


def atomic_save(obj, path):
    """torch.save(obj, path) through atomic_file."""
    with atomic_file(path) as file:
        torch.save(obj, file)


def atomic_write_json(obj, path):
    """obj as indented JSON at path, through atomic_file."""
    with atomic_file(path, 'w') as file:
        json.dump(obj, file, indent=1)


def argument_parser(*args, **kwargs):
    """argparse.ArgumentParser(*args, **kwargs) whose --help shows each flag's default: every
    script's parser."""
    return argparse.ArgumentParser(*args, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                   **kwargs)


def cli(main):
    """Runs main(); a UserError becomes one line on stderr and exit status 2.

    Under torchrun (distributed.py) rank 0 alone prints: the others' stdout goes to /dev/null.
    The processes meet the same UserError (same flags, data and checkpoints): each machine's
    first process (LOCAL_RANK 0) prints it at once and exits, and torchrun then stops the others
    while they wait, so the line appears once. A process whose error is its own (still running
    after the wait) prints it too.
    """
    if os.environ.get('RANK', '0') != '0':
        sys.stdout = open(os.devnull, 'w')
    try:
        main()
    except UserError as error:
        if os.environ.get('LOCAL_RANK', '0') != '0':
            time.sleep(TORCHRUN_ERROR_WAIT_SECONDS)
        print(f'error: {error}', file=sys.stderr)
        sys.exit(2)
    except Stopped as stop:
        if os.environ.get('RANK', '0') == '0':
            print(stop, file=sys.stderr)
        sys.exit(stop.status)
    except KeyboardInterrupt:
        print('Interrupted; the last checkpoint written is intact.', file=sys.stderr)
        sys.exit(130)


def download(url, path, md5=None, fix=''):
    """Downloads url to path with a progress bar; checks md5 if given; never leaves a partial file.

    Args:
        url (str): http(s):// or file:// URL
        path (Path): where the file goes; its folder must exist
        md5 (str): expected hex digest, or None
        fix (str): ends the error message: how the user can supply the file another way
    """
    try:
        with (urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_SECONDS) as response,
              atomic_file(path) as out):
            size = int(response.headers.get('Content-Length') or 0) or None
            digest = hashlib.md5()
            with tqdm(total=size, unit='B', unit_scale=True, desc=path.name) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            if md5 is not None and digest.hexdigest() != md5:
                raise UserError(f'{url} has md5 {digest.hexdigest()}, expected {md5}: the '
                                f'download is corrupt or not the official file; run again, or '
                                f'{fix}')
    except (urllib.error.URLError, OSError) as error:
        raise UserError(f'{DOWNLOAD_FAILED} {url} ({error}); check the network, '
                        f'or {fix}') from None


def git_commit():
    """The commit of the checkout this code runs from (with '+' when files differ from it), or
    None where there is no git or no checkout: what a run's record names its code by."""
    import subprocess
    folder = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=folder, capture_output=True,
                                text=True, timeout=10)
        changed = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'],
                                 cwd=folder, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode:
        return None
    return commit.stdout.strip() + ('+' if changed.stdout.strip() else '')


def source_url(variable, official_url):
    """(base URL, is official): official_url, or the mirror that the environment variable names
    (a folder or a URL), read at call time."""
    mirror = os.environ.get(variable)
    if not mirror:
        return official_url, True
    if '://' not in mirror:
        mirror = Path(mirror).resolve().as_uri()
    return mirror.rstrip('/'), False
