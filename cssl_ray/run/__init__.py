"""One training run in one process: the loop, the paper's schedule, the joint protocol, checkpoints."""
