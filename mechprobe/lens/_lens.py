"""What a lens is: a way to turn hidden states at (site kind, layer) into the model's logits.

Every lens here works in two steps: :meth:`Lens.translate` maps residual-stream vectors ``[n, d]``
read at one (site kind, layer) to vectors ``[n, d]`` in the basis of the last block's output, and
the model's own readout (:class:`mechprobe.core.Readout`: final norm, unembedding, output-logit
transform) turns those into logits. So the statistics (ranks, entropy, KL, top-k, teacher
forcing) are computed once, by one readout, whatever the lens:

- ``"logit"`` (:class:`LogitLens`): the identity, the logit lens (nostalgebraist, 2020);
- :class:`~mechprobe.lens._tuned.TunedLens`: an affine translator per (site kind, layer) trained
  to match the final distribution (Belrose et al., 2023);
- :class:`~mechprobe.lens._patchscope.Patchscope`: patch the vector into a target prompt's
  placeholder and let the model finish the forward pass; the translated vector is the last
  block's output at the target prompt's last token (Ghandeharioun et al., ICML 2024).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from jaxtyping import Float
from torch import Tensor

__all__ = [
    "LENS_KINDS",
    "RESIDUAL_KINDS",
    "Lens",
    "LensSpec",
    "LogitLens",
    "as_lens",
]

#: Site kinds whose activations live in the residual basis and can be unembedded.
LENS_KINDS: tuple[str, ...] = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
#: The residual stream itself (what a translator or a patch into another prompt can read).
RESIDUAL_KINDS: tuple[str, ...] = ("resid_pre", "resid_mid", "resid_post")


class Lens:
    """A decoder of hidden states: :meth:`translate` then the model's own readout.

    Subclasses set :attr:`kinds` (the site kinds they decode) and implement :meth:`translate` and
    :meth:`describe`; :meth:`check` validates a model and the (kind, layer) pairs before any
    forward pass.

    Example:
        >>> import mechprobe as mp
        >>> class Scaled(mp.Lens):  # decodes each vector at twice its length
        ...     def translate(self, model, kind, layer, x):
        ...         return 2 * x
        ...     def describe(self):
        ...         return "scaled x2"
        >>> res = mp.logit_lens(mp.tiny_model(), "Hi", lens=Scaled(), progress=False)
        >>> res.lens
        'scaled x2'
    """

    kinds: tuple[str, ...] = LENS_KINDS
    #: Whether :meth:`translate` runs the model's own blocks on the vector (a Patchscope places
    #: it in a target prompt and lets the forward pass continue): a vector read at ``resid_mid``
    #: then passes through that layer's FFN again.
    continues_forward: bool = False

    def translate(
        self, model: Any, kind: str, layer: int, x: Float[Tensor, "n d_model"]
    ) -> Float[Tensor, "n d_model"]:
        """Map vectors read at ``(kind, layer)`` to vectors the model's readout decodes.

        Args:
            model: The TransformerLens model the vectors were read from.
            kind: Their site kind (one of :attr:`kinds`).
            layer: Their layer.
            x: ``[n, d_model]`` vectors read at ``(kind, layer)``.

        Returns:
            ``[n, d_model]`` vectors in the basis of the last block's output, which the model's
            final norm and unembedding decode.
        """
        raise NotImplementedError

    def describe(self) -> str:
        """A short name recorded in results (``"logit"``, ``"tuned (…)"``, ``"patchscope (…)"``)."""
        raise NotImplementedError

    def check(self, model: Any, entries: Sequence[tuple[str, int]]) -> None:
        """Raise a ValueError naming the problem if this lens cannot decode ``entries``.

        Args:
            model: The model to be decoded.
            entries: The ``(site kind, layer)`` pairs to be decoded.

        Raises:
            ValueError: A site kind this lens does not decode.
        """
        wrong = sorted({kind for kind, _ in entries if kind not in self.kinds})
        if wrong:
            raise ValueError(
                f"The {self.describe()} lens decodes {', '.join(self.kinds)}, not "
                f"{', '.join(wrong)}: pass sites among those, or lens='logit' for component "
                "writes."
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


class LogitLens(Lens):
    """The logit lens: every vector is read as if it were the last block's output.

    Example:
        >>> import torch, mechprobe as mp
        >>> x = torch.randn(2, 64)
        >>> mp.LogitLens().translate(mp.tiny_model(), "resid_post", 0, x) is x
        True
    """

    def translate(
        self, model: Any, kind: str, layer: int, x: Float[Tensor, "n d_model"]
    ) -> Float[Tensor, "n d_model"]:
        return x

    def describe(self) -> str:
        return "logit"


#: What every ``lens=`` argument accepts.
LensSpec = Literal["logit", "patchscope"] | Lens


def as_lens(lens: LensSpec) -> Lens:
    """The :class:`Lens` object for a ``lens=`` argument (``"logit"``, ``"patchscope"``: the
    default :class:`~mechprobe.lens.Patchscope`, as the CLI's ``--lens patchscope``; a
    TunedLens or a Patchscope).

    Args:
        lens: ``"logit"``, ``"patchscope"``, or a :class:`Lens` object (a
            :class:`~mechprobe.TunedLens`, a :class:`~mechprobe.Patchscope`...).

    Returns:
        A :class:`LogitLens` for ``"logit"``, a default :class:`~mechprobe.Patchscope` for
        ``"patchscope"``, or ``lens`` itself when it is already a :class:`Lens`.

    Raises:
        ValueError: ``lens`` is none of these.

    Example:
        >>> as_lens("logit").describe(), as_lens("patchscope").describe().split(" ")[0]
        ('logit', 'patchscope')
    """
    if isinstance(lens, Lens):
        return lens
    if isinstance(lens, str) and lens == "logit":
        return LogitLens()
    if isinstance(lens, str) and lens == "patchscope":
        # The Patchscope module builds on this one: imported here, not at the top.
        from mechprobe.lens._patchscope import Patchscope

        return Patchscope()
    raise ValueError(
        f"lens must be 'logit', 'patchscope', a TunedLens (mp.train_tuned_lens or "
        f"mp.TunedLens.load) or a Patchscope, got {lens!r}."
    )
