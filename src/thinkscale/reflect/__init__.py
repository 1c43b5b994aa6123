"""The reflective generative model (MetaStone-S1): a policy LM plus an SPRM head on its own hidden
states that scores each reasoning step, trained from outcome reward alone, and test-time scaling by
sampling k trajectories and keeping the best."""
from .candidate import Candidate
from .head import SPRMHead
from .loss import spr_loss, trajectory_score
from .steps import Delimiter, delimiter_token_ids, step_mask
from .model import ReflectConfig, ReflectiveModel
from .generate import sample
from .scoring import rescore, score_sequences
from .select import EFFORT_K, HEAD_FALLBACK, HEAD_STRATEGIES, STRATEGIES, choosing_strategy, effort_to_k, select
from .evaluate import EvalConfig  # evaluate() itself: thinkscale.reflect.evaluate.evaluate

__all__ = ["Candidate"]
__all__ += ["select", "STRATEGIES", "EFFORT_K", "effort_to_k", "choosing_strategy", "HEAD_STRATEGIES", "HEAD_FALLBACK"]
__all__ += ["EvalConfig"]
__all__ += ["SPRMHead", "spr_loss", "trajectory_score", "step_mask", "delimiter_token_ids", "Delimiter"]
__all__ += ["ReflectiveModel", "ReflectConfig", "sample", "rescore", "score_sequences"]
