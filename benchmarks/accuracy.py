"""Accuracy of every variant on the AG News test split, over HTTP (default) or in-process.

Per variant: accuracy with a 95% bootstrap interval, macro/weighted F1, precision, recall,
per-class scores and the confusion matrix. Across variants: McNemar's test between the full
fine-tune and each LoRA variant, and the argmax agreement matrix (exports should agree with
their source). Variants with random initial weights are skipped: their accuracy means nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from pydantic import Field

from benchmarks.common import load_split
from benchmarks.experiment import Settings, experiment
from benchmarks.paths import agnews_data
from benchmarks.stats import bootstrap_ci, mcnemar
from training.metrics import classification_metrics

DEFAULT_URL = "http://127.0.0.1:8000"


def accuracy_metrics(y_true: list[int], y_pred: list[int], labels: list[str], seed: int = 0) -> dict[str, Any]:
    """training.metrics.classification_metrics (the one metrics function) plus a 95% bootstrap CI on accuracy."""
    out = classification_metrics(y_true, y_pred, labels)
    lo, hi = bootstrap_ci(np.asarray(y_true) == np.asarray(y_pred), seed=seed)
    out["accuracy_ci95"] = [lo, hi]
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
        # requests of similar-length texts pad little (as models.variant.predict batches in-process);
        # the answers are put back in the callers' order
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = [0] * len(texts)
        for i in range(0, len(order), batch_size):
            chunk = order[i : i + batch_size]
            r = client.post("/v1/classify", json={"model": name, "inputs": [texts[j] for j in chunk]})
            if r.status_code != 200:
                raise RuntimeError(f"service answered {r.status_code} for '{name}': {r.text[:300]}")
            for j, row in zip(chunk, r.json()["predictions"], strict=True):
                best = max(row, key=lambda d: d["score"])
                out[j] = index[best["label"]]
        return out

    return predict


def service_refusals(url: str, names: list[str], api_key: str | None) -> dict[str, str]:
    """Variants among `names` the service at `url` has not loaded, with the reason it gives (GET /v1/models).

    A refused variant answers 404 to every request; its accuracy must be reported as refused,
    with the reason, not attempted (and never as a figure).
    """
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(f"{url.rstrip('/')}/v1/models", headers=headers, timeout=30)
        r.raise_for_status()
        listed = {m["name"]: m for m in r.json().get("data", [])}
    except (httpx.HTTPError, ValueError, KeyError):
        return {}  # an older or different server: requests will tell
    out = {}
    for name in names:
        info = listed.get(name)
        if info is None:
            out[name] = "not known to the service"
        elif not info.get("loaded"):
            out[name] = "refused by the service: " + (info.get("error") or "not loaded (no reason given)")
    return out


def inprocess_predictor(store: Any, batch_size: int) -> Callable[[str, list[str]], list[int]]:
    """A function (variant, texts) -> class indices loading each variant through models.load_variant (fp32, CPU).

    LoRA variants on the same base share one loaded base, as in the service.
    """
    from models.variant import load_variant

    bases: dict[str, Any] = {}  # base fingerprint -> the last LoadedVariant on it (holds the PeftModel)

    def predict(name: str, texts: list[str]) -> list[int]:
        m = store.manifest(name)
        if m.kind == "lora":
            # peft adapter names may not contain '.'
            v = load_variant(store, name, onto=bases.get(m.base_fingerprint), adapter_name=name.replace(".", "_"))
            bases[m.base_fingerprint] = v
        else:
            v = load_variant(store, name)
        return v.predict(texts, batch_size=batch_size)

    return predict


class AccuracySettings(Settings):
    store: str = Field(description="model store directory (variants to evaluate)")
    data: str = Field(default_factory=agnews_data, description="AG News dir/file or Hub id (its test split is used)")
    url: str | None = Field(None, description=f"service URL (default {DEFAULT_URL}); ignored with --in-process")
    in_process: bool = Field(False, description="load variants through models.load_variant instead of over HTTP")
    variants: list[str] | None = Field(None, description="variants to evaluate (default: every variant in the store)")
    limit: int | None = Field(None, gt=0, description="evaluate a seeded random subset of N test rows")
    batch_size: int = Field(32, gt=0, description="texts per request / forward")
    api_key: str | None = Field(
        default_factory=lambda: os.environ.get("SERVICE_API_KEY"), description="API key (env SERVICE_API_KEY)"
    )


@experiment(
    "accuracy",
    AccuracySettings,
    help="accuracy, F1, bootstrap CI, McNemar and agreement of every variant (over HTTP or in-process)",
)
def run(s: AccuracySettings) -> dict[str, Any]:
    """Evaluate every variant; refused or failed variants go to `failed` with the reason, never into the figures.

    `skipped` lists variants deliberately not evaluated (random initial weights).
    """
    from models import Store

    store = Store(s.store)
    if not store.root.is_dir():
        raise FileNotFoundError(f"--store {store.root} is not a directory; train or copy a store there first")
    texts, y = load_split(s.data)
    if s.limit and s.limit < len(texts):
        # a seeded random subset, the same for every variant (the file is in original order)
        keep = np.sort(np.random.default_rng(0).choice(len(texts), size=s.limit, replace=False))
        texts, y = [texts[i] for i in keep], [y[i] for i in keep]
    infos = {i.name: i for i in store.list()}
    names = s.variants or list(infos)
    evaluated: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    failed: dict[str, str] = {}
    preds: dict[str, list[int]] = {}
    todo = []
    for name in names:
        info = infos.get(name)
        if info is None or info.manifest is None:
            failed[name] = f"not a readable variant in {store.root}" + (f": {info.error}" if info else "")
        elif info.manifest.init == "random":
            skipped[name] = "init=random: accuracy of random weights is not reported"
        else:
            todo.append(name)
    labels_of = {n: infos[n].manifest.labels for n in todo}
    if s.in_process:
        predict, where = inprocess_predictor(store, s.batch_size), "in-process (models.load_variant, fp32, CPU)"
    else:
        url = s.url or DEFAULT_URL
        predict, where = http_predictor(url, labels_of, s.batch_size, s.api_key), f"HTTP {url}/v1/classify"
        failed.update(service_refusals(url, todo, s.api_key))
        todo = [n for n in todo if n not in failed]
    for name in todo:
        t0 = time.perf_counter()
        try:
            p = predict(name, texts)
        except Exception as e:  # one broken variant must not hide the others' results
            failed[name] = f"evaluation failed: {type(e).__name__}: {e}"
            continue
        elapsed_s = time.perf_counter() - t0
        res = accuracy_metrics(y, p, labels_of[name])
        m = infos[name].manifest
        res.update(kind=m.kind, source=m.source, eval_time_s=elapsed_s, items_per_s=len(texts) / elapsed_s)
        evaluated[name], preds[name] = res, p
        lo, hi = res["accuracy_ci95"]
        print(
            f"[accuracy] {name:>32} ({m.kind}): acc {res['accuracy']:.4f} [{lo:.4f}, {hi:.4f}], "
            f"macro-F1 {res['macro_f1']:.4f} ({elapsed_s:.1f}s)",
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
    for name, reason in failed.items():
        print(f"[accuracy] NOT EVALUATED {name}: {reason}", flush=True)
    return {
        "n": len(texts),
        "via": where,
        "variants": evaluated,
        "skipped": skipped,
        "failed": failed,
        "mcnemar": tests,
        "agreement": agreement_matrix(preds) if preds else None,
    }
