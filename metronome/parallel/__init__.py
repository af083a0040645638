"""Many processes as one model: tensor parallelism (tp.py) over torch.distributed groups (group.py)."""
