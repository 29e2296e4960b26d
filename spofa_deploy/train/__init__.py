"""The training loop, its hooks, multi-process training, and what a run records (stability, plots, TensorBoard)."""
