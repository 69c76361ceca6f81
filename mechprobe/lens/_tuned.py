"""The tuned lens (Belrose et al., 2023): an affine translator per (site kind, layer).

A translator maps a residual vector ``h`` read at one layer to ``h + h @ W.T + b``, a vector the
model's own readout decodes; ``W = 0, b = 0`` is the logit lens. (This is the tuned-lens package's
parametrisation: weight decay pulls a translator towards the identity, not towards zero.)
Translators are kept per site kind, ``resid_pre``, ``resid_mid`` and ``resid_post``. Two facts
remove duplicates: the stream entering block ``l > 0`` is the stream leaving block ``l - 1``, so
``resid_pre`` at layer ``l`` uses the ``resid_post`` translator of layer ``l - 1`` (only
``resid_pre`` at layer 0, the embeddings, has its own); and the last block's output *is* what the
readout decodes, so its translator is the identity, exactly.

Files: :meth:`TunedLens.save` writes one safetensors file (tensors ``{kind}.weight [k, d, d]``,
``{kind}.bias [k, d]``, ``{kind}.layers [k]``; metadata ``format = mechprobe.TunedLens``,
``version``, the model's name and shape, a digest of its unembedding and how the lens was
trained). :meth:`TunedLens.from_tuned_lens` reads the tuned-lens package's folders
(``config.json`` + ``params.pt``, loaded with ``weights_only=True``: tensors only, no code), and
:meth:`TunedLens.save_tuned_lens` writes them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from mechprobe.core import read_tensors, warn, write_tensors
from mechprobe.lens._lens import RESIDUAL_KINDS, Lens

__all__ = ["TunedLens", "canonical_site", "unembedding_digest"]

FORMAT, VERSION = "mechprobe.TunedLens", 1


def canonical_site(kind: str, layer: int, n_layers: int) -> tuple[str, int] | None:
    """The translator a residual (kind, layer) uses; None for the last block's output (identity).

    Example:
        >>> canonical_site("resid_pre", 3, 30), canonical_site("resid_pre", 0, 30)
        (('resid_post', 2), ('resid_pre', 0))
        >>> canonical_site("resid_post", 29, 30) is None
        True
    """
    if kind == "resid_pre" and layer > 0:
        return ("resid_post", layer - 1)
    if kind == "resid_post" and layer == n_layers - 1:
        return None
    return (kind, layer)


def unembedding_digest(model: Any) -> str:
    """SHA-256 of the model's unembedding weights (float32 bytes), to tell a lens's model apart."""
    weight = model.W_U.detach().to("cpu", torch.float32).contiguous()
    return hashlib.sha256(weight.cpu().numpy().tobytes()).hexdigest()


def unembedding_fingerprint(model: Any) -> tuple[float, ...]:
    """Eight random bilinear readings ``a_k @ W_U @ b_k`` of the unembedding (fixed seeds), which
    its rounding to bfloat16 or float16 moves by about 0.1% and another model's by far more: the
    digest tells two dtypes of one model apart, this does not."""
    weight = model.W_U.detach().to("cpu", torch.float32)  # [d_model, vocab]
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(8, weight.shape[0], generator=generator, dtype=torch.float32)
    right = torch.randn(weight.shape[1], 8, generator=generator, dtype=torch.float32)
    readings = ((left @ weight) * right.T).sum(-1)
    return tuple(round(float(v), 6) for v in readings)


def _same_unembedding(a: Sequence[float], b: Sequence[float]) -> bool:
    """Fingerprints within 2% of their size of each other (rounding moves them ~0.1%)."""
    x, y = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return x.shape == y.shape and bool((x - y).abs().max() <= 0.02 * x.pow(2).mean().sqrt())


def _check_layers(kind: str, layers: Sequence[int], n_layers: int) -> None:
    """Translator layers in range, each once, none at the last ``resid_post`` (the model's
    output, which a lens never translates): a file with others would be read silently."""
    last = n_layers - 1 if kind == "resid_post" else n_layers
    bad = [int(i) for i in layers if not 0 <= int(i) < last]
    if bad:
        raise ValueError(
            f"{kind} translators must be at layers 0..{last - 1} of a {n_layers}-layer model"
            + (" (the last resid_post is the output itself)" if kind == "resid_post" else "")
            + f", not {bad}."
        )
    if len(set(layers)) != len(layers):
        raise ValueError(f"{kind} translators repeat a layer: {list(layers)}; give each once.")


def package_unembedding_hash(model: Any) -> str:
    """The tuned-lens package's ``unembed_hash`` of the model: SHA-256 of numpy's abbreviated
    print, one decimal, of the ``[vocab, d_model]`` unembedding (its ``tensor_hash``), with
    numpy's default print options (the package's, unless its user changed them)."""
    weight = model.W_U.detach().to("cpu", torch.float32).T.contiguous().numpy()
    with np.printoptions(
        precision=1, threshold=1000, edgeitems=3, linewidth=75, suppress=False, legacy=False
    ):
        text = np.array_str(weight, precision=1)
    return hashlib.sha256(text.encode()).hexdigest()


class TunedLens(Lens):
    """Affine translators per (residual site kind, layer), trained to match the final distribution.

    Build one with :func:`mechprobe.train_tuned_lens`, :meth:`identity`, :meth:`load` (this
    library's safetensors file) or :meth:`from_tuned_lens` (the tuned-lens package's folders).
    Pass it as ``lens=`` to :func:`mechprobe.logit_lens`, :func:`mechprobe.trajectory`,
    :func:`mechprobe.relational_analysis` or :func:`mechprobe.compare_lenses`.

    Args:
        weights: ``{kind: [k, d, d]}`` translator matrices ``W`` (``h + h @ W.T + b``).
        biases: ``{kind: [k, d]}`` translator biases.
        layers: ``{kind: (layer, ...)}`` the k layers of each kind's translators.
        n_layers: The model's number of blocks.
        model_name: The model the lens was trained for.
        info: How it was trained (tokens, steps, text, seed, ...), kept in the file.
        unembed_digest: :func:`unembedding_digest` of that model ("" = unknown).
        unembed_fingerprint: :func:`unembedding_fingerprint` of that model (empty = unknown),
            which the same unembedding in another dtype matches where the digest does not.

    Example:
        >>> import torch, mechprobe as mp
        >>> model = mp.tiny_model()
        >>> lens = mp.TunedLens.identity(model)
        >>> lens.layers  # resid_pre 1-2 reuse resid_post 0-1; the last block's output needs none
        {'resid_pre': (0,), 'resid_mid': (0, 1, 2), 'resid_post': (0, 1)}
        >>> x = torch.randn(4, 64)
        >>> bool(torch.equal(lens.translate(model, "resid_mid", 1, x), x))
        True
    """

    kinds = RESIDUAL_KINDS

    def __init__(
        self,
        weights: Mapping[str, Float[Tensor, "k d d"]],
        biases: Mapping[str, Float[Tensor, "k d"]],
        layers: Mapping[str, Sequence[int]],
        *,
        n_layers: int,
        model_name: str = "",
        info: Mapping[str, Any] | None = None,
        unembed_digest: str = "",
        unembed_fingerprint: Sequence[float] = (),
    ) -> None:
        if set(weights) != set(biases) or set(weights) != set(layers):
            raise ValueError("weights, biases and layers must have the same site kinds.")
        for kind in weights:
            if kind not in RESIDUAL_KINDS:
                raise ValueError(
                    f"A tuned lens has translators for {RESIDUAL_KINDS}, not {kind!r}."
                )
            k = len(layers[kind])
            w, b = weights[kind], biases[kind]
            if w.ndim != 3 or w.shape[0] != k or w.shape[1] != w.shape[2]:
                raise ValueError(f"{kind}.weight must be [{k}, d, d], got {tuple(w.shape)}.")
            if tuple(b.shape) != (k, w.shape[1]):
                raise ValueError(f"{kind}.bias must be [{k}, {w.shape[1]}], got {tuple(b.shape)}.")
            _check_layers(kind, layers[kind], int(n_layers))
            # A diverged training run or a damaged file: every read-out through it is NaN.
            for name, tensor in ((f"{kind}.weight", w), (f"{kind}.bias", b)):
                bad = (~torch.isfinite(tensor.detach().reshape(k, -1))).any(1)
                if bool(bad.any()):
                    where = [int(layers[kind][i]) for i in bad.nonzero().flatten().tolist()]
                    raise ValueError(
                        f"{name} holds NaN or infinity (the translators of layer(s) {where}): "
                        "retrain the lens (with a smaller lr if its training diverged) or load "
                        "another one."
                    )
        self.weights = {k: v.detach().float().contiguous() for k, v in weights.items()}
        self.biases = {k: v.detach().float().contiguous() for k, v in biases.items()}
        self.layers = {k: tuple(int(i) for i in v) for k, v in layers.items()}
        self.n_layers = int(n_layers)
        self.model_name = model_name
        self.info = dict(info or {})
        self.unembed_digest = unembed_digest
        self.unembed_fingerprint = tuple(float(v) for v in unembed_fingerprint)
        self._index = {(k, layer): i for k, ls in self.layers.items() for i, layer in enumerate(ls)}
        self._digest: str | None = None

    @property
    def d_model(self) -> int:
        return int(next(iter(self.weights.values())).shape[-1]) if self.weights else 0

    @classmethod
    def identity(
        cls,
        model: Any,
        sites: Sequence[str] = RESIDUAL_KINDS,
        *,
        info: Mapping[str, Any] | None = None,
    ) -> TunedLens:
        """Identity translators (the logit lens, exactly) for every layer of ``sites``: the start
        of training.

        Args:
            model: The model the lens is for (its layers, width, name and unembedding are recorded).
            sites: The residual site kinds given translators (default: all three).
            info: What to record in the lens's ``info``.

        Returns:
            A :class:`TunedLens` whose translators are all zero (``h + h @ 0 + 0 = h``).

        Example:
            >>> import mechprobe as mp
            >>> sorted(mp.TunedLens.identity(mp.tiny_model(), ["resid_post"]).layers["resid_post"])
            [0, 1]
        """
        n, d = int(model.cfg.n_layers), int(model.cfg.d_model)
        keys = translator_sites(n, sites)
        weights, biases, layers = {}, {}, {}
        for kind in RESIDUAL_KINDS:
            ls = [layer for k, layer in keys if k == kind]
            if ls:
                weights[kind] = torch.zeros(len(ls), d, d, dtype=torch.float32)
                biases[kind] = torch.zeros(len(ls), d, dtype=torch.float32)
                layers[kind] = ls
        return cls(
            weights,
            biases,
            layers,
            n_layers=n,
            model_name=str(getattr(model.cfg, "model_name", "")),
            info=info,
            unembed_digest=unembedding_digest(model),
            unembed_fingerprint=unembedding_fingerprint(model),
        )

    def translator(self, kind: str, layer: int) -> tuple[Tensor, Tensor] | None:
        """``(W, b)`` used at a residual ``(kind, layer)``; None where the identity is exact.

        Args:
            kind: A residual site kind (``resid_pre``, ``resid_mid`` or ``resid_post``).
            layer: The layer.

        Returns:
            ``(W, b)``, ``[d_model, d_model]`` and ``[d_model]`` (the place's translator, or the
            one it shares: ``resid_pre`` at layer ``l`` reads ``resid_post`` at ``l - 1``), or
            None at the last block's output, where the identity is exact.

        Raises:
            ValueError: No translator was trained for that place.
        """
        key = canonical_site(kind, layer, self.n_layers)
        if key is None:
            return None
        if key not in self._index:
            trained = ", ".join(self._spans())
            raise ValueError(
                f"This tuned lens has no translator for {kind} at layer {layer} (that place reads "
                f"{key[0]} {key[1]}); it has {trained}. Train one with "
                f"mp.train_tuned_lens(model, sites=[{key[0]!r}])."
            )
        i = self._index[key]
        return self.weights[key[0]][i], self.biases[key[0]][i]

    def translate(
        self, model: Any, kind: str, layer: int, x: Float[Tensor, "n d_model"]
    ) -> Float[Tensor, "n d_model"]:
        if x.shape[-1] != self.d_model:
            raise ValueError(
                f"x has width {x.shape[-1]}, and this tuned lens translates d_model "
                f"{self.d_model} ({self.model_name or 'unknown model'}): pass the model's "
                "residual stream, or load or train a lens for this model."
            )
        pair = self.translator(kind, layer)
        if pair is None:
            return x
        w, b = (t.to(x.device, x.dtype) for t in pair)
        return torch.addmm(b, x, w.T).add_(x)

    def check(self, model: Any, entries: Sequence[tuple[str, int]]) -> None:
        super().check(model, entries)
        n, d = int(model.cfg.n_layers), int(model.cfg.d_model)
        if (n, d) != (self.n_layers, self.d_model):
            raise ValueError(
                f"This tuned lens was made for {self.n_layers} layers x d_model {self.d_model} "
                f"({self.model_name or 'unknown model'}); the model has {n} x {d}: load or train "
                "a lens for this model."
            )
        for kind, layer in entries:
            self.translator(kind, layer)
        if self._other_unembedding(model):
            name = str(getattr(model.cfg, "model_name", "") or "this model")
            warn(
                f"This tuned lens (trained on {self.model_name or 'an unnamed model'}) was trained "
                f"with another unembedding than {name}'s: its read-outs may mean little; load or "
                "train a lens for this model.",
                UserWarning,
            )

    def _other_unembedding(self, model: Any) -> bool:
        """Whether the lens was trained with another unembedding than ``model``'s (by this
        library's digest, or the tuned-lens package's hash for a lens read from its folder)."""
        package_hash = self.info.get("unembed_hash")
        other = bool(self.unembed_digest) and self.unembed_digest != unembedding_digest(model)
        if other and self.unembed_fingerprint:
            # Another digest is also the same unembedding in another dtype (a lens trained in
            # float32 read on the model in bfloat16), which the fingerprint matches.
            other = not _same_unembedding(self.unembed_fingerprint, unembedding_fingerprint(model))
        return bool(other or (package_hash and package_hash != package_unembedding_hash(model)))

    def _spans(self) -> list[str]:
        out = []
        for kind in RESIDUAL_KINDS:
            ls = sorted(self.layers.get(kind, ()))
            if not ls:
                continue
            runs, start = [], ls[0]
            for a, b in zip(ls, [*ls[1:], None], strict=True):
                if b != a + 1:
                    runs.append(f"{start}" if start == a else f"{start}-{a}")
                    start = b if b is not None else start
            out.append(f"{kind} {','.join(runs)}")
        return out

    def describe(self) -> str:
        n = sum(len(v) for v in self.layers.values())
        name = self.model_name or "unknown model"
        return f"tuned ({name}, {n} translators: {', '.join(self._spans())}; {self.digest()[:12]})"

    def digest(self) -> str:
        """SHA-256 of the translators (kinds, layers, weights, biases): two lenses of the same
        places differ here, so a result's ``lens`` names the one that decoded it. Taken once, at
        the first call: build a new lens rather than editing one's translators in place.

        Example:
            >>> import mechprobe as mp
            >>> lens = mp.TunedLens.identity(mp.tiny_model())
            >>> lens.digest() == mp.TunedLens.identity(mp.tiny_model(seed=1)).digest()
            True
        """
        if self._digest is None:  # once: describe() is called for every decoded entry
            sha = hashlib.sha256()
            for kind in sorted(self.weights):
                sha.update(f"{kind}:{self.layers[kind]}".encode())
                for tensor in (self.weights[kind], self.biases[kind]):
                    sha.update(tensor.detach().cpu().float().contiguous().numpy().tobytes())
            self._digest = sha.hexdigest()
        return self._digest

    # -- files ---------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the lens to one ``.safetensors`` file (format tag and version in its metadata).

        Args:
            path: A file path ending in ``.safetensors`` (its folder is created).

        Returns:
            The path written.

        Raises:
            ValueError: ``path`` does not end in ``.safetensors``, or is a folder.

        Example:
            >>> import tempfile, mechprobe as mp
            >>> lens = mp.TunedLens.identity(mp.tiny_model())
            >>> path = lens.save(tempfile.mkdtemp() + "/lens.safetensors")
            >>> mp.TunedLens.load(path).layers == lens.layers
            True
        """
        out = Path(path).expanduser()
        if out.suffix != ".safetensors":
            raise ValueError(f"Save a tuned lens to a .safetensors file, not {out.name!r}.")
        if out.is_dir():
            raise ValueError(f"{out} is a folder: pass a file path ending in .safetensors.")
        out.parent.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, Tensor] = {}
        for kind in self.weights:
            tensors[f"{kind}.weight"] = self.weights[kind]
            tensors[f"{kind}.bias"] = self.biases[kind]
            tensors[f"{kind}.layers"] = torch.tensor(self.layers[kind], dtype=torch.int64)
        fields = {
            "model_name": self.model_name,
            "n_layers": str(self.n_layers),
            "d_model": str(self.d_model),
            "unembed_sha256": self.unembed_digest,
            "unembed_fingerprint": json.dumps(list(self.unembed_fingerprint)),
            "info": json.dumps(self.info, sort_keys=True),
        }
        # The project's one tensor-file writer: format tag, version, SHA-256 digests checked on load.
        return write_tensors(out, tensors, format=FORMAT, version=VERSION, fields=fields)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TunedLens:
        """Read a lens written by :meth:`save` (or a tuned-lens package folder, see
        :meth:`from_tuned_lens`).

        Args:
            path: A ``.safetensors`` file written by :meth:`save`, or a tuned-lens package folder.

        Returns:
            The :class:`TunedLens`.

        Raises:
            TypeError: ``path`` is not a path.
            FileNotFoundError: Nothing at ``path``.
            ValueError: The file is not a mechprobe tuned lens, or a newer version.
        """
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(
                f"TunedLens.load takes a path (a .safetensors file or a tuned-lens folder), got "
                f"{type(path).__name__}."
            )
        src = Path(path).expanduser()
        if src.is_dir():
            return cls.from_tuned_lens(src)
        if not src.is_file():
            raise FileNotFoundError(
                f"No tuned lens at {src}: pass a .safetensors file or a folder."
            )
        meta, tensors = read_tensors(
            src, format=FORMAT, version=VERSION, what="mechprobe tuned lens"
        )
        kinds = sorted({key.split(".")[0] for key in tensors})
        return cls(
            {k: tensors[f"{k}.weight"] for k in kinds},
            {k: tensors[f"{k}.bias"] for k in kinds},
            {k: tensors[f"{k}.layers"].tolist() for k in kinds},
            n_layers=int(meta["n_layers"]),
            model_name=meta.get("model_name", ""),
            info=json.loads(meta.get("info", "{}")),
            unembed_digest=meta.get("unembed_sha256", ""),
            unembed_fingerprint=json.loads(meta.get("unembed_fingerprint", "[]")),
        )

    def save_tuned_lens(
        self,
        folder: str | os.PathLike[str],
        model: Any = None,
        *,
        identity_where_missing: bool = False,
    ) -> Path:
        """Write the lens as the tuned-lens package's folder (``config.json`` + ``params.pt``),
        which its ``TunedLens.from_model_and_pretrained(hf_model, folder)`` and
        :meth:`from_tuned_lens` read.

        The package keeps one translator per block input, Hugging Face's ``hidden_states[i]``:
        translator 0 is this lens's ``resid_pre`` at layer 0, translator ``i`` its ``resid_post``
        at layer ``i - 1``. ``resid_mid`` translators have no place there and are not written
        (a warning says so). ``params.pt`` is written with ``torch.save``, the package's format:
        a zip of tensors that ``torch.load(weights_only=True)`` reads without running code.

        Args:
            folder: The folder to write (created with its parents; its ``config.json`` and
                ``params.pt`` are replaced).
            model: The model the lens was trained for (checked: a model with another
                unembedding is refused): its unembedding's hash, as the package computes it,
                goes in ``unembed_hash`` so that the package warns when the lens is loaded for
                another model (None: the hash the lens was read with, if any; none if it has
                none, and the package then checks nothing).
            identity_where_missing: Write the identity (the logit lens) for a block input this
                lens has no translator for, instead of refusing (a lens trained on
                ``resid_post`` only has none for the embeddings).

        Returns:
            The folder.

        Raises:
            ValueError: A block input without a translator (unless ``identity_where_missing``),
                or a model of another shape or unembedding.

        Example:
            >>> import tempfile, mechprobe as mp
            >>> model = mp.tiny_model()
            >>> lens = mp.TunedLens.identity(model, sites=["resid_pre", "resid_post"])
            >>> folder = lens.save_tuned_lens(tempfile.mkdtemp() + "/lens", model)
            >>> sorted(p.name for p in folder.iterdir())
            ['config.json', 'params.pt']
        """
        root = Path(folder).expanduser()
        if root.exists() and not root.is_dir():
            raise ValueError(f"{root} is a file: pass a folder for the tuned-lens format.")
        above = next((p for p in root.parents if p.exists()), None)
        if above is not None and not above.is_dir():
            raise ValueError(f"{above} is a file: {root} cannot be a folder under it.")
        n, d = self.n_layers, self.d_model
        if model is not None and (int(model.cfg.n_layers), int(model.cfg.d_model)) != (n, d):
            raise ValueError(
                f"This tuned lens was made for {n} layers x d_model {d}; the model has "
                f"{model.cfg.n_layers} x {model.cfg.d_model}: pass the model it was trained for."
            )
        if model is not None and self._other_unembedding(model):
            # its hash would tell the package that the lens is this model's
            raise ValueError(
                f"This tuned lens ({self.model_name or 'unnamed model'}) was trained with "
                f"another unembedding than {getattr(model.cfg, 'model_name', '') or 'this model'}'s: "
                "pass the model it was trained for (its hash goes into config.json)."
            )
        inputs = [("resid_pre", 0)] + [("resid_post", layer) for layer in range(n - 1)]
        missing = [
            f"{kind} {layer}" for kind, layer in inputs if layer not in self.layers.get(kind, ())
        ]
        if len(missing) == len(inputs):
            raise ValueError(
                "This lens has no translator for any block input (resid_pre 0, resid_post "
                f"0..{n - 2}): the folder would hold the logit lens under a tuned lens's name. "
                "Train with sites including 'resid_pre' and 'resid_post' (the default)."
            )
        if missing and not identity_where_missing:
            raise ValueError(
                f"The tuned-lens format has a translator for every block input; this lens has "
                f"none at {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}. Train "
                "with sites including 'resid_pre' and 'resid_post' (the default), or pass "
                "identity_where_missing=True to write the logit lens there."
            )
        if self.layers.get("resid_mid"):
            warn(
                f"The tuned-lens format reads between blocks only: this lens's "
                f"{len(self.layers['resid_mid'])} resid_mid translators are not written.",
                UserWarning,
            )
        state: dict[str, Tensor] = {}
        for i, (kind, layer) in enumerate(inputs):
            if layer in self.layers.get(kind, ()):
                j = list(self.layers[kind]).index(layer)
                weight, bias = self.weights[kind][j], self.biases[kind][j]
            else:
                weight, bias = torch.zeros(d, d), torch.zeros(d)
            # clones: a slice saved alone would carry its whole [k, d, d] storage into the file
            state[f"{i}.weight"], state[f"{i}.bias"] = weight.clone(), bias.clone()
        package_hash = package_unembedding_hash(model) if model is not None else None
        if package_hash is None and not self.info.get("unembed_hash"):
            warn(
                "save_tuned_lens without the model writes no unembed_hash: the tuned-lens "
                "package will then load this lens for any model without a word. Pass the model "
                "the lens was trained for.",
                UserWarning,
            )
        config = {
            "base_model_name_or_path": self.model_name,
            "d_model": d,
            "num_hidden_layers": n,
            "bias": True,
            "base_model_revision": None,
            "unembed_hash": package_hash or self.info.get("unembed_hash"),
            "lens_type": "linear_tuned_lens",
        }
        root.mkdir(parents=True, exist_ok=True)
        torch.save(state, root / "params.pt")
        (root / "config.json").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
        return root

    @classmethod
    def from_tuned_lens(cls, folder: str | os.PathLike[str]) -> TunedLens:
        """Read a lens saved by the tuned-lens package: ``config.json`` + ``params.pt``.

        Its translator ``i`` reads Hugging Face's ``hidden_states[i]``, the stream entering block
        ``i``: ``resid_pre`` at layer 0 (the embeddings) for ``i = 0``, else ``resid_post`` at
        layer ``i - 1``. ``params.pt`` is loaded with ``torch.load(weights_only=True)``, which
        refuses anything but tensors and plain containers. The folder's ``unembed_hash`` is
        checked against the model as the package checks it: a lens for another model warns, as
        does a model loaded with ``process_weights=True`` (its centred unembedding and residual
        stream are not the Hugging Face values the lens was trained on).

        Args:
            folder: The folder holding ``config.json`` and ``params.pt``.

        Returns:
            A :class:`TunedLens` with ``resid_pre`` (layer 0) and ``resid_post`` translators; the
            package's ``unembed_hash`` is kept in ``info``.

        Raises:
            ValueError: A missing or unreadable file (naming it), a lens type other than
                ``linear_tuned_lens``, translators missing or whose shapes disagree with the
                config, or translators holding NaN or infinity.
        """
        root = Path(folder).expanduser()
        config_path, params_path = root / "config.json", root / "params.pt"
        for p in (config_path, params_path):
            if not p.is_file():
                raise ValueError(
                    f"{root} is not a tuned-lens folder: {p.name} is missing (expected "
                    "config.json and params.pt, as TunedLens.save of the tuned-lens package "
                    "writes them)."
                )
        config, n, d = _package_config(root, config_path)
        state = _package_state(root, params_path)
        w = torch.zeros(n, d, d, dtype=torch.float32)
        b = torch.zeros(n, d, dtype=torch.float32)
        for i in range(n):
            weight = state.get(f"{i}.weight")
            if not isinstance(weight, Tensor) or tuple(weight.shape) != (d, d):
                raise ValueError(
                    f"{params_path}: translator {i} is missing or not [{d}, {d}] "
                    f"(config: {n} layers x d_model {d})."
                )
            w[i] = weight.float()
            if config.get("bias", True):
                bias = state.get(f"{i}.bias")
                if not isinstance(bias, Tensor) or tuple(bias.shape) != (d,):
                    raise ValueError(
                        f"{params_path}: translator {i}'s bias is missing or not [{d}] (config: "
                        f"bias true, d_model {d})."
                    )
                b[i] = bias.float()
        weights = {"resid_pre": w[:1], "resid_post": w[1:]}
        biases = {"resid_pre": b[:1], "resid_post": b[1:]}
        layers = {"resid_pre": [0], "resid_post": list(range(n - 1))}
        if n == 1:
            del weights["resid_post"], biases["resid_post"], layers["resid_post"]
        _check_package_finite(params_path, weights, biases, layers)
        return cls(
            weights,
            biases,
            layers,
            n_layers=n,
            model_name=str(config.get("base_model_name_or_path", "")),
            # The package's unembed_hash, checked against the model as the package does.
            info={"source": "tuned-lens package", "folder": str(root)}
            | ({"unembed_hash": str(config["unembed_hash"])} if config.get("unembed_hash") else {}),
        )


def _unreadable(root: Path, name: str, what: str) -> ValueError:
    return ValueError(
        f"{root} is not a readable tuned-lens folder ({name}: {what}): pass a folder that the "
        "tuned-lens package's TunedLens.save wrote, or a mechprobe .safetensors lens."
    )


def _package_config(root: Path, path: Path) -> tuple[dict[str, Any], int, int]:
    """``(config, n_layers, d_model)`` of a tuned-lens folder's ``config.json``; a damaged or
    foreign file raised a bare KeyError, JSONDecodeError or AttributeError."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
        raise _unreadable(root, path.name, f"not JSON, {error}") from None
    if not isinstance(config, dict):
        raise _unreadable(root, path.name, f"a JSON {type(config).__name__}, not an object")
    lens_type = config.get("lens_type", "linear_tuned_lens")
    if lens_type != "linear_tuned_lens":
        raise ValueError(f"Only linear tuned lenses can be read, not {lens_type!r}.")
    sizes = []
    for key in ("num_hidden_layers", "d_model"):
        if key not in config:
            raise _unreadable(root, path.name, f"no {key!r} entry")
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _unreadable(root, path.name, f"{key} is {value!r}, not a positive integer")
        sizes.append(value)
    return config, sizes[0], sizes[1]


def _package_state(root: Path, path: Path) -> Mapping[str, Any]:
    """The translators' state dict in a tuned-lens folder's ``params.pt``, read with
    ``weights_only=True``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        # Damaged bytes fail anywhere in the unpickler (UnpicklingError, KeyError, EOFError,
        # RuntimeError, ...). Not torch's message: it advises weights_only=False, which would
        # run the file's code.
        raise _unreadable(
            root,
            path.name,
            "torch.load(weights_only=True) cannot read it: damaged, or it holds objects other "
            "than tensors, which are not loaded as they could run code",
        ) from None
    if not isinstance(state, Mapping):
        raise _unreadable(root, path.name, "not a state dict of translators")
    # Older releases saved the whole lens (``layer_translators.*`` and ``unembed.*``).
    return {str(k).removeprefix("layer_translators."): v for k, v in state.items()}


def _check_package_finite(
    path: Path, weights: dict[str, Tensor], biases: dict[str, Tensor], layers: dict[str, Any]
) -> None:
    """Refuse NaN/inf translators naming the package's file and translator index (the lens's
    own check names mechprobe's kinds, which that folder does not use)."""
    for kind in weights:
        for j, layer in enumerate(layers[kind]):
            index = 0 if kind == "resid_pre" else int(layer) + 1  # hidden_states[index]
            for part, tensor in (("weight", weights[kind][j]), ("bias", biases[kind][j])):
                if not bool(torch.isfinite(tensor).all()):
                    raise ValueError(
                        f"{path}: {index}.{part} holds NaN or infinity: retrain the lens (with "
                        "a smaller lr if its training diverged) or load another one."
                    )


def translator_sites(n_layers: int, sites: Sequence[str]) -> list[tuple[str, int]]:
    """The distinct translators that decoding ``sites`` at every layer needs, in a fixed order."""
    # A Site or None is named in the error below, not iterated.
    listed = isinstance(sites, Sequence) and not isinstance(sites, str)
    kinds = list(sites) if listed else [sites]
    if not kinds:
        raise ValueError(f"sites is empty: pass one or more of {', '.join(RESIDUAL_KINDS)}.")
    for kind in kinds:
        if kind not in RESIDUAL_KINDS:
            raise ValueError(
                f"A tuned lens translates the residual stream ({', '.join(RESIDUAL_KINDS)}), not "
                f"{kind!r}."
            )
    found: list[tuple[str, int]] = []
    for kind in RESIDUAL_KINDS:
        if kind not in kinds:
            continue
        for layer in range(n_layers):
            key = canonical_site(kind, layer, n_layers)
            if key is not None and key not in found:
                found.append(key)
    order = {k: i for i, k in enumerate(RESIDUAL_KINDS)}
    return sorted(found, key=lambda s: (order[s[0]], s[1]))
