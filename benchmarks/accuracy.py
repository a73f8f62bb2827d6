"""Accuracy of every variant on the AG News test split, over HTTP (default) or in-process.

Per variant: accuracy with a 95% bootstrap interval, macro/weighted F1, precision, recall,
per-class scores and the confusion matrix. Across variants: McNemar's test between the full
fine-tune and each LoRA variant, and the argmax agreement matrix (exports should agree with
their source). Variants with random initial weights are skipped: their accuracy means nothing.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.common import load_split, write_results
from benchmarks.stats import bootstrap_ci, mcnemar

DEFAULT_URL = "http://127.0.0.1:8000"


def classification_metrics(y_true: list[int], y_pred: list[int], labels: list[str], seed: int = 0) -> dict[str, Any]:
    """Accuracy (+95% bootstrap CI), macro/weighted F1/precision/recall, per-class scores, confusion matrix."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    yt, yp = np.asarray(y_true), np.asarray(y_pred)
    idx = list(range(len(labels)))
    correct = yt == yp
    lo, hi = bootstrap_ci(correct, seed=seed)
    out: dict[str, Any] = {"n": int(len(yt)), "accuracy": float(correct.mean()), "accuracy_ci95": [lo, hi]}
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(yt, yp, labels=idx, average=avg, zero_division=0)
        out.update({f"precision_{avg}": float(p), f"recall_{avg}": float(r), f"f1_{avg}": float(f)})
    p, r, f, s = precision_recall_fscore_support(yt, yp, labels=idx, average=None, zero_division=0)
    out["per_class"] = {
        labels[i]: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
        for i in idx
    }
    out["confusion_matrix"] = confusion_matrix(yt, yp, labels=idx).tolist()
    return out


def agreement_matrix(preds: dict[str, list[int]]) -> dict[str, Any]:
    """Fraction of items on which each pair of variants predicts the same class."""
    names = list(preds)
    arr = {n: np.asarray(p) for n, p in preds.items()}
    return {"variants": names, "matrix": [[float((arr[a] == arr[b]).mean()) for b in names] for a in names]}


def http_predictor(
    url: str, labels_of: dict[str, list[str]], batch_size: int, api_key: str | None
) -> Callable[[str, list[str]], list[int]]:
    """A function (variant, texts) -> class indices that asks the service's /v1/classify."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    client = httpx.Client(base_url=url.rstrip("/"), timeout=120, headers=headers)

    def predict(name: str, texts: list[str]) -> list[int]:
        index = {label: i for i, label in enumerate(labels_of[name])}
        out: list[int] = []
        for i in range(0, len(texts), batch_size):
            r = client.post("/v1/classify", json={"model": name, "inputs": texts[i : i + batch_size]})
            if r.status_code != 200:
                raise RuntimeError(f"service answered {r.status_code} for '{name}': {r.text[:300]}")
            for row in r.json()["predictions"]:
                best = max(row, key=lambda d: d["score"])
                out.append(index[best["label"]])
        return out

    return predict


def inprocess_predictor(store: Any, batch_size: int) -> Callable[[str, list[str]], list[int]]:
    """A function (variant, texts) -> class indices loading each variant through models.loading (fp32, CPU)."""
    from models.loading import attach_adapter, compute_logits, load_base, load_full, load_tokenizer, onnx_session

    bases: dict[str, Any] = {}  # base fingerprint -> [peft model, tokenizer]

    def predict(name: str, texts: list[str]) -> list[int]:
        m = store.verify(name)
        path = store.path(name)
        adapter = None
        if m.kind == "lora":
            if m.base_fingerprint not in bases:
                model, tok, _ = load_base(store, m)
                bases[m.base_fingerprint] = [model, tok]
            adapter = name.replace(".", "_")  # peft adapter names may not contain '.'
            bases[m.base_fingerprint][0] = attach_adapter(bases[m.base_fingerprint][0], path, adapter)
            model, tok = bases[m.base_fingerprint]
        elif m.kind in ("full", "merged"):
            model, tok = load_full(path)
        else:
            model, tok = onnx_session(path), load_tokenizer(path)
        logits = compute_logits(model, tok, texts, m.max_length, adapter_name=adapter, batch_size=batch_size)
        return logits.argmax(-1).tolist()

    return predict


def run_accuracy(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """`python -m benchmarks accuracy`: evaluate, compare, write the results JSON."""
    from models import Store

    store = Store(args.store)
    texts, y = load_split(args.data)
    if args.limit and args.limit < len(texts):
        # a seeded random subset, the same for every variant (the file is in original order)
        keep = np.sort(np.random.default_rng(0).choice(len(texts), size=args.limit, replace=False))
        texts, y = [texts[i] for i in keep], [y[i] for i in keep]
    infos = {i.name: i for i in store.list()}
    names = args.variants or list(infos)
    evaluated, skipped, preds = {}, {}, {}
    todo = []
    for name in names:
        info = infos.get(name)
        if info is None or info.manifest is None:
            skipped[name] = f"not a readable variant in {store.root}" + (f": {info.error}" if info else "")
        elif info.manifest.init == "random":
            skipped[name] = "init=random: accuracy of random weights is not reported"
        else:
            todo.append(name)
    labels_of = {n: infos[n].manifest.labels for n in todo}
    if args.in_process:
        predict, where = inprocess_predictor(store, args.batch_size), "in-process (models.loading, fp32, CPU)"
    else:
        url = args.url or DEFAULT_URL
        predict, where = http_predictor(url, labels_of, args.batch_size, args.api_key), f"HTTP {url}/v1/classify"
    for name in todo:
        t0 = time.perf_counter()
        try:
            p = predict(name, texts)
        except Exception as e:  # one broken variant must not hide the others' results
            skipped[name] = f"evaluation failed: {e}"
            print(f"[accuracy] {name}: FAILED ({e})", flush=True)
            continue
        elapsed_s = time.perf_counter() - t0
        res = classification_metrics(y, p, labels_of[name])
        m = infos[name].manifest
        res.update(kind=m.kind, source=m.source, eval_time_s=elapsed_s, items_per_s=len(texts) / elapsed_s)
        evaluated[name], preds[name] = res, p
        lo, hi = res["accuracy_ci95"]
        print(
            f"[accuracy] {name:>32} ({m.kind}): acc {res['accuracy']:.4f} [{lo:.4f}, {hi:.4f}], "
            f"macro-F1 {res['f1_macro']:.4f} ({elapsed_s:.1f}s)",
            flush=True,
        )
    tests = []
    fulls = [n for n in evaluated if evaluated[n]["kind"] == "full"]
    y_arr = np.asarray(y)
    for ref in fulls:
        for other in (n for n in evaluated if evaluated[n]["kind"] == "lora"):
            t = mcnemar(np.asarray(preds[ref]) == y_arr, np.asarray(preds[other]) == y_arr)
            t.update(
                variant_a=ref, variant_b=other, accuracy_diff=evaluated[ref]["accuracy"] - evaluated[other]["accuracy"]
            )
            tests.append(t)
            print(f"[accuracy] McNemar {ref} vs {other}: b={t['b']} c={t['c']} p={t['p_exact']:.3g}", flush=True)
    for name, reason in skipped.items():
        print(f"[accuracy] skipped {name}: {reason}", flush=True)
    settings = {"store": str(store.root), "data": str(args.data), "limit": args.limit, "n": len(texts), "via": where}
    payload = {
        "settings": settings,
        "variants": evaluated,
        "skipped": skipped,
        "mcnemar": tests,
        "agreement": agreement_matrix(preds) if preds else None,
    }
    return write_results(args.out, "accuracy", payload, argv)
