"""Where do part of speech and country identity become linearly decodable in SmolLM2-135M?

Two layer-wise probing runs on the embedded SmolLM2-135M-Instruct:

1. Part of speech (15 UPOS tags from spaCy's en_core_web_sm, shipped with mechprobe) at the last
   sub-token of each word, with Hewitt & Liang's control task (one random tag per word type) and
   selectivity = accuracy - control accuracy.
2. Country identity at the last token of capital-question prompts ("Q: What is the capital of
   Chile?\\nA:", four phrasings x 0/1/3 shots, 30 countries), without a control task: its word
   type would be the country itself, so control labels would only rename the classes.

Slot -1 is the token embedding (``resid_pre`` of block 0: SmolLM2's positions are rotary, so the
residual stream starts as the embedding), slots 0..29 each block's ``resid_post``.
Figures go to docs/figures/probing_pos.png and docs/figures/probing_country.png, the results
(``ProbeResult`` JSON) to docs/probing_pos_results.json and docs/probing_country_results.json.

Run: ``python demos/probing.py`` (a few minutes on a laptop CPU).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import mechprobe as mp
from mechprobe.cli.probe import table

DOCS = Path(__file__).resolve().parent.parent / "docs"
FIGURES = DOCS / "figures"
N_POS = 4000
SEED = 0


def decodable_from(result: mp.ProbeResult, fraction: float = 0.9) -> int:
    """The first slot whose accuracy closes ``fraction`` of the gap from baseline to the best."""
    base, best = result.majority_baseline, float(result.accuracy.max())
    above = np.flatnonzero(result.accuracy >= base + fraction * (best - base))
    return int(result.layers[above[0]])


def run(
    model: object, dataset: mp.ProbingDataset, name: str, title: str, control: bool = True
) -> mp.ProbeResult:
    sites = [mp.Site("resid_pre", 0)] + [mp.Site("resid_post", layer) for layer in range(30)]
    acts = mp.collect(model, dataset, sites)
    result = mp.probe_layers(acts, groups=None if control else False, seed=SEED, progress=False)
    # Slot 0 is the embedding: number the slots -1 (embedding), 0..29 (blocks).
    result = dataclasses.replace(result, layers=np.arange(-1, len(sites) - 1))
    fig = result.plot()
    fig.suptitle(title)
    fig.axes[0].set_xlabel("layer (-1: the embeddings, resid_pre 0)")
    FIGURES.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURES / f"probing_{name}.png", dpi=150)
    # The record the README's numbers come from (mp.load_result reads it back).
    result.save(DOCS / f"probing_{name}_results.json")
    best = result.best_layer
    print(f"\n== {title}: {len(acts)} examples, {result.n_classes} classes")
    print(table(result))
    words = (
        f"decodable (90% of the way from baseline to best) from slot {decodable_from(result)}; "
        f"best slot {best} ({result.accuracy.max():.3f})"
    )
    if np.isfinite(result.selectivity).any():
        top = int(np.nanargmax(result.selectivity))
        words += f"; max selectivity {result.selectivity[top]:.3f} at slot {result.layers[top]}"
    print(words)
    print(f"wrote {FIGURES / f'probing_{name}.png'} and {DOCS / f'probing_{name}_results.json'}")
    return result


def main() -> None:
    model = mp.load_model()
    pos = mp.pos_dataset().sample(N_POS, seed=SEED)
    run(model, pos, "pos", "Part of speech (UPOS, last sub-token of each word)")
    country = mp.country_dataset(n_countries=30, shots=(0, 1, 3), seed=SEED)
    # Each country is its own word type: a control task would only rename the classes, so its
    # accuracy is read against the majority baseline instead.
    title = "Country identity (last token of capital questions)"
    run(model, country, "country", title, control=False)


if __name__ == "__main__":
    main()
