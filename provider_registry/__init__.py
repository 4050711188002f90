"""Providers, their GPUs, prices, liveness and latest metrics."""
