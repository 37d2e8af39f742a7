"""Which group sizes each GPU int4 layout computes correctly: F.linear through the preshuffled and the plain
layout against the dequantized weight, for G in {32, 64, 128, 256} and several K (relative error; a correct
conversion gives ~2e-3 in bf16).

    python -m benchmarks.int4_group_sizes
"""

import json
from pathlib import Path


import torch
import torch.nn.functional as F

from shardgen.actors import int4


def main() -> None:
    from torchao.prototype.tensor_conversion.api import convert_to_packed_tensor_based_on_current_hardware

    rows = []
    for g in (32, 64, 128, 256):
        for k in (256, 512, 1024, 4096):
            if k % g:
                continue
            torch.manual_seed(k + g)
            w = (torch.randn(512, k, device="cuda") * 0.05).to(torch.bfloat16)
            plain = int4.quantize(w, g)
            ref = int4.dequantize(plain, torch.float32)
            for m in (1, 37):
                x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
                want = x.float() @ ref.T
                errs = {"plain": F.linear(x, int4.contiguous(plain)).float()}
                errs["preshuffled"] = F.linear(x, convert_to_packed_tensor_based_on_current_hardware(
                    int4.contiguous(int4.quantize(w, g)))).float()
                row = {"G": g, "K": k, "M": m, **{n: round(((v - want).norm() / want.norm()).item(), 5) for n, v in errs.items()}}
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = Path("benchmarks/results") / f"int4_group_sizes-{torch.cuda.get_device_name().replace(' ', '_')}.json"
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
