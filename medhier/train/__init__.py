"""The Ray Train harness every task trains through (epochs, checkpoints, resume, early stopping,
per-epoch reports), self-describing checkpoints, and Ray Tune searches over it."""
