"""GPU check: a gpt-oss-20b-shaped model with random weights, plain generate() and this server, side by side.

It builds the model on the device directly (bf16, the real 20b architecture: 24 layers, 32 experts
of which 4 per token, 64 query and 8 key-value heads, sliding window 128, the o200k_harmony
vocabulary; speed does not depend on the weights' values), measures plain ``generate()``, checks
that replayed decode graphs give eager's greedy tokens, then serves the same weights in this
process (the real app on Hypercorn, port 0, over HTTP) and measures it against the plan's targets.
One table goes to stdout and the figures to JSON (``--out``); any failed check or missed target
exits 1, each reason on its own line. ``--cpu-smoke`` runs the same code on the CPU with the tiny
model, its decode steps captured by the frozen stand-in (frozen_capture.py) instead of CUDA graphs.

plan.py      what a run measures: counts, time limits, targets
build.py     the model, tokenizer and served weights; the preflight
baseline.py  plain generate()
capture.py   which capture the static path uses, counted
graphs.py    graphs vs eager vs generate(), token for token
server.py    the HTTP phases
report.py    phases under time limits, recorded
verdicts.py  the table's rows and the reasons a run fails
output.py    the table and the JSON
__main__.py  the order of phases and the command line
"""
