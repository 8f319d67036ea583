"""Runtime: what every layer may use and that knows nothing of early exits (errors, atomic I/O, progress,
torch.distributed, precision, seeding)."""
