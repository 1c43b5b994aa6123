"""Shared test settings: one intra-op thread in the pytest process (the machine is small and shared;
oversubscribed threads make decoding an order of magnitude slower). Spawned ranks set their own."""
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)
