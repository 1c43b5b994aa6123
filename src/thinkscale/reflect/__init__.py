"""The reflective generative model (MetaStone-S1): a policy LM plus an SPRM head on its own hidden
states that scores each reasoning step, trained from outcome reward alone, and test-time scaling by
sampling k trajectories and keeping the best."""
from .candidate import Candidate

__all__ = ["Candidate"]
