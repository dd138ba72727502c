"""Workloads that run inside Noisy Student jobs: data, artifacts, train, label, balance."""
