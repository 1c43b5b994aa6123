"""Relaxed data-parallel training (the BAGUA system) on torch.distributed."""
