"""Transformers' own hook: the attention implementation named by its Hub repo id (kernels resolves
it), here on a small Llama built from a config (random weights, nothing downloaded).

From the Hub (branch v1), from the offline cache (HF_HUB_OFFLINE=1), or from a local build:
    LOCAL_KERNELS=flash-kernels/flash-attn=$PWD/build python hf_integration/examples/attn_implementation.py

`allow_all_kernels=True`: our org is not a trusted kernel publisher, so Transformers refuses the
kernel without it. `from_pretrained(..., attn_implementation=..., allow_all_kernels=True)` takes it
as a keyword; `from_config` in Transformers 5.22.2 would pass it on to the model's __init__ (a
TypeError), so a model built from a config switches with `set_attn_implementation`.
"""

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=4)
model = AutoModelForCausalLM.from_config(config)
model.set_attn_implementation("flash-kernels/flash-attn", allow_all_kernels=True)
ids = torch.randint(0, 1000, (2, 16))
print(model.generate(ids, max_new_tokens=8, do_sample=False))
