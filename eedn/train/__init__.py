"""Training: stage 0 (the backbone), frozen-feature extraction and the shared head-training helpers strategies use.
Imports core and runtime."""
