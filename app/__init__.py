"""GPT-OSS HF Server: an inference server for gpt-oss and Hugging Face causal LMs."""

import os

__version__ = "0.1.0"

# torch's OpenMP threads spin while they wait for work. On a CPU that the event loop (and, in
# tests, the client) also needs, spinning threads starve it: measured on 2 cores with one other
# busy process, a decode step went from 14 ms to 150 ms. Passive waiting gives the CPU back.
# Set before torch is imported (OpenMP reads it once); an operator's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
