"""GPT-OSS HF Server: an inference server for gpt-oss and Hugging Face causal LMs."""

import os

__version__ = "0.1.0"

# torch's OpenMP threads spin after each parallel region while they wait for more work. On a CPU
# that something else also needs (the event loop, a client, another process), long spinning
# starves it: on 2 cores with one busy process beside it, libgomp's default made a decode step
# several times slower. Measured on SmolLM2 (ms per decode step, batch 1 / batch 8):
#   idle CPU:     default-like spinning 33 / 62, GOMP_SPINCOUNT=10000 36 / 68, passive waiting 54 / 88
#   one busy CPU: spinning 100000 173 / 326, GOMP_SPINCOUNT=10000 108 / 168, passive 57 / 114
# A short spin keeps nearly all of the idle speed and bounds the loss under contention. Set
# before torch is imported (libgomp reads it once); an operator's own setting wins.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
