"""In-process probe: cost of mixing K LoRA adapters in one batch, peft's loop vs the service's bank.

Runs the same batches (AG News test texts, length-sorted chunks) through:
  plain   the base model with one adapter merged in (what a merged variant costs),
  peft    PeftModel(..., adapter_names=[...]) — peft's per-adapter loop,
  bank    service.lora_bank.LoraBank — stacked weights, two bmm per layer,
for K = 1 and K = 8, 32 adapters drawn at random per row, alternating methods each repeat so
machine noise hits all alike. Prints throughput (rows/s) and ratios to K = 1 and to plain.

    python -m benchmarks.lora_mix_probe [--base PATH] [--precision bf16] [--batch 32] [--repeats 3]

Adapters are random-weight copies (speed does not depend on what they learned).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import time
from typing import Any

import torch

from models.heads import head_modules


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=os.environ.get("BASE_MODEL", "../shared/models/all-MiniLM-L6-v2"))
    p.add_argument("--data", default=os.environ.get("AGNEWS_DATA", "../shared/data/ag_news"))
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--adapters", default="1,8,32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)

    import pandas as pd
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from service.lora_bank import LoraBank

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    random.seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
    tok = AutoTokenizer.from_pretrained(args.base)
    base = AutoModelForSequenceClassification.from_pretrained(args.base, num_labels=4)
    arch = base.config.model_type
    counts = [int(k) for k in args.adapters.split(",")]
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=head_modules(arch))
    pm = get_peft_model(copy.deepcopy(base), cfg, adapter_name="a0")
    for i in range(1, max(counts)):
        pm.add_adapter(f"a{i}", cfg)
    with torch.no_grad():  # non-zero B so every adapter really computes something
        for n, prm in pm.named_parameters():
            if "lora_B" in n:
                prm.normal_(0, 0.02)
    plain = copy.deepcopy(pm).merge_and_unload() if max(counts) == 1 else _merged_one(pm)
    pm, plain = pm.to(dtype).eval(), plain.to(dtype).eval()
    bank = LoraBank(pm)
    bank.rebuild()

    texts = pd.read_parquet(f"{args.data}/test.parquet")["text"].tolist()[: args.batch * args.batches]
    texts.sort(key=len)  # length-sorted chunks, as the batcher forms them
    batches = [
        tok(texts[i : i + args.batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
        for i in range(0, len(texts), args.batch)
    ]
    rows = sum(b["input_ids"].shape[0] for b in batches)

    def run(method: str, k: int) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for b in batches:
                names = [f"a{random.randrange(k)}" for _ in range(b["input_ids"].shape[0])]
                if method == "plain":
                    plain(**b)
                elif method == "peft":
                    pm(**b, adapter_names=names)
                else:
                    bank.forward(names, **b)
        return time.perf_counter() - t0

    best: dict[str, float] = {}
    run("plain", 1)  # warm-up
    for _ in range(args.repeats):
        for key in ["plain"] + [f"{m}:{k}" for k in counts for m in ("peft", "bank")]:
            method, k = (key.split(":") + ["1"])[:2]
            best[key] = min(best.get(key, float("inf")), run(method, int(k)))
    out = {"precision": args.precision, "batch": args.batch, "rows": rows, "threads": args.threads, "rows_per_s": {}}
    print(f"{args.precision}, batch {args.batch}, {rows} rows, {args.threads} threads (best of {args.repeats})")
    print(f"  plain (merged)        {rows / best['plain']:7.1f} rows/s")
    for k in counts:
        for m in ("peft", "bank"):
            rps = rows / best[f"{m}:{k}"]
            out["rows_per_s"][f"{m}:{k}"] = rps
            print(
                f"  {m:4s} {k:3d} adapters     {rps:7.1f} rows/s  "
                f"x{rps / (rows / best[f'{m}:1']):.2f} of 1 adapter, x{rps / (rows / best['plain']):.2f} of merged"
            )
    out["rows_per_s"]["plain"] = rows / best["plain"]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    return out


def _merged_one(pm: Any) -> Any:
    """The base with adapter a0 merged in: a model of exactly the merged variant's cost."""
    single = copy.deepcopy(pm)
    for name in list(single.peft_config):
        if name != "a0":
            single.delete_adapter(name)
    return single.merge_and_unload()


if __name__ == "__main__":
    main()
