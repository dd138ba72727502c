"""Workloads of a Noisy Student run: the entry points that TorchX jobs start, and their TorchX components."""

import os

# Workload processes share their cores with others (label replicas side by side, other jobs). OpenMP
# threads that spin while they wait for a descheduled peer then cost far more than they gain: on the
# 2-core development machine under load, a 2-thread training step ran at 72 img/s spinning and
# 675 img/s passive (1 thread: 490). Set before torch loads its OpenMP runtime; a user's choice wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
