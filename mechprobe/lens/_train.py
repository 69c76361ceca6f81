"""Training a tuned lens: minimise KL(final || lens) on real text, as Belrose et al. (2023) do.

The recipe is the paper's (and the tuned-lens package's defaults): translators start at the
identity (``W = 0, b = 0`` in ``h + h @ W.T + b``), the loss is the sum over translators of the
mean ``KL(p_final || p_lens)`` over tokens (the current token's distribution, no shift), SGD with
Nesterov momentum 0.9 at learning rate 1 (applied as ``lr * (1 - momentum)``, which undoes
PyTorch's momentum scaling), weight decay 1e-3, gradients clipped to norm 1, the learning rate
decaying linearly to 0 (Adam: AMSGrad, lr 1e-3, a linear warm-up over the first fifth, at most
1,000 steps). Every step reads fresh tokens: the model runs on the step's windows and the hidden
states of every translated site are kept for that step only, so memory is bounded by one step's
``[sites, tokens, d_model]`` whatever the number of tokens.

What costs is the vocabulary: each translated vector is decoded to 49k logits and the gradient
goes back through the unembedding, two ``[rows, d] x [d, vocab]`` products per translator and
token, about 25 times a forward pass of SmolLM2 per token for 60 translators. All translators of
a step share those products (one batched matrix per chunk of rows), the KL's gradient needs no
``[rows, vocab]`` tensor kept for autograd (``softmax(z) @ W_U.T - W_U p``, with ``W_U p`` computed
once per token), and in ``precision="bfloat16"`` (as the paper's autocast; the default where the
device multiplies bfloat16 natively, float32 elsewhere) the two products take bfloat16 inputs with
float32 accumulation. The first position of every window (BOS)
is left out of the loss: its stream is an attention sink with norms far from every other token's.

Training is resumable: with ``checkpoint=FOLDER`` the translators, the optimiser's state and the
step are written there (one safetensors file, atomically, with SHA-256 digests checked on
resume) every ``checkpoint_every`` steps, and a later call with the same settings continues from
the last one; the windows come from the seed, so
a resumed run reads the same tokens as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from mechprobe.core import (
    Batch,
    Site,
    check_batch_size,
    check_choice,
    check_float,
    check_int,
    check_seed,
    evaluates,
    gradients_enabled,
    model_adapter,
    native_bfloat16,
    progress_bar,
    read_tensors,
    readout,
    run,
    warn,
    write_tensors,
)
from mechprobe.lens._lens import RESIDUAL_KINDS
from mechprobe.lens._text import TextSource, check_context, sample_windows
from mechprobe.lens._tuned import TunedLens, translator_sites, unembedding_digest

__all__ = ["train_tuned_lens"]

_CHECKPOINT = "checkpoint.safetensors"
_CHECKPOINT_FORMAT = "mechprobe.TunedLensCheckpoint"


def _identity_transform(model: Any) -> bool:
    """Whether the model's post-unembedding transform (e.g. a soft cap) is the identity."""
    transform = model_adapter(model).output_transform  # a bridge's adapter or a hooked cfg's cap
    if transform is None:
        return True
    probe = torch.linspace(-200.0, 200.0, 401, dtype=torch.float32)[None]
    return bool(torch.equal(transform(probe.clone()), probe))


def _schedule(optimizer: str, steps: int, warmup: int | None) -> tuple[int, Any]:
    if warmup is None:
        warmup = min(1000, steps // 5) if optimizer == "adam" else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return warmup, factor


class _Step:
    """The loss and gradients of one step, for all translators at once."""

    def __init__(self, model: Any, precision: str, chunk_rows: int) -> None:
        self.model = model
        dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
        self.w_u = model.W_U.detach().to(dtype)  # [d, vocab]
        self.w_u_t = self.w_u.T.contiguous()  # [vocab, d]: rows of the unembedding
        self.b_u = model.b_U.detach().float()
        self.has_bias = bool(self.b_u.any())
        self.dtype = dtype
        self.chunk_rows = chunk_rows

    def targets(self, final: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per token: ``W_U p`` [n, d], ``<p, b_U>`` [n] and ``sum p log p`` [n] of the final
        distribution ``p`` (float32, one chunk at a time)."""
        w = self.model.W_U.detach().float()
        m, c, a = [], [], []
        for s in range(0, final.shape[0], self.chunk_rows):
            z = readout(self.model, final[s : s + self.chunk_rows])
            logp = z.log_softmax(-1)
            p = logp.exp()
            m.append(p @ w.T)
            c.append(p @ self.b_u)
            a.append((p * logp).sum(-1))
        return torch.cat(m), torch.cat(c), torch.cat(a)

    def loss_and_grad(self, u: Tensor, m: Tensor, c: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        """KL per row and its gradient in ``u`` (the final-normed lens vector), rows = (t, n).

        ``KL = lse(z) - <p, z> + sum p log p`` with ``z = u W_U + b_U`` and ``<p, z> = <W_U p, u>
        + <p, b_U>``; its gradient in ``u`` is ``softmax(z) W_U^T - W_U p``.
        """
        rows, n = u.shape[0], m.shape[0]
        kl = torch.empty(rows, dtype=u.dtype)
        grad = torch.empty_like(u)
        tok = torch.arange(rows) % n
        for s in range(0, rows, self.chunk_rows):
            uc = u[s : s + self.chunk_rows]
            idx = tok[s : s + self.chunk_rows]
            z = (uc.to(self.dtype) @ self.w_u).float()
            if self.has_bias:
                z.add_(self.b_u)
            # softmax in place of the logits (torch.logsumexp is several times slower here)
            top = z.amax(-1, keepdim=True)
            q = z.sub_(top).exp_()
            total = q.sum(-1, keepdim=True)
            q.div_(total)
            lse = (total.log() + top).squeeze(-1)
            pz = (m[idx] * uc).sum(-1) + c[idx]
            kl[s : s + len(uc)] = lse - pz + a[idx]
            grad[s : s + len(uc)] = (q.to(self.dtype) @ self.w_u_t).float() - m[idx]
        return kl, grad


def _config(**kwargs: Any) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()}


def _save_checkpoint(
    folder: Path,
    step: int,
    config: dict[str, Any],
    params: dict[str, Tensor],
    opt: Any,
    log: list,
    last_kl: dict[str, float] | None,
) -> None:
    # Saved from the CPU: a checkpoint written on a GPU resumes anywhere.
    tensors = {f"param.{k}": v.detach().cpu() for k, v in params.items()}
    scalars: dict[str, Any] = {}
    # The optimiser's state is keyed by the parameter's index (its names hold dots).
    for i, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"opt.{i}.{key}"] = value.cpu()
            else:
                scalars[f"{i}.{key}"] = value
    state = {"step": step, "config": config, "scalars": scalars, "log": log, "last_kl": last_kl}
    folder.mkdir(parents=True, exist_ok=True)
    # The one tensor-file writer, as results and saved lenses: SHA-256 digests checked on resume
    # (bit flips resumed silently, some into weights of 1e36). Written atomically.
    write_tensors(
        folder / _CHECKPOINT,
        tensors,
        format=_CHECKPOINT_FORMAT,
        version=1,
        fields={"state": json.dumps(state)},
    )


def _read_checkpoint(path: Path) -> tuple[dict[str, str], dict[str, Tensor]]:
    """The header fields and tensors of a checkpoint, digests checked; one written before
    checkpoints carried digests (no format tag) is read as it is."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if "format" not in meta and "state" in meta:  # an older checkpoint: no digests
                return meta, {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as error:
        raise ValueError(f"not a safetensors file: {error}") from None
    return read_tensors(
        path, format=_CHECKPOINT_FORMAT, version=1, what="tuned-lens training checkpoint"
    )


def _load_checkpoint(
    folder: Path, config: dict[str, Any], params: dict[str, Tensor], opt: Any
) -> tuple[int, list, dict[str, float] | None]:
    """``(step, loss log, last step's KL per translator)`` of the checkpoint in ``folder``."""
    path = folder / _CHECKPOINT
    if not path.is_file():
        return 0, [], None
    try:
        meta, tensors = _read_checkpoint(path)
        state = json.loads(meta["state"])
        lacking = [k for k in ("step", "config", "scalars", "log") if k not in state]
        if lacking:
            raise ValueError(f"its state lacks {lacking}")
    except (ValueError, KeyError, TypeError) as error:  # JSONDecodeError is a ValueError
        reason = re.sub(r"[;:] save it again\.$", "", str(error).strip("'\""))
        raise ValueError(
            f"The tuned-lens checkpoint in {folder} cannot be resumed from ({reason}): delete "
            f"{path.name} there (training then starts afresh) or pass another checkpoint folder."
        ) from None
    differ = sorted(
        k for k in set(config) | set(state["config"]) if config.get(k) != state["config"].get(k)
    )
    if differ:
        raise ValueError(
            f"The checkpoint in {folder} was made with other settings ({', '.join(differ)} "
            "differ): pass the same settings to resume, or another folder to start afresh."
        )
    missing = [k for k in params if f"param.{k}" not in tensors]
    if missing:  # the same settings, yet not the translators they train
        raise ValueError(
            f"The tuned-lens checkpoint in {folder} lacks the translators {missing}: delete "
            f"{path.name} there (training then starts afresh) or pass another checkpoint folder."
        )
    with torch.no_grad():
        for k, v in params.items():
            v.copy_(tensors[f"param.{k}"])
    opt_state = opt.state_dict()
    restored: dict[int, dict[str, Any]] = {}
    for i in range(len(params)):
        entry: dict[str, Any] = {
            key.split(".", 2)[2]: t for key, t in tensors.items() if key.startswith(f"opt.{i}.")
        }
        entry.update(
            {k.split(".", 1)[1]: v for k, v in state["scalars"].items() if k.startswith(f"{i}.")}
        )
        if entry:
            restored[i] = entry
    opt_state["state"] = restored
    opt.load_state_dict(opt_state)
    # Checkpoints written before the last step's KL was saved lack it.
    return int(state["step"]), list(state["log"]), state.get("last_kl")


def _check_diverged(
    values: Tensor, step: int, steps: int, lr: float, what: str = "the loss"
) -> None:
    """Stop training where ``values`` (a step's loss, or its weights) are not finite: the lens
    came back with NaN weights and no word (review 26b S2)."""
    if not bool(torch.isfinite(values).all()):
        raise ValueError(
            f"The tuned lens's training diverged at step {step + 1} of {steps} ({what} became "
            f"NaN or infinite at lr={lr:g}): pass a smaller lr (e.g. {lr / 10:g})."
        )


def _warn_if_loss_rose(log: Sequence[float], lr: float) -> None:
    """Warn where training ended above where it began: the first step's loss is the logit
    lens's (the translators start at the identity and are updated after it), so such a tuned
    lens decodes worse than no training, yet every loss was finite (lr too high; review 26b L11).
    The end is the mean of the last tenth of the steps (3 at least: batches differ)."""
    if len(log) < 30:  # over the first steps SGD's momentum often overshoots, then falls back
        return
    window = len(log) // 10
    first, last = log[0], sum(log[-window:]) / window
    if last > 1.1 * first:  # a tenth above: one batch's loss is not the next one's
        warn(
            f"The tuned lens's training loss rose from {first:.4g} (its first step: the logit "
            f"lens's) to {last:.4g} (the mean of its last {window}): this lens may decode worse "
            f"than the logit lens. Pass a smaller lr (e.g. {lr / 10:g}) or more steps.",
            UserWarning,
        )


@evaluates
def train_tuned_lens(
    model: Any,
    text: TextSource = "train",
    *,
    sites: str | Sequence[str] | None = None,
    n_tokens: int = 16384,
    seq_len: int = 128,
    tokens_per_step: int = 256,
    optimizer: Literal["sgd", "adam"] = "sgd",
    lr: float | None = None,
    momentum: float = 0.9,
    weight_decay: float = 1e-3,
    warmup_steps: int | None = None,
    precision: Literal["auto", "bfloat16", "float32"] = "auto",
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 8,
    seed: int = 0,
    batch_size: int | None = 32,
    progress: bool = True,
) -> TunedLens:
    """Train a tuned lens for ``model`` on real text (see the module docstring for the recipe).

    Args:
        model: A TransformerLens model.
        text: ``"train"`` (the default corpus's training split, :func:`mechprobe.english_text`),
            a list of strings, a ``.txt`` file or a folder of them.
        sites: Residual site kinds to translate (``"resid_pre"``, ``"resid_mid"``,
            ``"resid_post"``); every layer of each. ``resid_pre`` beyond layer 0 shares the
            translators of ``resid_post`` one layer down (the same vectors). None: every kind
            the model has (no ``resid_mid`` where attention and MLP run in parallel, as in
            GPT-NeoX).
        n_tokens: Training tokens in all (windows of ``seq_len``; each step reads new ones),
            rounded down to whole steps of ``tokens_per_step``, one step at least:
            ``info["tokens"]`` records what was read. The default, 64 steps (about 10
            minutes on two CPU cores with native bfloat16, AVX512-BF16 or AMX; several times
            longer in float32: 2,048 tokens took 364 s on an AVX2-only core), halves the logit
            lens's KL on SmolLM2's held-out text and lifts its precision@1 at every layer;
            2,048 tokens (8 steps) moved KL only part of the way and precision@1 hardly at all
            (docs/lenses.md). The tuned-lens package
            trains on 250 steps of 2**18 tokens in windows of 2,048 (``n_tokens=250 * 2**18,
            tokens_per_step=2**18, seq_len=2048``).
        seq_len: Tokens per window (BOS included; the BOS position is not in the loss).
        tokens_per_step: Tokens per optimiser step (a multiple of ``seq_len``).
        optimizer: ``"sgd"`` (Nesterov, the paper's default) or ``"adam"``.
        lr: Learning rate (default 1.0 for SGD, applied as ``lr * (1 - momentum)``; 1e-3 for Adam).
        momentum: SGD momentum, or Adam's beta1.
        weight_decay: Decay towards the identity translator.
        warmup_steps: Linear warm-up steps (default 0 for SGD, a fifth of the steps for Adam, at
            most 1,000), the factor ``(step + 1) / (warmup + 1)``, then a linear decay to 0 at
            the last step. (The tuned-lens package's Adam warm-up starts at 0 and its decay
            reaches 0 ``warmup`` steps before the end; SGD's schedule is the same.)
        precision: ``"bfloat16"`` (the unembedding products take bfloat16 inputs, accumulate in
            float32), ``"float32"``, or ``"auto"`` (the default): bfloat16 where the model's
            device multiplies it natively (:func:`mechprobe.core.native_bfloat16`), float32
            elsewhere, where emulated bfloat16 is far slower. The lens's ``info`` records the
            precision used.
        checkpoint: A folder to write the state to and resume from (None: no checkpoints).
        checkpoint_every: Steps between checkpoints.
        seed: Seed of the windows' order.
        batch_size: Rows per forward pass (None: all at once).
        progress: Show a progress bar.

    Returns:
        A :class:`TunedLens`; its ``info`` records the settings, the tokens, the wall time and
        the per-translator training loss of the last steps.

    Raises:
        ValueError: Bad settings, too little text, a checkpoint with other settings; a model
            whose logits go through a non-identity transform (a soft cap) after the unembedding;
            training that diverged (a loss or weights not finite: lr too high).

    Warns:
        UserWarning: Over 30 steps or more, the mean loss of the last tenth of the steps is
            more than a tenth above the first step's (the logit lens's): lr too high, or too few
            steps.

    Example:
        >>> import mechprobe as mp
        >>> model = mp.tiny_model()
        >>> lens = mp.train_tuned_lens(model, ["The cat sat on the mat. " * 40], sites="resid_post",
        ...                            n_tokens=64, seq_len=32, tokens_per_step=32, progress=False)
        >>> lens.info["steps"], lens.layers["resid_post"]
        (2, (0, 1))
    """
    n_tokens = check_int(n_tokens, "n_tokens", 1)
    if isinstance(text, str) and text == "heldout":
        warn(
            "train_tuned_lens(text='heldout') trains on the split that compare_lenses measures "
            "on by default: its comparison would then be on training text. Train on 'train' "
            "(the default), or compare on other text.",
            UserWarning,
        )
    seq_len = check_int(seq_len, "seq_len", 2)
    check_context(model, seq_len)  # first: tokens_per_step's bound follows from seq_len
    tokens_per_step = check_int(tokens_per_step, "tokens_per_step", seq_len)
    if tokens_per_step % seq_len:
        raise ValueError(
            f"tokens_per_step ({tokens_per_step}) must be a multiple of seq_len ({seq_len})."
        )
    check_choice(optimizer, "optimizer", ("sgd", "adam"))
    check_choice(precision, "precision", ("auto", "bfloat16", "float32"))
    if precision == "auto":
        precision = "bfloat16" if native_bfloat16(model_adapter(model).device) else "float32"
    momentum = check_float(momentum, "momentum", 0.0, 1.0)
    if momentum == 1.0:  # SGD's step is lr * (1 - momentum): nothing would train
        raise ValueError("momentum must be below 1 (at 1 the step lr * (1 - momentum) is 0).")
    weight_decay = check_float(weight_decay, "weight_decay", 0.0)
    lr = (
        (1.0 if optimizer == "sgd" else 1e-3)
        if lr is None
        else check_float(lr, "lr", 0.0, low_open=True)
    )
    checkpoint_every = check_int(checkpoint_every, "checkpoint_every", 1)
    seed = check_seed(seed)
    batch_size = check_batch_size(batch_size)
    if warmup_steps is not None:
        warmup_steps = check_int(warmup_steps, "warmup_steps", 0)
    n_layers = int(model.cfg.n_layers)
    if sites is None:
        parallel = model_adapter(model).parallel_blocks
        sites = [k for k in RESIDUAL_KINDS if not (parallel and k == "resid_mid")]
    keys = translator_sites(n_layers, sites)  # checks sites (kinds, or a clear error)
    kinds = [sites] if isinstance(sites, str) else list(sites)
    if not _identity_transform(model):
        raise ValueError(
            "This model's logits go through a transform after the unembedding (a soft cap); "
            "training a tuned lens through it is not supported: train on a model without one."
        )
    per_step = tokens_per_step // seq_len
    steps = max(1, n_tokens // tokens_per_step)
    windows, n_documents = sample_windows(model, text, seq_len, steps * per_step, seed)
    if warmup_steps is not None and warmup_steps >= steps:
        warn(
            f"warmup_steps={warmup_steps} is not below the {steps} steps: the whole run trains "
            "at a fraction of lr.",
            UserWarning,
        )
    warmup, factor = _schedule(optimizer, steps, warmup_steps)
    config = _config(
        model=str(getattr(model.cfg, "model_name", "")),
        # A resumed run must see the same weights and tokens: names alone do not tell (tiny
        # models share SmolLM2's name; a list of texts was recorded as "list").
        unembedding=unembedding_digest(model),
        text=text if isinstance(text, str) else f"{type(text).__name__}",
        text_sha256=hashlib.sha256(torch.as_tensor(windows).cpu().numpy().tobytes()).hexdigest(),
        sites=sorted(set(kinds)),
        n_tokens=n_tokens,
        seq_len=seq_len,
        tokens_per_step=tokens_per_step,
        optimizer=optimizer,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        warmup_steps=warmup,
        precision=precision,
        seed=seed,
    )

    # Gradients flow through the translators also where the caller turned them off
    # (torch.set_grad_enabled(False), inference_mode).
    with gradients_enabled():
        lens = TunedLens.identity(model, kinds)
        # Trained where the model runs; the finished lens holds CPU tensors, as a loaded one does.
        device = model_adapter(model).device
        params = {}
        for kind in lens.weights:
            params[f"{kind}.weight"] = lens.weights[kind].to(device).requires_grad_(True)
            params[f"{kind}.bias"] = lens.biases[kind].to(device).requires_grad_(True)
        if optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                list(params.values()),
                lr=lr * (1 - momentum),
                momentum=momentum,
                nesterov=momentum > 0,
                weight_decay=weight_decay,
            )
        else:
            opt = torch.optim.Adam(
                list(params.values()),
                lr=lr,
                betas=(momentum, 0.999),
                amsgrad=True,
                weight_decay=weight_decay,
            )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        folder = Path(checkpoint).expanduser() if checkpoint is not None else None
        if folder is not None and folder.exists() and not folder.is_dir():
            raise ValueError(f"checkpoint={folder} is a file: pass a folder.")
        start, log, last_kl = (
            (0, [], None) if folder is None else _load_checkpoint(folder, config, params, opt)
        )
        if start:  # the schedule where the checkpoint left it
            sched.last_epoch = start
            for group, base in zip(opt.param_groups, sched.base_lrs, strict=True):
                group["lr"] = base * factor(start)

        step_fn = _Step(model, precision, chunk_rows=256)
        dtype = model_adapter(model).dtype
        norm_params = [p for p in model.ln_final.parameters() if p.requires_grad]
        capture = [Site(kind, layer) for kind, layer in keys]  # type: ignore[arg-type]
        final_site = Site("resid_post", n_layers - 1)
        began = time.perf_counter()
        try:
            for p in norm_params:  # gradients flow through the final norm, never into it
                p.requires_grad_(False)
            for step in progress_bar(
                range(start, steps), progress=progress, desc="tuned lens", total=steps - start
            ):
                rows = windows[step * per_step : (step + 1) * per_step]
                batch = Batch(rows, torch.ones_like(rows), "right", ("",) * len(rows))
                with torch.no_grad():
                    out = run(
                        model,
                        batch,
                        capture=[*capture, final_site],
                        logit_positions=-1,
                        batch_size=batch_size,
                        progress=False,
                    )
                    # Position 0 (BOS) is not trained on; rows x positions flatten to tokens.
                    # The translators train in float32 whatever the model's dtype (a bfloat16
                    # model's activations met float32 weights in baddbmm).
                    hidden = torch.stack(
                        [out[s][:, 1:].reshape(-1, out[s].shape[-1]).float() for s in capture]
                    )
                    final = out[final_site][:, 1:].reshape(-1, hidden.shape[-1]).float()
                    m, c, a = step_fn.targets(final)
                n = final.shape[0]
                ys = []
                offset = 0
                for kind in lens.weights:
                    k = len(lens.layers[kind])
                    h = hidden[offset : offset + k]  # [k, n, d]
                    w, b = params[f"{kind}.weight"], params[f"{kind}.bias"]
                    ys.append(h + torch.baddbmm(b[:, None, :], h, w.transpose(1, 2)))
                    offset += k
                y = torch.cat(ys)  # [T, n, d]
                # In the model's dtype (a half-precision LayerNorm refuses float32 input), back
                # to float32 for the loss; the gradient flows through both casts.
                u = model.ln_final(y.to(dtype)).float()
                kl, grad = step_fn.loss_and_grad(u.detach().reshape(-1, u.shape[-1]), m, c, a)
                _check_diverged(kl, step, steps, lr)
                # Sum over translators of the mean over tokens, as the paper's loss.
                torch.autograd.backward(u, grad.reshape(u.shape) / n)
                torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                # A finite loss can still be followed by a step to infinite weights (a huge lr).
                top = torch.stack([p.detach().abs().max() for p in params.values()])
                _check_diverged(top, step, steps, lr, "its weights")
                sched.step()
                per_translator = kl.reshape(len(keys), n).mean(1)
                log.append(round(float(per_translator.sum()), 5))
                last_kl = {
                    f"{kind} {layer}": round(float(v), 5)
                    for (kind, layer), v in zip(keys, per_translator, strict=True)
                }
                if folder is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
                    _save_checkpoint(folder, step + 1, config, params, opt, log, last_kl)
        finally:
            for p in norm_params:
                p.requires_grad_(True)
        # A new lens, not the identity's edited in place: a lens's digest is taken once.
        lens = TunedLens(
            {kind: params[f"{kind}.weight"].detach().cpu() for kind in lens.weights},
            {kind: params[f"{kind}.bias"].detach().cpu() for kind in lens.weights},
            lens.layers,
            n_layers=lens.n_layers,
            model_name=lens.model_name,
            unembed_digest=lens.unembed_digest,
            unembed_fingerprint=lens.unembed_fingerprint,
        )
    _warn_if_loss_rose(log, lr)
    info = dict(config)
    info.update(
        steps=steps,
        tokens=steps * tokens_per_step,
        trained_tokens=steps * per_step * (seq_len - 1),
        documents=n_documents,  # the windows', one window per document in turn
        wall_s=round(time.perf_counter() - began, 2),
        resumed_at=start,
        loss_per_step=log,
        # The weights' dtype it was trained on (the translators are float32 whatever it was).
        model_dtype=model_adapter(model).dtype_name,
    )
    if last_kl is not None:  # None only when resuming an older checkpoint that had finished
        info["last_step_kl"] = last_kl
    lens.info = info
    return lens
