"""Core: the contracts, typed options and config, plugin registries, data and stored outputs, the early-exit model,
its cost and cache. Imports only eedn.runtime."""
