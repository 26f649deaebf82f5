"""kt-kernel's MoE call, driven line by line from bench_peers.py (runs in kt-kernel's own venv).

Reads the experts, routings and inputs bench_peers.py wrote (`--data FILE.safetensors`: the same expert
bytes dsv4 runs), builds `kt_kernel_ext.moe.AMXFP4_KGroup_MOE` as kt's own bench/bench_fp4_moe.py does
(MOEConfig + CPUInfer), prints "ready", then answers each stdin line "TOKENS CALLS" with one JSON line
{"tokens", "ms": [one per call]}. KTMoEWrapper is not used: it needs an accelerator (pin_memory).
"""

import argparse
import json
import sys
import time

import torch
from kt_kernel import kt_kernel_ext
from safetensors.torch import load_file


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=512)
    args = parser.parse_args()
    data = load_file(args.data)
    experts = int(data["meta"][0])
    topk, dim, inter = (int(v) for v in data["meta"][1:4])
    names = ("w1", "w3", "w2", "s1", "s3", "s2")  # gate, up, down and their scales
    sources = [[data[f"{name}.{e}"].contiguous() for name in names] for e in range(experts)]
    config = kt_kernel_ext.moe.MOEConfig(experts, topk, dim, inter, 0)
    cpu_infer = kt_kernel_ext.CPUInfer(args.threads)
    config.pool = cpu_infer.backend_
    config.max_len = args.max_tokens
    config.quant_config.bits = 4
    config.quant_config.group_size = 32
    config.quant_config.zero_point = False
    config.gate_projs = [[s[0].data_ptr() for s in sources]]
    config.up_projs = [[s[1].data_ptr() for s in sources]]
    config.down_projs = [[s[2].data_ptr() for s in sources]]
    config.gate_scales = [[s[3].data_ptr() for s in sources]]
    config.up_scales = [[s[4].data_ptr() for s in sources]]
    config.down_scales = [[s[5].data_ptr() for s in sources]]
    physical_to_logical = torch.arange(experts, dtype=torch.int64)
    moe = kt_kernel_ext.moe.AMXFP4_KGroup_MOE(config)
    cpu_infer.submit(moe.load_weights_task(physical_to_logical.data_ptr()))
    cpu_infer.sync()
    print("ready", flush=True)
    for line in sys.stdin:
        tokens, calls = (int(v) for v in line.split())
        samples = []
        for call in range(calls):
            x = data[f"x.{tokens}.{call}"].to(torch.bfloat16).contiguous()
            ids = data[f"idx.{tokens}.{call}"].to(torch.int64).contiguous()
            weights = data[f"w.{tokens}.{call}"].to(torch.float32).contiguous()
            out = torch.empty_like(x)
            qlen = torch.tensor([tokens], dtype=torch.int64)
            started = time.perf_counter()
            cpu_infer.submit(moe.forward_task(qlen.data_ptr(), 1, ids.data_ptr(), weights.data_ptr(), x.data_ptr(),
                                              out.data_ptr(), False))
            cpu_infer.sync()
            samples.append((time.perf_counter() - started) * 1e3)
            assert bool(torch.isfinite(out).all())
        print(json.dumps({"tokens": tokens, "ms": samples}), flush=True)


if __name__ == "__main__":
    main()
