"""Quick service throughput/latency: one adapter vs 8 mixed, fp32 vs bf16, MiniLM vs RoBERTa-base size.

A quick check for the service issue (the full load tool is `python -m benchmarks load`). Builds
two scratch stores (not trained: speed does not depend on training), starts `python -m service`
on each at each precision, and drives it with N concurrent httpx clients sending one text per
request. Prints req/s, p50/p99 latency and the mean batch the server formed.

    python -m benchmarks.quick_service_bench --scratch /tmp/svc-bench --duration-s 10 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SHARED_DIR", ROOT.parent / "shared"))
MINILM = SHARED / "models" / "all-MiniLM-L6-v2"
AGNEWS_TEST = SHARED / "data" / "ag_news" / "test.parquet"
LABELS = ["World", "Sports", "Business", "Sci/Tech"]
N_ADAPTERS = 8


def build_store(root: Path, arch: str) -> Path:
    """A store with one base and 8 random LoRA adapters (r=8 on query/value, head saved)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import BertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

    from models import Store, head_modules
    from models.loading import load_tokenizer, save_base_snapshot
    from models.writing import write_variant

    store = Store(root)
    if len(store.names()) >= N_ADAPTERS:
        return root
    tok = load_tokenizer(MINILM)
    torch.manual_seed(0)
    if arch == "minilm":
        base = BertForSequenceClassification.from_pretrained(str(MINILM), num_labels=len(LABELS))
        base_model, init = str(MINILM), "pretrained"
    else:  # RoBERTa-base size, random init, with the MiniLM WordPiece tokenizer
        from training.config import ARCH_PRESETS  # the published RoBERTa-base shape, one source

        arch = {k: v for k, v in ARCH_PRESETS["roberta-base"].items() if k != "model_type"}
        cfg = RobertaConfig(**arch, pad_token_id=tok.pad_token_id, num_labels=len(LABELS))
        base, base_model, init = RobertaForSequenceClassification(cfg), "roberta-base-random", "random"
    base.eval()
    fp = save_base_snapshot(store, base, tok, base_model=base_model, init=init)
    golden = load_texts(8)
    for i in range(N_ADAPTERS):
        lcfg = LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            target_modules=["query", "value"],
            modules_to_save=head_modules(base.config.model_type),
            task_type=None,
        )
        pm = get_peft_model(copy.deepcopy(base), lcfg)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():  # lora_B starts at zero; make each adapter differ
            for _, p in pm.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
        write_variant(
            store,
            name=f"lora-{i}",
            kind="lora",
            model=pm.eval(),
            tokenizer=tok,
            labels=LABELS,
            max_length=128,
            base_model=base_model,
            base_fingerprint=fp,
            init=init,
            golden_texts=golden,
            overwrite=True,
        )
    return root


def load_texts(n: int) -> list[str]:
    import pandas as pd

    return pd.read_parquet(AGNEWS_TEST)["text"].head(n).tolist()


def start_server(
    store: Path, port: int, precision: str, threads: int, max_wait_ms: float, log: Path
) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "service",
        "--store",
        str(store),
        "--port",
        str(port),
        "--precision",
        precision,
        "--threads",
        str(threads),
        "--max-wait-ms",
        str(max_wait_ms),
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server not ready after 600 s; see {log}")


def batch_stats(url: str) -> tuple[float, float, float, float]:
    """(batch rows sum, batch count, distinct-adapter sum, forward seconds sum) from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    vals: dict[str, float] = {}
    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in fam.samples:
            vals[s.name] = vals.get(s.name, 0.0) + s.value  # summed over label sets
    return (
        vals["service_batch_size_rows_sum"],
        vals["service_batch_size_rows_count"],
        vals["service_batch_adapters_sum"],
        vals["service_compute_seconds_sum"],
    )


async def drive(url: str, adapters: list[str], texts: list[str], concurrency: int, duration_s: float) -> dict:
    latencies_ms: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + duration_s

    async def worker(k: int, client: httpx.AsyncClient) -> None:
        nonlocal errors
        i = k
        while time.perf_counter() < stop_at:
            body = {"model": adapters[i % len(adapters)], "inputs": texts[i % len(texts)]}
            t0 = time.perf_counter()
            r = await client.post(f"{url}/v1/classify", json=body)
            if r.status_code == 200:
                latencies_ms.append((time.perf_counter() - t0) * 1e3)
            else:
                errors += 1
            i += concurrency

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k, client) for k in range(concurrency)))
        wall_s = time.perf_counter() - t0
    q = statistics.quantiles(latencies_ms, n=100) if len(latencies_ms) > 1 else [float("nan")] * 99
    return {
        "requests": len(latencies_ms),
        "errors": errors,
        "req_per_s": len(latencies_ms) / wall_s,
        "p50_ms": q[49],
        "p99_ms": q[98],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scratch", type=Path, default=Path("/tmp/svc-bench"), help="where the scratch stores go")
    p.add_argument("--stores", default="minilm,roberta-base", help="comma list of minilm, roberta-base")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--duration-s", type=float, default=10.0, help="timed load per scenario")
    p.add_argument("--concurrency", type=int, default=16, help="concurrent clients")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="server torch threads")
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--port", type=int, default=18471)
    p.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    texts = load_texts(256)
    rows = []
    for store_name in args.stores.split(","):
        t0 = time.perf_counter()
        store = build_store(args.scratch / store_name, "minilm" if store_name == "minilm" else "roberta")
        print(f"# store {store_name} at {store} ready in {time.perf_counter() - t0:.1f}s", flush=True)
        for precision in args.precisions.split(","):
            url = f"http://127.0.0.1:{args.port}"
            proc = start_server(
                store,
                args.port,
                precision,
                args.threads,
                args.max_wait_ms,
                args.scratch / f"{store_name}-{precision}.log",
            )
            try:
                for scenario, adapters in [
                    ("1 adapter", ["lora-0"]),
                    ("8 mixed", [f"lora-{i}" for i in range(N_ADAPTERS)]),
                ]:
                    asyncio.run(drive(url, adapters, texts, args.concurrency, 1.5))  # warm-up
                    before = batch_stats(url)
                    res = asyncio.run(drive(url, adapters, texts, args.concurrency, args.duration_s))
                    after = batch_stats(url)
                    rows_sum, n_batches, ad_sum, compute_s = (a - b for a, b in zip(after, before, strict=True))
                    res.update(
                        store=store_name,
                        precision=precision,
                        scenario=scenario,
                        mean_batch_rows=rows_sum / max(n_batches, 1),
                        mean_adapters_per_batch=ad_sum / max(n_batches, 1),
                        mean_batch_compute_ms=compute_s / max(n_batches, 1) * 1e3,
                    )
                    rows.append(res)
                    print(
                        f"{store_name:13s} {precision:5s} {scenario:10s} {res['req_per_s']:7.1f} req/s  "
                        f"p50 {res['p50_ms']:7.1f} ms  p99 {res['p99_ms']:7.1f} ms  "
                        f"batch {res['mean_batch_rows']:5.1f} rows / {res['mean_adapters_per_batch']:.1f} adapters "
                        f"/ {res['mean_batch_compute_ms']:.0f} ms  "
                        f"errors {res['errors']}",
                        flush=True,
                    )
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    print(
        f"# concurrency {args.concurrency}, {args.duration_s:g} s per scenario, server threads {args.threads}, "
        f"max-wait {args.max_wait_ms:g} ms, one text per request (AG News test), client on the same machine"
    )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
