"""CPU thread policy for the engine's forward: small elementwise work on one thread, GEMMs on all of them.

A decode step of 64 rows is ~2,000 small tensor ops (norms, rope, masks, residual adds over 64 x 640 floats) around
~130 GEMMs. PyTorch splits any op over 32k elements across every intra-op thread, and with
OMP_WAIT_POLICY=PASSIVE (what a shared machine needs, see `engine`) each split wakes sleeping threads: measured on
this 2-core VM, a [64, 640] multiply takes 70 us on 2 threads and 6 us on one, while a [64, 640] x [640, 1024] GEMM
takes 470 us on 2 threads and 780 us on one. So a small step runs with one thread and widens to all threads only
around the GEMMs (`wide()`); `omp_set_num_threads` is a per-thread setting costing well under a microsecond, and only
the scheduler thread runs forwards. Steps with many tokens (prefill) keep every thread throughout.
"""

from __future__ import annotations

import contextlib

import torch


class ThreadPolicy:
    SMALL_STEP_TOKENS = 256  # steps with fewer tokens run their elementwise work single-threaded

    def __init__(self, device: torch.device):
        self.many = torch.get_num_threads()
        self.enabled = device.type == "cpu" and self.many > 1
        self.narrow = False  # inside a small step: one thread unless widened

    @contextlib.contextmanager
    def step(self, n_tokens: int):
        """Around one forward (and its token choice) of `n_tokens` tokens."""
        if not self.enabled or n_tokens >= self.SMALL_STEP_TOKENS:
            yield
            return
        self.many = torch.get_num_threads()  # whatever the process set last (e.g. torch.set_num_threads by a user)
        torch.set_num_threads(1)
        self.narrow = True
        try:
            yield
        finally:
            self.narrow = False
            torch.set_num_threads(self.many)

    @contextlib.contextmanager
    def wide(self):
        """Around a GEMM-sized op inside a step: all threads."""
        if not self.narrow:
            yield
            return
        torch.set_num_threads(self.many)
        try:
            yield
        finally:
            torch.set_num_threads(1)


NO_POLICY = ThreadPolicy(torch.device("meta"))
