"""vwn_transform: turn an existing transformer into its Virtual Width Network form (arXiv 2511.11238).

>>> import vwn_transform
>>> sorted(vwn_transform.__all__)[:3]
['GHC', 'UnsupportedModelError', 'VWNConfig']
"""

from .config import UnsupportedModelError, VWNConfig
from .modules import GHC
from .widen import WidenPlan, plan, widen

__version__ = "0.1.0"

__all__ = ["GHC", "UnsupportedModelError", "VWNConfig", "WidenPlan", "plan", "widen", "__version__"]
