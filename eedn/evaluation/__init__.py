"""Evaluation: pure functions on stored per-exit outputs (policies, matched-cost numbers, risk control).
Imports core and runtime."""
