# ---
# jupyter:
#   jupytext:
#     formats: py:percent,ipynb
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # mechprobe in one sitting
#
# One model, one question (how does SmolLM2-135M-Instruct know that the capital of France is
# Paris?), five tools: the **logit lens**, **activation patching**, Merullo et al.'s **FFN-update
# analysis** of the capitals task, a **layer-wise probe**, and an **erasure** of what the probe
# found, put back into the model.
#
# Every result below is the same kind of object: it prints as one line, shows a summary table in
# a notebook, draws itself with `.plot()`, turns into a DataFrame with `.to_frame()` and
# saves to JSON with `.save(path)`.
#
# This file is a [jupytext](https://jupytext.readthedocs.io) script: `docs/tutorial.ipynb` is
# made from it (`jupytext --to ipynb --execute docs/tutorial.py`), and the tests execute it on a
# small setting (`MECHPROBE_TUTORIAL_SMALL=1`) so that it cannot rot.

# %%
# %matplotlib inline
import os

import mechprobe as mp

SMALL = os.environ.get("MECHPROBE_TUTORIAL_SMALL") == "1"  # the tests' setting: fewer items
model = mp.load_model()  # the embedded SmolLM2-135M-Instruct, offline
model.cfg.n_layers, model.cfg.d_model

# %% [markdown]
# ## 1. Early decoding: when does " Paris" surface?
#
# First, what the model says: `predict` gives the most probable next tokens and scores answers
# (their rank, probability and whether greedy decoding says them); `report()` prints them as
# TransformerLens's `test_prompt` does, and `answers_frame()` gives them as a table.

# %%
prompt = "Q: What is the capital of France?\nA:"
pred = mp.predict(model, prompt, [[" Paris", " Rome", " Lyon"]], top_k=5, progress=False)
print(pred.report())
pred.answers_frame()

# %% [markdown]
# The logit lens decodes the residual stream after every block through the model's own final
# norm and unembedding. `targets` follows the answer's rank and probability layer by layer.

# %%
lens = mp.logit_lens(model, prompt, targets=" Paris", progress=False)
lens

# %%
lens.summary()

# %%
lens.plot()

# %% [markdown]
# ## 2. Activation patching: which layers carry the country?
#
# Run the prompt about Italy, and write in the residual stream of the prompt about France, one
# layer at a time at the last position. The metric is the logit difference " Paris" - " Rome":
# recovery 1 means that layer's state alone carries the whole answer.

# %%
clean = "Q: What is the capital of France?\nA:"
corrupt = "Q: What is the capital of Italy?\nA:"
patched = mp.patch(
    model, clean, corrupt, "resid_pre", -1, mp.logit_diff(" Paris", " Rome"), progress=False
)
patched

# %%
patched.plot()

# %% [markdown]
# The last position carries the answer only late: the country is read there by attention from
# the country's own token in the middle layers. Patching every position shows the route.

# %%
routes = mp.patch(
    model, clean, corrupt, "resid_pre", "all", mp.logit_diff(" Paris", " Rome"),
    layers=range(0, model.cfg.n_layers, 3), n_random=1 if SMALL else 3, progress=False,
)  # fmt: skip
routes.plot()

# %% [markdown]
# Patching says what the answer *needs*; direct logit attribution says what *writes* it: each
# head's and MLP's direct contribution to the same logit difference on the clean prompt, with the
# final norm's scale frozen at its value there, so the contributions sum to the model's own
# difference.

# %%
dla = mp.direct_logit_attribution(
    model, clean, mp.logit_diff(" Paris", " Rome"), heads=True, progress=False
)
dla.summary(top=8)

# %%
dla.plot()

# %% [markdown]
# Which earlier heads feed those writers? Edge attribution estimates every path from each head
# to the final residual and to the inputs of the two heads DLA ranks first, from one forward and
# backward pass (`method="exact"` patches each path instead: many paths per packed forward pass, but far
# more passes than the estimate's one).

# %%
top_heads = dla.summary(top=20)
writers = [
    mp.Site("q", int(layer), head=int(c.split("H")[1]))
    for c, layer in zip(top_heads["component"], top_heads["layer"], strict=True)
    if "H" in c
][:2]
paths = mp.path_patch(
    model, clean, corrupt, "head", ["final", *writers], mp.logit_diff(" Paris", " Rome"),
    positions=[-5, -4, -3, -2, -1], method="attribution", progress=False,
)  # fmt: skip
edges = paths.to_frame().query("receiver != 'final'")  # the paths into the two writers
edges.sort_values("effect", key=abs, ascending=False).head(8)

# %% [markdown]
# Where do the writers look? Their attention patterns on the clean prompt, with its tokens: from
# the last position, a head that moves the capital reads the country's token.

# %%
looks = mp.attention_patterns(
    model, clean, sites=[(s.layer, s.head) for s in writers], progress=False
)
looks.top_keys(-1, k=3)[["site", "rank", "key_position", "key_token", "weight"]]

# %%
looks.plot()

# %% [markdown]
# Some heads are known by where they look. `head_scores` reads every head's attention on
# repeated random tokens (Olsson et al.): an induction head looks at the token that followed the
# current token's earlier occurrence. docs/causal.md shows that zero-ablating SmolLM2's best five
# takes its accuracy on the repeated half from 0.65 to 0.001.

# %%
head_kinds = mp.head_scores(model, n_prompts=4 if SMALL else 10, progress=False)
head_kinds.plot(kind="induction")

# %% [markdown]
# ## 3. The capitals task, as Merullo et al. read it
#
# `relational_analysis` runs the whole argument: the task's accuracy, the stages of the logit
# lens (argument, then answer), the FFN update `o` at the layer where the answer appears, and
# that update written into other contexts beside random vectors of the same norm. Each step is
# also a public function (`task_pass`, `fit_ovector`, `ovector_controls`, `tuned_intervention`).

# %%
relational = mp.relational_analysis(
    model, "capitals", n_items=8 if SMALL else None, sweep_layers=None, n_random=1 if SMALL else 3,
    ablation=not SMALL, progress=False,
)  # fmt: skip
relational

# %%
relational.summary()

# %%
relational.trajectory.plot()

# %% [markdown]
# Read the summary with its controls: at the default cell (the o-vector replacing every FFN from
# the function layer to the last layer, scale 1) SmolLM2's o-vector puts the capital on top in
# none of the random-word contexts (another task's o-vector in 1 of 69). The paper's layer range does
# not transfer to this model: `sweep_layers="auto"` searches layer windows and scales on half of
# the contexts and reports the other half. For uppercasing and past tense it finds a narrow window
# at the top of the network where the o-vector moves held-out answers to top-1 (8% and 12%,
# against 0-1% for random vectors of the same norm); for capitals no window carries over to
# held-out countries (docs/relational.md, `demos/relational.py`).

# %% [markdown]
# ## 4. A probe: where is the country linearly decodable?
#
# `country_dataset` labels the last token of capital questions (four phrasings, 0, 1 or 3 shots)
# with their country; `collect` reads `resid_post` at every layer, and `probe_layers` fits one
# logistic probe per layer in a single batched solve. Hewitt & Liang's control task (a random label
# per word type; selectivity = accuracy - control accuracy) needs several word types per class;
# here each country is its own type, so control labels would only rename the classes:
# `groups=False` leaves it out, and the majority baseline is the reference.

# %%
countries = mp.country_dataset(n_countries=20, shots=(0, 1) if SMALL else (0, 1, 3), seed=0)
acts = mp.collect(model, countries, "resid_post", progress=False)
probes = mp.probe_layers(acts, groups=False, seed=0, progress=False)
probes

# %%
probes.plot()

# %% [markdown]
# ## 5. Erase it, and ask the model again
#
# LEACE removes the least it can (here 19 directions: classes - 1) so that no linear probe finds
# the country; INLP (Ravfogel et al.) removes probe directions again and again. The eraser is
# applied *inside* the model as a hook (Elazar et al.'s amnesic probing) at the last token of the
# same 20 countries' capital questions, beside random erasers of the same rank. Layer 23 is the
# block before the FFN that applies the relation (docs/amnesic.md): if the task breaks there
# under the real erasure and not under the random ones, the model reads that country identity.

# %%
layer = 23
eraser = mp.leace(acts.layer(layer), acts.labels)
task = mp.load_task("capitals").with_shots(3).subset(20, seed=0)  # the same 20 countries
amnesic = mp.amnesic(
    model, mp.Site("resid_post", layer), eraser, task=task, positions=-1,
    n_random=1 if SMALL else 5, dropout=False, seed=0, progress=False,
)  # fmt: skip
amnesic

# %%
amnesic.summary()

# %%
amnesic.plot()

# %% [markdown]
# What the model *says* with the eraser in place: greedy one-line answers to four of the same
# questions, intact and erased (`mp.generate` applies the eraser at each prompt's last token, as
# `amnesic` did; a completion is the text after "A:").

# %%
questions = task.prompts()[:4]
erased_spec = {mp.Site("resid_post", layer): mp.Project(eraser, positions=-1)}
intact = mp.generate(model, questions, max_new_tokens=6, stop_strings="\n", progress=False)
erased = mp.generate(
    model, questions, erased_spec, max_new_tokens=6, stop_strings="\n", progress=False
)
[(question.splitlines()[-2], a, b) for question, a, b in zip(
    questions, intact.completions, erased.completions, strict=True)]  # fmt: skip

# %% [markdown]
# With the eraser in place no answer is the country's capital, and two of them are *other*
# countries' capitals (on the full setting: Cairo for Algeria, Sana for Bahrain): the model still
# answers a capital question, about a country the erased directions no longer tell it.

# %% [markdown]
# INLP needs many more directions for 20 classes, and its random controls of that rank break the
# task too: it is not selective here.

# %%
inlp = mp.inlp(acts.layer(layer), acts.labels, n_iterations=5 if SMALL else 20, seed=0,
               progress=False)  # fmt: skip
inlp

# %% [markdown]
# ## Saving and reading back
#
# Every result saves to JSON (or `.npz` for large arrays) with a format tag, and
# `mechprobe.core.load_result` reads any of them back.

# %%
import tempfile
from pathlib import Path

with tempfile.TemporaryDirectory() as folder:
    path = probes.save(Path(folder) / "probes.json")
    again = mp.core.load_result(path)
again.to_frame().head()
