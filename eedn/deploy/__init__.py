"""Deployment: real early-exit inference, prediction, benchmarks and export of finished runs."""
