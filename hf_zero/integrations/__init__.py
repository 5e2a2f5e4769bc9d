"""Host-framework integrations: `accelerate` (ZeroAccelerator) and `trainer` (ZeroTrainer).

They translate the host's calls into engine calls and delegate; `common` holds what they share.
Nothing is imported here, so `import hf_zero` stays free of accelerate and transformers.
"""
