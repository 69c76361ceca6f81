"""The first thing to see: SmolLM2's answer, and the top token at every layer's residual stream.

Run with ``make demo`` (or ``.venv/bin/python demos/capital_of_france.py``).
"""

from __future__ import annotations

import torch

import mechprobe as mp

PROMPT = "Q: What is the capital of France?\nA:"


def main() -> None:
    model = mp.load_model()
    n = model.cfg.n_layers
    sites = [mp.Site("resid_post", layer, positions=-1) for layer in range(n)]
    out = mp.run(model, [PROMPT], capture=sites, logit_positions=-1)
    answer = model.to_string(out.logits[0, -1].argmax())
    print(f"Prompt: {PROMPT!r}\nSmolLM2-135M-Instruct answers: {answer!r}\n")
    paris = model.to_single_token(" Paris")
    print("layer  top token after the block (last position)   p(top)  rank of ' Paris'")
    with torch.no_grad():
        for layer, site in enumerate(sites):
            # Early decoding: the model's own final norm and unembedding applied mid-stream.
            probs = model.unembed(model.ln_final(out[site][:, -1])).softmax(-1)[0]
            p, tok = probs.max(-1)
            rank = int((probs > probs[paris]).sum())
            print(f"{layer:>5}  {model.to_string(tok)!r:<44} {p.item():6.3f}  {rank:>8}")


if __name__ == "__main__":
    main()
