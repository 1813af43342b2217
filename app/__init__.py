"""GPT-OSS HF Server: an inference server for gpt-oss and Hugging Face causal LMs."""

__version__ = "0.1.0"
