"""Pipeline: the run from a config to a published run directory, comparisons, and the library API on top.
Imports everything below it."""
