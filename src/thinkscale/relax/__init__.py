"""Relaxed data-parallel training (the BAGUA system) on torch.distributed.

    from thinkscale.relax import DataParallel, algorithms
    model = DataParallel(module, optimizer, algorithm="bytegrad")
"""
from . import algorithms, quantize
from .comm import CommunicationError, end_process_group, exit_process
from .wrapper import DataParallel

__all__ = ["DataParallel", "algorithms", "quantize", "CommunicationError", "end_process_group", "exit_process"]
