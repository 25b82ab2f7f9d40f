"""Transformers' own hook: attn_implementation="<repo-id>" (kernels resolves it).

From the Hub (branch v1), from the offline cache (HF_HUB_OFFLINE=1), or from a local build:
    LOCAL_KERNELS=flash-kernels/flash-attn=$PWD/build python hf_integration/examples/attn_implementation.py
"""

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=4)
# allow_all_kernels: our org is not a trusted kernel publisher (the check is skipped offline)
model = AutoModelForCausalLM.from_config(config, attn_implementation="flash-kernels/flash-attn",
                                         allow_all_kernels=True)
ids = torch.randint(0, 1000, (2, 16))
print(model.generate(ids, max_new_tokens=8, do_sample=False))
