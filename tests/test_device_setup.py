"""What the scripts decide for a GPU, checked on the CPU: checkpoints load on the host, CUDA
runs repeat themselves (deterministic algorithms, no TF32 in float32), bf16 is refused in one
line on GPUs without it (and tests/test_gpu.py skips it there), and torchrun's NCCL group binds
its GPU and lets the data be prepared first. tests/test_gpu.py runs the same on a real GPU."""
import datetime
import re

import pytest
import torch
import torch.distributed as dist

import distributed
import maml
import protonet
import test_gpu
import util


def adam_with_state(model):
    """model's optimizer after one step, so that it holds step counts and moments."""
    for value in model._optimizer.param_groups[0]['params']:
        value.grad = torch.ones_like(value)
    model._optimizer.step()
    return model


# The 'meta' device holds no data, so nn.Module warns that loading weights there copies nothing.
@pytest.mark.filterwarnings('ignore:for .*copying from a non-meta parameter:UserWarning')
@pytest.mark.parametrize('build', [
    lambda log_dir, device: maml.MAML(5, 1, 0.4, True, 0.001, log_dir, device),
    lambda log_dir, device: protonet.ProtoNet(0.001, log_dir, device)])
def test_a_checkpoint_loads_on_the_host_and_adam_keeps_its_step_counts_there(build, tmp_path):
    """On the 'meta' device (a stand-in for a device without fused Adam here): the weights and
    Adam's moments move to the learner's device, Adam's step counts stay CPU tensors, which a
    plain or foreach Adam reads on the host (it would read each back from a device in every
    step). The checkpoint, written on the CPU, holds fused Adam's flags: the learner's own win.
    Fused Adam (CPU, CUDA, MPS) keeps them beside the weights: tests/test_training.py."""
    adam_with_state(build(str(tmp_path), 'cpu'))._save(0)
    learner = build(str(tmp_path), torch.device('meta'))
    learner.load(0)
    states = learner._optimizer.state_dict()['state'].values()
    assert states and all(state['step'].device.type == 'cpu' for state in states)
    assert all(state['exp_avg'].device.type == 'meta' for state in states)
    assert not any(group['fused'] for group in learner._optimizer.param_groups)


# The global flags that make_deterministic sets, as (namespace, name); the old cuDNN TF32 flag
# first, as setting it resets the new ones of convolutions and recurrent layers.
BACKEND_FLAGS = [(torch.backends.cudnn, 'allow_tf32'), (torch.backends.cudnn, 'deterministic'),
                 (torch.backends.cudnn, 'benchmark'),
                 (torch.backends.cuda.matmul, 'fp32_precision'),
                 (torch.backends.cudnn.conv, 'fp32_precision'),
                 (torch.backends.cudnn.rnn, 'fp32_precision'),
                 (torch.utils.deterministic, 'fill_uninitialized_memory')]


@pytest.fixture
def restored_backends():
    """Puts back the global flags that make_deterministic sets."""
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    flags = [getattr(namespace, name) for namespace, name in BACKEND_FLAGS]
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    for (namespace, name), value in zip(BACKEND_FLAGS, flags, strict=True):
        setattr(namespace, name, value)


@pytest.mark.parametrize('amp, precision', [('none', 'ieee'), ('bf16', 'tf32')])
def test_cuda_runs_are_deterministic_and_float32_has_no_tf32(amp, precision, restored_backends,
                                                            monkeypatch):
    monkeypatch.delenv('CUBLAS_WORKSPACE_CONFIG', raising=False)
    torch.backends.cudnn.conv.fp32_precision = 'tf32'
    torch.backends.cuda.matmul.fp32_precision = 'tf32'
    util.make_deterministic(torch.device('cuda'), amp)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert torch.backends.cudnn.conv.fp32_precision == precision
    assert torch.backends.cuda.matmul.fp32_precision == precision
    assert util.os.environ['CUBLAS_WORKSPACE_CONFIG'] == ':4096:8'
    assert not torch.utils.deterministic.fill_uninitialized_memory  # no fill kernel per tensor


@pytest.mark.parametrize('amp, allowed', [('none', False), ('bf16', True)])
def test_the_old_tf32_flag_that_compiled_convolutions_read_agrees(amp, allowed,
                                                                  restored_backends):
    """Inductor's max-autotune convolution templates (--compile) read the old flag, which
    raises while it disagrees with the new ones."""
    util.make_deterministic(torch.device('cuda'), amp)
    assert torch.backends.cudnn.allow_tf32 is allowed


def test_the_cpu_is_left_as_it_is(restored_backends):
    util.make_deterministic(torch.device('cpu'), 'none')
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize('capability, refused', [((7, 5), True), ((8, 0), False)])
def test_bf16_on_a_gpu_without_it_is_one_line(capability, refused, monkeypatch, capsys,
                                              tmp_path):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: 'Tesla T4')
    monkeypatch.setattr(util, 'make_deterministic', lambda *args: None)
    if not refused:
        util.check_amp(torch.device('cuda'), 'bf16')
        return
    args = protonet.parse_args(['--device', 'gpu', '--amp', 'bf16', '--log_dir', str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        util.cli(lambda: protonet.main(args))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ('error: Tesla T4 (compute capability 7.5) has no '
                                       'bfloat16 arithmetic; use --amp none\n')
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize('macos_14, refused', [(False, True), (True, False)])
def test_bf16_on_an_apple_gpu_before_macos_14_is_one_line(macos_14, refused, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, 'is_macos_or_newer',
                        lambda major, minor: macos_14 and (major, minor) <= (14, 0))
    if not refused:
        util.check_amp(torch.device('mps'), 'bf16')
        return
    with pytest.raises(util.UserError, match='^bfloat16 on Apple GPUs needs macOS 14 or newer; '
                                             'use --amp none$'):
        util.check_amp(torch.device('mps'), 'bf16')


@pytest.fixture
def gpu_without_bf16(monkeypatch):
    """This machine as one with a T4 (compute capability 7.5) and an Apple GPU on macOS 13."""
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: 'Tesla T4')
    monkeypatch.setattr(torch.backends.mps, 'is_macos_or_newer', lambda major, minor: False)


@pytest.mark.parametrize('device, reason', [
    ('cuda', 'Tesla T4 (compute capability 7.5) has no bfloat16 arithmetic'),
    ('mps', 'bfloat16 on Apple GPUs needs macOS 14 or newer')])
def test_the_gpu_tests_skip_bf16_where_the_scripts_refuse_it(device, reason, gpu_without_bf16):
    with pytest.raises(pytest.skip.Exception, match=re.escape(reason)):
        test_gpu.skip_where_bf16_is_refused('bf16', device)
    test_gpu.skip_where_bf16_is_refused('none', device)  # float32 runs everywhere
    test_gpu.skip_where_bf16_is_refused(None, device)  # a case without --amp


def test_the_gpu_tests_run_bf16_where_it_is_native(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: (8, 0))
    monkeypatch.setattr(torch.backends.mps, 'is_macos_or_newer', lambda major, minor: True)
    for device in 'cuda', 'mps', 'cpu':
        test_gpu.skip_where_bf16_is_refused('bf16', device)


@pytest.fixture
def torchrun_on_gpus(monkeypatch):
    """This process as torchrun's second process on a machine of two GPUs; the process group
    calls recorded, not made."""
    for name, value in (('RANK', '1'), ('WORLD_SIZE', '2'), ('LOCAL_RANK', '1')):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    monkeypatch.setattr(torch.cuda, 'set_device', lambda device: None)
    calls = []
    monkeypatch.setattr(dist, 'init_process_group', lambda *args, **kwargs: calls.append(
        ('init', args, kwargs)))
    monkeypatch.setattr(dist, 'new_group', lambda **kwargs: calls.append(('group', kwargs))
                        or 'data group')
    monkeypatch.setattr(dist, 'barrier', lambda group=None: calls.append(('barrier', group)))
    monkeypatch.setattr(distributed.atexit, 'register', lambda function: None)
    return calls


def test_nccl_binds_this_process_gpu(torchrun_on_gpus):
    assert distributed.setup(torch.device('cuda')) == torch.device('cuda', 1)
    assert torchrun_on_gpus == [('init', ('nccl',), {'device_id': torch.device('cuda', 1)})]


@pytest.mark.parametrize('local_rank, order', [('0', ['group', 'prepare', 'barrier']),
                                               ('1', ['group', 'barrier', 'prepare'])])
def test_the_data_is_prepared_first_on_a_cpu_group_that_waits_an_hour(
        local_rank, order, torchrun_on_gpus, monkeypatch):
    monkeypatch.setenv('LOCAL_RANK', local_rank)
    with distributed.local_main_first():
        torchrun_on_gpus.append(('prepare',))
    assert [call[0] for call in torchrun_on_gpus] == order
    assert torchrun_on_gpus[0][1] == {'backend': 'gloo', 'timeout': distributed.DATA_TIMEOUT}
    assert distributed.DATA_TIMEOUT >= datetime.timedelta(hours=1)
    assert ('barrier', 'data group') in torchrun_on_gpus
