"""Early decoding: read a layer's residual stream (or a component's write) as if it were the last."""

from mechprobe.lens._logit import logit_lens
from mechprobe.lens._result import LensResult

__all__ = ["LensResult", "logit_lens"]
