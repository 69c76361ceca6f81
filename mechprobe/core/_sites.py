"""Sites: typed places in a model that render to TransformerLens hook names.

A :class:`Site` names one activation: ``Site("mlp_out", layer=19)`` is ``blocks.19.hook_mlp_out``.
Plain hook-name strings are accepted wherever a site is, and every site is checked against the model
before any forward pass, so a typo fails at once with the closest valid names.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias, get_args

import numpy as np
import torch

from mechprobe.core._validation import as_int

__all__ = [
    "HEAD_KINDS",
    "Layers",
    "Positions",
    "Site",
    "SiteKind",
    "SiteLike",
    "block_of",
    "expand_sites",
    "head_count",
    "is_attention_map",
    "query_heads",
    "resolve_layers",
    "resolve_site",
    "resolve_sites",
]

SiteKind: TypeAlias = Literal[
    "resid_pre",
    "resid_mid",
    "mlp_in",
    "resid_post",
    "attn_out",
    "mlp_out",
    "head",
    "q",
    "k",
    "v",
    "pattern",
    "head_out",
]
_KINDS: tuple[str, ...] = get_args(SiteKind)
#: Kinds that name one attention head (``head=`` required): ``head`` is the head's ``z`` (its
#: attention-weighted values, before ``W_O``), ``q``/``k``/``v`` its query, key and value vectors
#: (``k`` and ``v`` index *key/value* heads, which several query heads share under grouped-query
#: attention), ``pattern`` its attention weights (a row over key positions per query position)
#: and ``head_out`` its write to the residual stream, ``z @ W_O[head]`` (width ``d_model``).
HEAD_KINDS: tuple[str, ...] = ("head", "q", "k", "v", "pattern", "head_out")

#: Token positions: ``None`` (all), an int (negative counts back from the last *real* token, so
#: ``-1`` is the last real token of each row whatever the padding side) or a sequence of ints.
Positions: TypeAlias = int | Sequence[int] | None

_HOOK_OF_KIND = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    # What the MLP branch alone reads: resid_mid's value, but a write reaches only the MLP (the
    # residual stream keeps resid_mid). TransformerLens fires this hook only with
    # cfg.use_hook_mlp_in, which intervene() switches on while it holds a hook there.
    "mlp_in": "blocks.{layer}.hook_mlp_in",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    # Per-head attention output before W_O ([batch, pos, head, d_head]); the head's write to the
    # residual stream is z[..., h, :] @ W_O[h].
    "head": "blocks.{layer}.attn.hook_z",
    # Before the rotary embedding, as TransformerLens's hook_q/hook_k: [batch, pos, head, d_head]
    # (k and v have the model's key/value heads on that axis).
    "q": "blocks.{layer}.attn.hook_q",
    "k": "blocks.{layer}.attn.hook_k",
    "v": "blocks.{layer}.attn.hook_v",
    # After the softmax: [batch, head, query position, key position].
    "pattern": "blocks.{layer}.attn.hook_pattern",
    # Written where the heads' outputs are summed: the edit replaces one head's share of attn_out
    # (the head's z, read at hook_z of the same forward pass, times its W_O slice).
    "head_out": "blocks.{layer}.hook_attn_out",
}
_KIND_OF_HOOK = {
    re.compile(pattern.replace("{layer}", r"(\d+)").replace(".", r"\.") + "$"): kind
    for kind, pattern in _HOOK_OF_KIND.items()
    if kind != "head_out"  # its hook name is attn_out's: a parsed name means attn_out
}

# A site's label, as ``str(Site)`` writes it: "resid_post@3", "head_out@3, head 2".
_LABEL = re.compile(r"([a-z_]+)@(-?[0-9]+)(?:, head ([0-9]+))?")
# A block's hook: "blocks.4.hook_resid_post", "blocks.4.mlp.hook_post".
_BLOCK = re.compile(r"blocks\.([0-9]+)\.")


def block_of(name: str) -> int | None:
    """The block a hook name or a site's label names, None outside the blocks.

    Example:
        >>> block_of("blocks.4.mlp.hook_post"), block_of("head_out@3, head 2"), block_of("hook_embed")
        (4, 3, None)
    """
    found = _BLOCK.match(name) or _LABEL.match(name)
    if found is None:
        return None
    return int(found.group(1) if found.re is _BLOCK else found.group(2))


@dataclass(frozen=True)
class Site:
    """A place in the model: a kind of activation at one layer, optionally one head and positions.

    Args:
        kind: ``resid_pre``, ``resid_mid`` (after attention), ``mlp_in`` (what the MLP reads:
            ``resid_mid``'s value, but a write there reaches the MLP alone, not the residual
            stream), ``resid_post``, ``attn_out``, ``mlp_out``, or one of the head kinds
            :data:`HEAD_KINDS`: ``head`` (the head's ``z``), ``q``, ``k``, ``v``, ``pattern``,
            ``head_out`` (its write to the residual stream).
        layer: Block index, 0-based; negative counts from the last block once resolved on a model.
        head: Attention head, required for the head kinds and forbidden otherwise. For ``k`` and
            ``v`` it is a key/value head (:func:`query_heads` says which query heads it feeds).
        positions: Default token positions for interventions and captures at this site.

    Example:
        >>> Site("mlp_out", layer=19).hook_name
        'blocks.19.hook_mlp_out'
        >>> Site.parse("blocks.3.attn.hook_z", head=2)
        Site(kind='head', layer=3, head=2, positions=None)
    """

    kind: SiteKind
    layer: int
    head: int | None = None
    positions: Positions = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            hint = _tl_hint(str(self.kind))
            close = difflib.get_close_matches(str(self.kind), _KINDS, n=3, cutoff=0.3)
            raise ValueError(
                f"Unknown site kind {self.kind!r};"
                + (hint if hint else f" did you mean {close or list(_KINDS)}?")
                + f" Valid kinds: {', '.join(_KINDS)}."
            )
        # numpy and 0-d tensor integers (np.argsort of scores, a result's layers array) count as
        # ints, as in every layers= argument; stored as Python ints so labels and hashes agree.
        for name in ("layer", "head"):
            value = getattr(self, name)
            number = as_int(value)
            if number is None and (name == "layer" or value is not None):
                raise TypeError(f"Site {name} must be an int, got {value!r}.")
            object.__setattr__(self, name, number)
        if self.kind in HEAD_KINDS and self.head is None:
            raise ValueError(
                f"Site({self.kind!r}, ...) needs head=<index>, e.g. Site({self.kind!r}, 5, head=2)."
            )
        if self.kind not in HEAD_KINDS and self.head is not None:
            raise ValueError(
                f"head= only applies to the head kinds {HEAD_KINDS}, not {self.kind!r}."
            )
        positions: Any = self.positions
        if hasattr(positions, "tolist") and not isinstance(positions, (str, list, tuple)):
            # An index array (np.where, argmax) or tensor: plain ints, or the Site is unhashable.
            positions = positions.tolist()
            object.__setattr__(self, "positions", positions)
        if isinstance(positions, list):
            # Frozen and hashable: store positions as a tuple.
            object.__setattr__(self, "positions", tuple(positions))

    @property
    def hook_name(self) -> str:
        """The TransformerLens hook name this site reads and writes."""
        return _HOOK_OF_KIND[self.kind].format(layer=self.layer)

    @classmethod
    def parse(cls, name: str, *, head: int | None = None, positions: Positions = None) -> Site:
        """Turn a hook name such as ``"blocks.4.hook_resid_post"``, or a site's label such as
        ``"head_out@3, head 2"`` (its ``str``, as result frames write it), into a Site.

        Args:
            name: A hook name (``"blocks.4.hook_resid_post"``) or a site label (``"mlp_out@3"``,
                ``"head_out@3, head 2"``).
            head: The head of a per-head site named by its hook name; with a label that names
                a head, it must be that head.
            positions: The Site's default token positions (None: none chosen).

        Returns:
            The :class:`Site`.

        Example:
            >>> Site.parse("blocks.4.hook_resid_post"), Site.parse("head_out@3, head 2").head
            (Site(kind='resid_post', layer=4, head=None, positions=None), 2)

        Raises:
            ValueError: The name is neither a site label nor one of the site kinds' hook names
                (use the string itself where an arbitrary hook is meant: interventions accept
                hook names directly), or ``head=`` contradicts the label's head.
        """
        if "@" in name:  # hook names hold none
            label = _LABEL.fullmatch(name)
            if label is None or label.group(1) not in _KINDS:
                raise ValueError(
                    f"{name!r} is not a site label: a kind, '@', a layer and, for a head, "
                    f"', head <index>' ('mlp_out@3', 'head_out@3, head 2'); kinds: "
                    f"{', '.join(_KINDS)}."
                )
            labelled = None if label.group(3) is None else int(label.group(3))
            if head is not None and labelled is not None and head != labelled:
                raise ValueError(
                    f"Site.parse({name!r}, head={head}): the label says head {labelled}."
                )
            return cls(
                label.group(1),  # type: ignore[arg-type]
                int(label.group(2)),
                head=labelled if head is None else head,
                positions=positions,
            )
        for pattern, kind in _KIND_OF_HOOK.items():
            match = pattern.match(name)
            if match:
                return cls(kind, int(match.group(1)), head=head, positions=positions)  # type: ignore[arg-type]
        raise ValueError(
            f"{name!r} is not a site label ('mlp_out@3') or a site hook name "
            f"({', '.join(_HOOK_OF_KIND.values())}); pass the plain string where any "
            "TransformerLens hook is meant."
        )

    def __str__(self) -> str:
        head = f", head {self.head}" if self.head is not None else ""
        return f"{self.kind}@{self.layer}{head}"


SiteLike: TypeAlias = Site | str

# TransformerLens's short activation names (utils.get_act_name) that are not site kinds here:
# what to pass instead (a ported notebook says sites="z" or "result").
_TL_NAMES = {
    "z": "'head' (a head's z, attn.hook_z)",
    "result": "'head_out' (a head's write to the residual stream, z @ W_O)",
    "attn_scores": "the hook name 'blocks.L.attn.hook_attn_scores'",
    "pre": "the hook name 'blocks.L.mlp.hook_pre' (the MLP's neurons before the activation)",
    "post": "the hook name 'blocks.L.mlp.hook_post' (the MLP's neurons)",
    "scale": "the hook name 'blocks.L.ln1.hook_scale'",
}


def _tl_hint(name: str) -> str:
    """`` It is TransformerLens's name for ...; pass ...`` where ``name`` is one, else ``""``."""
    if name not in _TL_NAMES:
        return ""
    return f" In TransformerLens {name!r} names what here is {_TL_NAMES[name]}."


_ATTENTION_MAP = re.compile(r"blocks\.\d+\.attn\.hook_(pattern|attn_scores)$")


def is_attention_map(site: SiteLike) -> bool:
    """Whether a site holds ``[batch, head, query pos, key pos]`` maps: a ``pattern`` Site, or
    the hook name of a layer's pattern or attention scores. Hooks see them query-major, so that
    positions select query rows as at every other site.

    Example:
        >>> is_attention_map("blocks.0.attn.hook_attn_scores"), is_attention_map("hook_embed")
        (True, False)
    """
    if isinstance(site, Site):
        return site.kind == "pattern"
    return bool(_ATTENTION_MAP.match(site))


def _head_hint(name: str, kinds: Sequence[str]) -> str:
    """For a head kind's hook name (all heads of a layer): how to name one head, or all, where
    the caller takes that kind."""
    try:
        site = Site.parse(name, head=0)
    except ValueError:
        return ""
    if site.kind not in kinds:
        return (
            f" It holds every head of layer {site.layer}; {site.kind!r} sites are not taken here."
        )
    heads = "key/value head" if site.kind in ("k", "v") else "head"
    return (
        f" It holds every {heads} of layer {site.layer} ({site.kind!r} sites): name one with "
        f"Site.parse({name!r}, head=0) or Site({site.kind!r}, {site.layer}, head=0), or pass "
        f"the kind {site.kind!r} for every {heads} of each layer."
    )


def resolve_site(model: Any, site: SiteLike) -> tuple[str, Site | None]:
    """Validate a site against ``model`` and return ``(hook_name, site_or_None)``.

    Negative layers count from the end (``-1`` is the last block). A plain string that is a hook
    name of the model is accepted as is (and parsed to a Site where it is one); a site's label
    (``"mlp_out@3"``, as result frames write it) is that Site.

    Raises:
        ValueError: Unknown hook name or out-of-range layer, listing the closest valid names.

    Example:
        >>> import mechprobe as mp
        >>> resolve_site(mp.tiny_model(), Site("resid_post", -1))[0]
        'blocks.2.hook_resid_post'
    """
    return resolve_in(model, site, model.hook_dict)


def resolve_in(model: Any, site: SiteLike, hooks: Mapping[str, Any]) -> tuple[str, Site | None]:
    """:func:`resolve_site` against ``hooks``, the model's ``hook_dict`` read once by a caller
    that resolves many sites (the bridge rebuilds that dict, with its aliases, on every read)."""
    n_layers = int(model.cfg.n_layers)
    if isinstance(site, str) and "@" in site:
        # A site's label, as result frames write it ("mlp_out@24"): copied from a frame.
        site = Site.parse(site)
    if isinstance(site, str) and site in _KINDS:
        # das(site="resid_post") said "Unknown hook name", listing the very kind it was given.
        raise ValueError(
            f"{site!r} is a site kind without its layer; this takes one site: pass "
            f"Site({site!r}, layer), its label '{site}@<layer>' or its hook name."
        )
    if isinstance(site, str):
        if site not in hooks:
            # A TransformerLens short name ('z'), or a block's hook without its block ('hook_z'):
            # the closest spelling ('hook_embed') would point away from it.
            in_block = [n for n in hooks if n.startswith("blocks.0.") and n.endswith(f".{site}")]
            close = difflib.get_close_matches(site, list(hooks), n=5, cutoff=0.6)
            hint = (
                _tl_hint(site)
                or (f" Block hooks carry their block: e.g. {in_block[0]!r}." if in_block else "")
                or (f" Closest valid names: {close}." if close else "")
            )
            hint = _no_mid(model, site) or hint
            raise ValueError(
                f"Unknown hook name {site!r} for this model.{hint} "
                f"Site kinds: {', '.join(_KINDS)} (e.g. Site('mlp_out', layer=0))."
            )
        _refuse_silent_hook(model, site)
        try:
            return site, Site.parse(site)
        except ValueError:
            return site, _aliased(site, hooks)
    if not isinstance(site, Site):
        raise TypeError(f"Expected a Site or a hook-name string, got {type(site).__name__}.")
    layer = site.layer + n_layers if site.layer < 0 else site.layer
    if not 0 <= layer < n_layers:
        raise ValueError(
            f"Layer {site.layer} is out of range for a model with {n_layers} layers "
            f"(valid: 0..{n_layers - 1}, or -1..-{n_layers} from the end)."
        )
    if site.kind in HEAD_KINDS:
        n_heads = head_count(model, site.kind)
        if site.head is None or not 0 <= site.head < n_heads:
            which = "key/value heads" if site.kind in ("k", "v") else "heads"
            reads = ""
            n_query = head_count(model, "q")
            if site.kind in ("k", "v") and site.head is not None and 0 <= site.head < n_query:
                # A query head's number given for its keys: say which key/value head it reads.
                kv = site.head // (n_query // n_heads)
                reads = (
                    f" Query head {site.head} reads key/value head {kv}: "
                    f"Site({site.kind!r}, {site.layer}, head={kv})."
                )
            raise ValueError(
                f"Head {site.head} is out of range for {site.kind!r}: this model has {n_heads} "
                f"{which} (valid: 0..{n_heads - 1}).{reads}"
            )
    resolved = Site(site.kind, layer, head=site.head, positions=site.positions)
    if resolved.hook_name not in hooks:
        raise ValueError(
            f"{resolved.hook_name!r} is not a hook of this model."
            + (
                _no_mid(model, resolved.hook_name)
                or f" Closest: {difflib.get_close_matches(resolved.hook_name, list(hooks), n=5)}."
            )
        )
    _refuse_silent_hook(model, resolved.hook_name)
    return resolved.hook_name, resolved


def _no_mid(model: Any, name: str) -> str:
    """Why a parallel block has no ``resid_mid`` (empty for other names and models): the bare
    'not a hook' listed resid_mid among the valid kinds and left a Pythia user guessing."""
    found = re.fullmatch(r"blocks\.(\d+)\.hook_resid_mid", name)
    if not (found and getattr(model.cfg, "parallel_attn_mlp", False)):
        return ""
    # GPT-J's mlp_in never fires: pointing at it sent the reader to the next refusal.
    mlp_in = "; the MLP's input is mlp_in" if _mlp_in_fires(model, int(found.group(1))) else ""
    return (
        " This model's attention and MLP run in parallel (cfg.parallel_attn_mlp, as in "
        "GPT-NeoX/Pythia, GPT-J and Phi): both read resid_pre, so no residual stream lies "
        f"between them. Read resid_pre (what both read{mlp_in}) or resid_post."
    )


def _refuse_silent_hook(model: Any, name: str) -> None:
    """Refuse a hook the model lists but never runs, where an intervention would do nothing.

    ``hook_pos_embed`` of a model without learned positions (a bridge lists it for rotary models
    too); ``hook_mlp_out`` (and ``hook_mlp_in``) of an attention-only HookedTransformer, which
    has no MLP to fire them: a patch there returned the corrupt run's metric everywhere;
    ``hook_mlp_in`` of a parallel block with one shared norm (GPT-J's and Phi's bridges).
    """
    positions = getattr(model.cfg, "positional_embedding_type", "standard")
    if name == "hook_pos_embed" and positions not in ("standard", "shortformer"):
        raise ValueError(
            f"hook_pos_embed never fires on this model: its positions are {positions}, not a "
            "learned embedding added to the residual stream. hook_embed holds the token "
            "embeddings."
        )
    if getattr(model.cfg, "attn_only", False) and re.search(r"\.(hook_mlp_(in|out)|mlp\.)", name):
        raise ValueError(
            f"{name!r} never fires: this model is attention-only (cfg.attn_only), so it has no "
            "MLP. Use attention or residual sites (attn_out, resid_pre, resid_post, head kinds)."
        )
    mlp_in = re.fullmatch(r"blocks\.(\d+)\.hook_mlp_in", name)
    if mlp_in and not _mlp_in_fires(model, int(mlp_in.group(1))):
        raise ValueError(
            f"{name!r} never fires on this model: its attention and MLP share one norm (ln1), "
            "and TransformerLens hooks the MLP's input at a second norm it does not have. The "
            "MLP reads ln1(resid_pre), as attention does: use resid_pre."
        )


def _mlp_in_fires(model: Any, layer: int) -> bool:
    """Whether a block runs its ``hook_mlp_in``, read from its parts, not from a forward pass
    (which would run the caller's own hooks). A bridge fires it at the input of the MLP's norm
    (``ln2``), or of the MLP itself where no norm precedes it; GPT-J's and Phi's blocks share
    one norm (``ln1``) and have neither. A HookedTransformer's block always fires it."""
    if not 0 <= layer < len(model.blocks):  # no such block: the caller names that problem
        return True
    block = model.blocks[layer]
    parts = getattr(block, "submodules", None)
    if not isinstance(parts, Mapping):
        return True
    return "ln2" in parts or bool(getattr(block, "mlp_reads_resid_directly", False))


def _aliased(name: str, hooks: Mapping[str, Any]) -> Site | None:
    """The Site whose hook is the HookPoint ``name`` names, or None.

    A bridge's HookPoints carry their own names (``blocks.1.hook_out`` is ``hook_resid_post``), and
    its messages and caches use them. ``resid_mid``'s hook on a bridge, ``ln2.hook_in``, is left
    out: a write there reaches the MLP alone (``mlp_in``'s meaning), not ``resid_mid``'s.
    """
    layer = block_of(name)
    if layer is None:
        return None
    for kind, pattern in _HOOK_OF_KIND.items():
        alias = pattern.format(layer=layer)
        if kind not in HEAD_KINDS and kind != "resid_mid" and hooks.get(alias) is hooks[name]:
            return Site(kind, layer)  # type: ignore[arg-type]
    return None


def resolve_sites(
    model: Any, sites: SiteLike | Sequence[SiteLike]
) -> list[tuple[str, Site | None]]:
    """Validate several sites at once (all errors before any forward pass).

    Example:
        >>> import mechprobe as mp
        >>> [name for name, _ in resolve_sites(mp.tiny_model(), ["hook_embed", Site("mlp_out", 0)])]
        ['hook_embed', 'blocks.0.hook_mlp_out']
    """
    if isinstance(sites, (str, Site)):
        sites = [sites]
    hooks = model.hook_dict
    return [resolve_in(model, s, hooks) for s in sites]


def width(model: Any, site: Site | None) -> int | None:
    """Last-dimension width of a site's activation, or None for arbitrary hooks and attention
    patterns (whose rows are as long as the sequence)."""
    if site is None or site.kind == "pattern":
        return None
    return int(model.cfg.d_head) if site.kind in ("head", "q", "k", "v") else int(model.cfg.d_model)


def head_count(model: Any, kind: str = "head") -> int:
    """How many heads a head kind has per layer: key/value heads for ``k`` and ``v`` (fewer under
    grouped-query attention), query heads for the others.

    Example:
        >>> import mechprobe as mp
        >>> head_count(mp.tiny_model(), "q"), head_count(mp.tiny_model(), "k")
        (4, 2)
    """
    n_heads = int(model.cfg.n_heads)
    if kind in ("k", "v"):
        if getattr(model.cfg, "ungroup_grouped_query_attention", False):
            return n_heads  # hook_k / hook_v hold one (repeated) key and value per query head
        return int(getattr(model.cfg, "n_key_value_heads", None) or n_heads)
    return n_heads


def query_heads(model: Any, site: Site) -> tuple[int, ...]:
    """The query heads a head site acts on: the head itself, or for ``k``/``v`` every query head
    that reads that key/value head (query heads ``g*j .. g*j+g-1`` share key/value head ``j``,
    ``g = n_heads / n_key_value_heads``, as in Hugging Face's ``repeat_kv``).

    Example:
        >>> import mechprobe as mp
        >>> query_heads(mp.tiny_model(), Site("v", 0, head=1))
        (2, 3)
    """
    if site.kind not in HEAD_KINDS or site.head is None:
        raise ValueError(f"{site} is not a head site; query_heads needs one of {HEAD_KINDS}.")
    if site.kind not in ("k", "v"):
        return (site.head,)
    group = head_count(model, "q") // head_count(model, "k")
    return tuple(range(site.head * group, (site.head + 1) * group))


#: Layers: one block index, a range or list of them (negative counts from the end), or ``"all"``.
Layers: TypeAlias = int | range | Sequence[int] | Literal["all"]


def resolve_layers(model: Any, layers: Layers) -> list[int]:
    """Block indices ``0..n_layers-1`` for ``layers`` (negative ones counted from the end).

    Raises:
        TypeError: Not an int, a range, a list of ints or ``"all"``.
        ValueError: Empty, repeated or out of range.

    Example:
        >>> import mechprobe as mp
        >>> resolve_layers(mp.tiny_model(), "all"), resolve_layers(mp.tiny_model(), [-1, 0])
        ([0, 1, 2], [2, 0])
    """
    n_layers = int(model.cfg.n_layers)
    if isinstance(layers, str):
        if layers != "all":
            # layer_sweep(model, data, "resid_post") put a site where its layers go.
            site = layers.split("@")[0] in _KINDS or layers.startswith(("blocks.", "hook_"))
            raise ValueError(
                f"layers must be an int, a range, a list of ints or 'all', not {layers!r}"
                + (": that names a site; pass it as sites=." if site else ".")
            )
        return list(range(n_layers))
    single = as_int(layers)
    arrays = (np.ndarray, torch.Tensor)
    listed = isinstance(layers, (range, Sequence)) or (
        isinstance(layers, arrays) and layers.ndim == 1
    )
    if single is None and not listed:
        # 1.0, True or a set gave a bare "'float' object is not iterable" (or an arbitrary order).
        raise TypeError(
            f"layers must be an int, a range, a list of ints or 'all', not {layers!r} "
            f"({type(layers).__name__})."
        )
    items = [single] if single is not None else list(layers)  # type: ignore[arg-type]
    if not items:
        raise ValueError("layers is empty: pass at least one layer, a range or 'all'.")
    out = []
    for item in items:
        layer = as_int(item)
        if layer is None:
            raise TypeError(f"layers holds {item!r}: pass ints (block indices).")
        resolved = layer + n_layers if layer < 0 else layer
        if not 0 <= resolved < n_layers:
            raise ValueError(
                f"Layer {layer} is out of range for a model with {n_layers} layers "
                f"(valid: 0..{n_layers - 1}, or -1..-{n_layers} from the end)."
            )
        out.append(resolved)
    if len(set(out)) != len(out):
        raise ValueError(f"layers repeats a layer: {items}; pass each layer once.")
    return out


def expand_sites(
    model: Any,
    sites: SiteLike | Sequence[SiteLike],
    *,
    layers: Layers = "all",
    kinds: Sequence[str] = _KINDS,
    what: str = "sites",
    layers_name: str | None = None,
) -> list[Site]:
    """The one expansion of ``sites`` into Sites: a kind means that kind at each of ``layers``
    (a head kind: every head of each layer, key/value heads for ``k``/``v``), a Site or a site
    hook name stands for itself.

    The order is kept and repeats are dropped. A Site's ``positions`` are kept (callers that take
    ``positions=`` themselves refuse them).

    Args:
        model: A TransformerLens model.
        sites: A kind (``"resid_post"``), a :class:`Site`, its label (``"mlp_out@3"``), a hook
            name, or a list of them.
        layers: Layers a kind expands to (default all).
        kinds: The kinds this caller accepts (others raise).
        what: The argument's name, for messages.
        layers_name: The name of the caller's argument that ``layers`` came from, where the
            caller wants ``layers`` refused when no entry is a kind (every entry a Site or a
            hook name, so ``layers`` would be ignored). None: not checked.

    Raises:
        ValueError: Empty, an unknown kind or hook name, a hook that is not a site, a kind the
            caller does not accept, a layer/head out of range, or (with ``layers_name``)
            ``layers`` given where no entry is a kind.

    Example:
        >>> import mechprobe as mp
        >>> [str(s) for s in expand_sites(mp.tiny_model(), ["mlp_out", "blocks.0.hook_resid_pre"])]
        ['mlp_out@0', 'mlp_out@1', 'mlp_out@2', 'resid_pre@0']
    """
    example = "resid_post" if "resid_post" in kinds else kinds[0]
    if not isinstance(sites, (str, Site, Sequence)) or isinstance(sites, bytes):
        # None or 3 gave a bare "'NoneType' object is not iterable".
        raise TypeError(
            f"{what} must be a site kind such as {example!r}, a Site, a hook name or a list of "
            f"them, not {sites!r}."
        )
    items = [sites] if isinstance(sites, (str, Site)) else list(sites)
    if not items:
        raise ValueError(f"{what} is empty: pass a site kind such as {example!r}, or Sites.")
    layer_list: list[int] | None = None
    hooks: Mapping[str, Any] | None = None
    found: list[Site] = []
    for item in items:
        if isinstance(item, str) and item in _KINDS:
            if item not in kinds:
                raise ValueError(f"{what}: {item!r} is not accepted here; use {list(kinds)}.")
            if layer_list is None:
                layer_list = resolve_layers(model, layers)
            if item in HEAD_KINDS:
                heads = range(head_count(model, item))
                found += [Site(item, layer, head=h) for layer in layer_list for h in heads]  # type: ignore[arg-type]
            else:
                found += [Site(item, layer) for layer in layer_list]  # type: ignore[arg-type]
            continue
        if isinstance(item, str) and not item.startswith(("blocks.", "hook_")) and "@" not in item:
            close = difflib.get_close_matches(item, list(kinds), n=2, cutoff=0.5)
            hint = _tl_hint(item) or (f" Did you mean {close}?" if close else "")
            # The examples are of a kind this caller takes (path_patch's receivers refused the
            # Site('mlp_out', 4) this message suggested).
            kind = "mlp_out" if "mlp_out" in kinds else kinds[0]
            head = ", head=2" if kind in HEAD_KINDS else ""
            hook = _HOOK_OF_KIND[kind].format(layer=4)
            raise ValueError(
                f"{what}: unknown site {item!r}.{hint} Pass a kind ({', '.join(kinds)}), a Site "
                f"such as Site({kind!r}, 4{head}), or a hook name such as {hook!r}."
            )
        if not isinstance(item, (str, Site)):
            raise TypeError(f"{what} holds a {type(item).__name__}: pass kinds, Sites or names.")
        if hooks is None:
            hooks = model.hook_dict
        name, site = resolve_in(model, item, hooks)
        if site is None:
            layer = block_of(name)
            mid = None if layer is None else f"blocks.{layer}.hook_resid_mid"
            hint = (
                f" It is this model's {mid} hook, inside the MLP's norm: pass "
                f"Site('mlp_in', {layer}) for what the MLP alone reads (writes reach "
                f"the MLP only) or Site('resid_mid', {layer}) for the residual stream."
                if mid is not None and layer is not None and hooks.get(mid) is hooks[name]
                else _head_hint(name, kinds)
            )
            raise ValueError(
                f"{what}: {name!r} is a hook but not a site ({', '.join(kinds)}); pass a Site, "
                f"or use intervene()/run() for arbitrary hooks.{hint}"
            )
        if site.kind not in kinds:
            raise ValueError(f"{what}: {site} is a {site.kind!r} site; accepted: {list(kinds)}.")
        found.append(site)
    unused = not (isinstance(layers, str) and layers == "all")
    if layers_name is not None and layer_list is None and unused:
        # patch(m, c, x, Site("resid_pre", 1), -1, metric, layers=[2]) patched layer 1 alone.
        raise ValueError(
            f"{layers_name}={layers!r} is given, but every entry of {what} is a Site or a hook "
            f"name, which carries its own layer: drop {layers_name}, or pass a site kind such as "
            f"{example!r} for {layers_name} to choose the layers of."
        )
    return list(dict.fromkeys(found))
