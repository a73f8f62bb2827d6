"""Experiment `lora-mix`: cost of mixing K LoRA adapters in one batch, peft's loop vs the service's bank.

Runs the same batches (AG News test texts, length-sorted chunks) through:
  plain   the base model with one adapter merged in (what a merged variant costs),
  peft    PeftModel(..., adapter_names=[...]) — peft's per-adapter loop,
  bank    service.lora_bank.LoraBank — stacked weights, two bmm per layer,
for each K in --adapters, adapters drawn at random per row, methods in turn, each repeat starting one
method later, so machine noise and what ran before hit all alike. In-process: this is the compute ceiling of the adapter mix.

    python -m benchmarks lora-mix --precision auto --batch 32 --repeats 3 --out reports/results/lora-mix.json

Adapters are random-weight copies (speed does not depend on what they learned).
"""

from __future__ import annotations

import copy
import random
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from benchmarks.common import load_split
from benchmarks.experiment import Settings, experiment
from benchmarks.paths import agnews_data, base_model
from models.hardware import usable_cores


class LoraMixSettings(Settings):
    base: str = Field(default_factory=base_model, description="pretrained encoder (dir or Hub id)")
    data: str = Field(default_factory=agnews_data, description="AG News dir/file (test texts)")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto = bf16 only on native-bf16 CPUs")
    batch: int = Field(32, gt=0, description="rows per batch")
    batches: int = Field(8, gt=0, description="batches per timed pass")
    adapters: list[int] = Field([1, 8, 32], description="adapter counts K to mix")
    repeats: int = Field(3, gt=0, description="timed passes per method (best kept)")
    threads: int = Field(default_factory=usable_cores, gt=0, description="torch threads")


def _merged_one(pm: Any) -> Any:
    """The base with adapter a0 merged in: a model of exactly the merged variant's cost."""
    single = copy.deepcopy(pm)
    for name in list(single.peft_config):
        if name != "a0":
            single.delete_adapter(name)
    return single.merge_and_unload()


def render(docs: list[tuple[Path, dict[str, Any]]], fig_dir: Path, out_dir: Path) -> str:
    from benchmarks.report import source_line, table

    parts = ["## Mixing adapters in one forward (in-process, `lora-mix`)"]
    for f, doc in docs:
        p = doc["payload"]
        parts.append(
            f"\n{p['precision']['precision']} ({p['precision']['reason']}), batch {doc['settings']['batch']}, "
            f"{p['rows']} rows; plain = one adapter merged into the base: {p['rows_per_s']['plain']:.1f} rows/s.\n"
        )
        rows = [
            [
                key.split(":")[0],
                key.split(":")[1],
                p["rows_per_s"][key],
                f"{r['vs_one_adapter']:.2f}",
                f"{r['vs_merged']:.2f}",
            ]
            for key, r in p["ratios"].items()
        ]
        parts.append(table(["method", "adapters", "rows/s", "× one adapter", "× merged"], rows))
        parts.append("\n" + source_line(f, doc, out_dir))
    return "\n".join(parts)


@experiment(
    "lora-mix",
    LoraMixSettings,
    help="in-process: K mixed adapters per batch, peft loop vs LoRA bank vs merged",
    render=render,
)
def run(s: LoraMixSettings) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from models.hardware import resolve_precision, width_multiple
    from models.heads import head_modules
    from models.lora_weights import read_lora
    from service.lora_bank import LoraBank

    choice = resolve_precision(s.precision, "cpu")
    torch.set_num_threads(s.threads)
    torch.manual_seed(0)
    random.seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[choice.precision]
    tok = AutoTokenizer.from_pretrained(s.base)
    base = AutoModelForSequenceClassification.from_pretrained(s.base, num_labels=4)
    cfg = LoraConfig(
        r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=head_modules(base.config.model_type)
    )
    pm = get_peft_model(copy.deepcopy(base), cfg, adapter_name="a0")
    for i in range(1, max(s.adapters)):
        pm.add_adapter(f"a{i}", cfg)
    with torch.no_grad():  # non-zero B so every adapter really computes something
        for n, prm in pm.named_parameters():
            if "lora_B" in n:
                prm.normal_(0, 0.02)
    plain = copy.deepcopy(pm).merge_and_unload() if max(s.adapters) == 1 else _merged_one(pm)
    pm, plain = pm.to(dtype).eval(), plain.to(dtype).eval()
    bank = LoraBank(copy.deepcopy(base).to(dtype).eval())  # the service's path: adapters read from disk
    with tempfile.TemporaryDirectory() as tmp:
        pm.save_pretrained(tmp)  # each adapter in tmp/<name> (peft: only "default" goes to tmp itself)
        for name in pm.peft_config:
            w = read_lora(name, Path(tmp) / name, bank.model)
            bank.add(name, w.to(dtype, "cpu"))

    texts, _ = load_split(s.data, "test")
    texts = sorted(texts[: s.batch * s.batches], key=len)  # length-sorted chunks, as the batcher forms them
    multiple = width_multiple("cpu", choice.precision)  # padded as the service's runtime pads
    batches = [
        tok(
            texts[i : i + s.batch],
            padding=True,
            pad_to_multiple_of=multiple,
            truncation=True,
            max_length=128,
            return_tensors="pt",
        )
        for i in range(0, len(texts), s.batch)
    ]
    rows = sum(b["input_ids"].shape[0] for b in batches)

    def timed(method: str, k: int) -> float:
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
    timed("plain", 1)  # warm-up
    keys = ["plain"] + [f"{m}:{k}" for k in s.adapters for m in ("peft", "bank")]
    for rep in range(s.repeats):
        # each repeat starts one method later: what runs before a method (peft's slow loop left the
        # allocator and caches to the bank's pass) changes, so no method always follows the same one
        for key in keys[rep % len(keys) :] + keys[: rep % len(keys)]:
            method, k = (key.split(":") + ["1"])[:2]
            best[key] = min(best.get(key, float("inf")), timed(method, int(k)))
    rows_per_s = {key: rows / t for key, t in best.items()}
    ratios = {
        key: {"vs_one_adapter": rps / rows_per_s[f"{key.split(':')[0]}:1"], "vs_merged": rps / rows_per_s["plain"]}
        for key, rps in rows_per_s.items()
        if key != "plain" and f"{key.split(':')[0]}:1" in rows_per_s
    }
    print(f"[lora-mix] {choice.precision} ({choice.reason}), batch {s.batch}, {rows} rows, best of {s.repeats}")
    for key, r in ratios.items():
        print(
            f"[lora-mix]   {key:9s} {rows_per_s[key]:8.1f} rows/s  x{r['vs_one_adapter']:.2f} of 1 adapter, "
            f"x{r['vs_merged']:.2f} of merged"
        )
    return {"precision": choice.as_dict(), "rows": rows, "rows_per_s": rows_per_s, "ratios": ratios}
