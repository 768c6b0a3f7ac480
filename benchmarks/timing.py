"""Measuring: the median time of a step after warm-up, and the peak memory while it ran.

Memory is the peak resident set size of this process (Linux VmHWM, reset before each
measurement through /proc/self/clear_refs, after glibc's heap gave its free memory back to
the system); on CUDA, the peak of allocated GPU memory. Elsewhere (a Mac, Windows) there is no
peak to reset, and the table says n/a.
"""
import ctypes
import gc
import statistics
import sys
import time
from dataclasses import dataclass

import torch


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    elif device.type == 'mps':
        torch.mps.synchronize()


def measures_memory(device):
    """Whether memory_mib has a figure for device: on CUDA, or on Linux (its /proc)."""
    return device.type == 'cuda' or sys.platform.startswith('linux')


def reset_peak_memory(device):
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
        return
    if not measures_memory(device):
        return
    ctypes.CDLL(None).malloc_trim(0)  # glibc: free heap memory back to the system
    with open('/proc/self/clear_refs', 'w') as clear_refs:
        clear_refs.write('5')  # resets VmHWM to the current resident set size


def memory_mib(device, peak=True):
    """The peak (else current) resident set size of this process, or allocated CUDA memory;
    None where measures_memory says there is no such figure."""
    if not measures_memory(device):
        return None
    if device.type == 'cuda':
        return (torch.cuda.max_memory_allocated if peak else torch.cuda.memory_allocated)(
            device) / 2 ** 20
    field = 'VmHWM:' if peak else 'VmRSS:'
    with open('/proc/self/status') as status:
        line = next(line for line in status if line.startswith(field))
    return int(line.split()[1]) / 1024


def exhaust(iterable):
    for _ in iterable:
        pass


@dataclass
class Result:
    """One cell of the table: a number (seconds or tasks/s) and the peak memory in MiB (None:
    not measured)."""
    value: float
    memory: float


def measure(step, warmup, repeats, device, per=1):
    """Runs step() warmup times, then repeats timed times.

    Returns:
        Result: median seconds of a call divided by per, and the peak memory while timed
    """
    for _ in range(warmup):
        step()
    reset_peak_memory(device)
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return Result(statistics.median(seconds) / per, memory_mib(device))
