"""maxnorm-optim: exact, fast max-norm weight constraints for any PyTorch optimizer."""

from ._options import PER_UNIT
from ._param_groups import max_norm_param_groups
from ._projection import max_norm_
from ._wrapper import MaxNormWrapper

__version__ = "0.2.0"

__all__ = ["PER_UNIT", "MaxNormWrapper", "__version__", "max_norm_", "max_norm_param_groups"]
