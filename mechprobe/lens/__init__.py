"""Early decoding: read a layer's hidden states as the model's next-token distribution.

Three lenses behind one ``lens=`` argument: the logit lens (``"logit"``, the model's own final norm
and unembedding), a :class:`TunedLens` (an affine translator per site kind and layer, trained with
:func:`train_tuned_lens` on real text) and a :class:`Patchscope` (the vector patched into a target
prompt). :func:`logit_lens` decodes prompts through any of them; :func:`compare_lenses` measures
them against the model's own output on held-out text.
"""

from mechprobe.lens._compare import LensComparison, compare_lenses
from mechprobe.lens._lens import Lens, LensSpec, LogitLens, as_lens
from mechprobe.lens._logit import logit_lens
from mechprobe.lens._patchscope import Patchscope
from mechprobe.lens._result import LensResult
from mechprobe.lens._text import english_text, read_texts
from mechprobe.lens._train import train_tuned_lens
from mechprobe.lens._tuned import TunedLens

__all__ = [
    "Lens",
    "LensComparison",
    "LensResult",
    "LensSpec",
    "LogitLens",
    "Patchscope",
    "TunedLens",
    "as_lens",
    "compare_lenses",
    "english_text",
    "logit_lens",
    "read_texts",
    "train_tuned_lens",
]
