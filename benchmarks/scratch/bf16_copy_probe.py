"""Which CUDA copies change bf16 byte pairs that read as NaNs (the FSDP2 QLoRA loss shift of 2026-11-30): every
one of the 65536 bf16 bit patterns through `_foreach_copy_`, `copy_` and FSDP2's copy-in op."""
import json
import os

import torch

pat = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).cuda()  # every bit pattern
nan = torch.isnan(pat)
out = {"nan_patterns": int(nan.sum())}


def changed(t):
    return int((t.view(torch.int16) != pat.view(torch.int16)).sum())


d = torch.empty_like(pat)
torch._foreach_copy_([d], [pat])
out["foreach_copy"] = changed(d)
d = torch.empty_like(pat)
d.copy_(pat)
out["copy"] = changed(d)
d = torch.empty(65536 * 3, dtype=torch.bfloat16, device="cuda")
torch._foreach_copy_(list(d.split([65536, 65536, 65536])), [pat, pat.clone(), pat.clone()])
out["foreach_copy_3"] = changed(d[:65536])
import torch.distributed.fsdp._fully_shard._fsdp_collectives  # noqa: F401  (registers torch.ops.fsdp)
o = torch.empty(65536 * 2, dtype=torch.bfloat16, device="cuda")
inp, _ = torch.ops.fsdp.all_gather_copy_in([pat[:32768], pat[32768:]], o, [32768, 32768], 65536, 1)
out["fsdp_copy_in"] = changed(inp)
print(json.dumps(out))
json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "bf16_copy_probe.json"), "w"))
