"""A named backend without the Hub: register the local build as attn_implementation="flash_hub".

    python tools/build_local.py --variant cpu
    python hf_integration/examples/named_backend.py build
"""

import sys

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import flash_attn_hub

flash_attn_hub.register(name="flash_hub", source=sys.argv[1] if len(sys.argv) > 1 else "build")
config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=4)
model = AutoModelForCausalLM.from_config(config, attn_implementation="flash_hub")
ids = torch.randint(0, 1000, (2, 16))
mask = torch.ones_like(ids)
mask[0, :5] = 0                                  # left padding: goes through flash_attn_varlen_func
print(model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False))
