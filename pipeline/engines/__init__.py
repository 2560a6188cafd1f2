"""Model engines: the protocol in ``base`` and Qwen3-Omni through transformers in ``omni``."""
