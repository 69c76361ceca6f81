"""Logit-lens walkthrough on SmolLM2-135M-Instruct: when does the answer appear, and what before it?

Decodes every layer's residual stream (``resid_post``) through the model's own final norm and
unembedding, scoring the answer (" Warsaw", " Paris") and the argument (" Poland", " France") side
by side, as in Merullo et al.'s early-decoding plots. Three prompts: the zero-shot questions for
Poland and France, and Poland after three demonstrations (France, Japan, Italy), the format in
which this small model actually answers.

Writes ``docs/figures/logit_lens_heatmap.png`` and ``docs/figures/logit_lens_trajectory.png``.
Run with ``.venv/bin/python demos/logit_lens.py`` (about half a minute on a laptop CPU).
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import mechprobe as mp

FIGURES = Path(__file__).resolve().parent.parent / "docs" / "figures"
QUESTION = "Q: What is the capital of {}?\nA:"


def main() -> None:
    model = mp.load_model()
    three_shot = mp.load_task("capitals").with_shots(3).prompt("Poland")
    prompts = [QUESTION.format("Poland"), QUESTION.format("France"), three_shot]
    targets = [[" Warsaw", " Poland"], [" Paris", " France"], [" Warsaw", " Poland"]]
    # The last 13 tokens hold the whole question (BOS + question in the zero-shot prompts).
    lens = mp.logit_lens(model, prompts, positions=list(range(-13, 0)), targets=targets)

    names = ["Poland", "France", "Poland, 3 shots"]
    print("At the last token: answer rank / argument rank (0 = top-1), then the lens's top-1")
    print(f"{'layer':>5}" + "".join(f"  {name:<29}" for name in names))
    for e in lens.entries("resid_post"):
        cells = []
        for b in range(len(prompts)):
            answer, argument = lens.target_rank[b, e]
            top = repr(lens.text(lens.top_ids[b, e, -1, 0]))
            cells.append(f"{answer:>5} /{argument:>6}  {top:<15}")
        print(f"{lens.layers[e]:>5}  " + "  ".join(cells))
    print(
        "\nThe model's own answer (last layer): "
        + ", ".join(
            f"{name}: {lens.text(lens.top_ids[b, -1, -1, 0])!r}" for b, name in enumerate(names)
        )
    )
    print(
        "Answer log-probability by teacher forcing at the last layer: "
        + ", ".join(
            f"{lens.targets[b][0]!r} {lens.target_logprob[b, -1, 0]:.2f}" for b in range(len(names))
        )
    )

    FIGURES.mkdir(parents=True, exist_ok=True)
    heatmap = lens.plot_heatmap(2, color="prob")
    heatmap.savefig(FIGURES / "logit_lens_heatmap.png", dpi=130)
    titles = ["Poland, zero-shot", "France, zero-shot", "Poland, three shots"]
    trajectory = lens.plot_trajectory([0, 1, 2], metric="rank", titles=titles)
    trajectory.savefig(FIGURES / "logit_lens_trajectory.png", dpi=130)
    print(
        f"\nwrote {FIGURES / 'logit_lens_heatmap.png'} and {FIGURES / 'logit_lens_trajectory.png'}"
    )


if __name__ == "__main__":
    main()
