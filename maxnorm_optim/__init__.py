"""maxnorm-optim: exact, fast max-norm weight constraints for any PyTorch optimizer."""

from .param_groups import max_norm_param_groups
from .projection import max_norm_
from .validation import PER_UNIT
from .wrapper import MaxNormWrapper

__version__ = "0.1.0"

__all__ = ["PER_UNIT", "MaxNormWrapper", "__version__", "max_norm_", "max_norm_param_groups"]
