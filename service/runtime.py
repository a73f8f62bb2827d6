"""The models: one shared base with LoRA adapters, full/merged torch models, ONNX sessions.

The batcher thread calls the mutating methods (`load`, `commit`, `unload`, `ensure_resident`,
`settle`, `evict_over_cap`) only while no batch runs; `forward` runs on the batcher thread or on
CPU lane threads, several at once (service/batcher.py; the bank keeps each thread's rows).
`prepare` (verify + golden check of a new variant) runs on the swap worker thread and touches only
new objects and the side model (service/side.py); the swap worker may then `commit_beside` a
running batch, into a bank slot no running row reads, under `lock` (which the batcher holds while
it forms a batch), so a swap never tears a batch. The engine's socket thread only reads `entries`
(dict reads are atomic under the GIL; entries are replaced whole).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import hashlib
import itertools
import json
import logging
import math
import threading
import time
import types
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from models import Manifest, Store, VariantNotFound, VariantRefused, dir_bytes
from models.golden import check_golden, load_tolerance
from models.hardware import (
    PrecisionChoice,
    faster_precision,
    model_key,
    probe_ms,
    resolve_precision,
    width_multiple,
)
from models.loading import length_chunks, load_base, model_mask, onnx_logits, pad_rows, padded_width
from models.lora_weights import LoraWeights, read_lora
from models.manifest import Golden
from models.variant import ONNX_KINDS, LoadedVariant, load_variant
from service.config import ServiceConfig
from service.errors import ModelNotFound, Refused, ServiceError
from service.graphs import GraphedForward
from service.lora_bank import LoraBank
from service.side import SideModel

log = logging.getLogger("service")
LORA_GROUP = "__lora__"  # all resident adapters share one forward over the base
LANE_ROW_S = 0.002  # a row costing more runs on CPU lanes (Runtime.lane_parallel)
NO_GOLDEN = Golden.model_construct(texts=[], logits=[])  # what a served entry keeps of its golden set


def tokenizer_model(tokenizer_json: str) -> dict[str, Any]:
    """A fast tokenizer as the installed `tokenizers` serialises it, without its truncation and padding
    (set per call, not part of what it computes): equal for two files only if they tokenise alike, whatever
    version of the library wrote them."""
    from tokenizers import Tokenizer

    data = json.loads(Tokenizer.from_str(tokenizer_json).to_str())
    data.pop("truncation", None)
    data.pop("padding", None)
    return data


def tokenizer_key(tokenizer_json: str, max_length: int, truncation_side: str = "right") -> str:
    """Content hash of a serialised tokenizer, its truncation length and side (hashing MiniLM's takes ~8 ms).

    The side is the HF tokenizer's `truncation_side` (tokenizer_config.json), which tokenizer.json does not
    carry: two variants whose files differ only there truncate long texts at opposite ends."""
    return hashlib.sha256(f"{tokenizer_json}\0{max_length}\0{truncation_side}".encode()).hexdigest()[:16]


def truncation_side(tokenizer: Any) -> str:
    """Which end an HF tokenizer cuts a long text at ("right" unless its tokenizer_config.json says "left")."""
    return getattr(tokenizer, "truncation_side", "right")


@dataclass
class Usage:
    """A name's request history, shared by its versions: a batch formed before a hot-swap answers on the old one."""

    last_used: float = 0.0
    request_count: int = 0


@dataclass
class Entry:
    """One servable variant. `model` is a torch module or ONNX session; LoRA entries use `adapter`."""

    name: str
    manifest: Manifest
    tokenizer: Any
    bytes: int
    model: Any = None
    adapter: str | None = None  # its name in the LoRA bank while resident
    lora: LoraWeights | None = None  # a prepared adapter's tensors, until commit copies them into the bank
    resident: bool = True
    # HF fast tokenizers are not thread-safe when truncation/padding settings change between calls
    # ("RuntimeError: Already borrowed"); every call on this tokenizer goes through this lock.
    tok_lock: threading.Lock = field(default_factory=threading.Lock)
    graphed: GraphedForward | None = None  # CUDA graphs of this full/merged model (service/graphs.py)
    loaded_at: float = field(default_factory=time.time)
    usage: Usage = field(default_factory=Usage)
    seq: int = 0  # arrival order of the PUT that loaded it (Batcher.command; 0 at startup)
    _tok_key: str | None = None

    @property
    def kind(self) -> str:
        return self.manifest.kind

    @property
    def tok_key(self) -> str:
        """Content hash of the tokenizer and truncation length: front-ends tokenise with the tokenizer of this key."""
        if self._tok_key is None:
            self._tok_key = tokenizer_key(
                self.tokenizer_json(), self.manifest.max_length, truncation_side(self.tokenizer)
            )
        return self._tok_key

    def tokenizer_json(self) -> str:
        """The fast tokenizer serialised (tokenizers.Tokenizer.from_str rebuilds it in a front-end)."""
        with self.tok_lock:
            return self.tokenizer.backend_tokenizer.to_str()

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text, truncated to the manifest's max_length, unpadded."""
        with self.tok_lock:
            return self.tokenizer(texts, truncation=True, max_length=self.manifest.max_length)["input_ids"]

    @property
    def group(self) -> str:
        """Rows with the same group can share one forward."""
        return LORA_GROUP if self.kind == "lora" else self.name


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to give back this way
        return None


def bf16_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A bf16 copy of `model`, made without first copying its fp32 parameters (tied ones stay tied)."""
    memo: dict[int, Any] = {
        id(p): torch.nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=p.requires_grad)
        for p in model.parameters()
    }
    return copy.deepcopy(model, memo).to(torch.bfloat16)


def prepack_linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """Give every CPU Linear of `model` (fp32, or bf16 where oneDNN computes it) its weight reordered once
    into oneDNN's blocked layout, and a forward that reads it; returns the Linears packed (see use_packed).

    Why: aten's linear on CPU re-packs the weight on every call, which dominates a small batch's matmuls.
    This is what torch.compile's CPU freezing pass does (the same two mkldnn ops), without compiling.
    Measured (2-core Xeon family 6 model 207 with AMX, one thread, 8 interleaved pairs): MiniLM bf16, a
    384x1536 Linear at 16 rows 0.19 -> 0.10 ms, at 512 rows 1.56 -> 1.22 ms; whole forwards 1.25x at
    batch 1, 1.13x at batch 8, 1.10x at batch 64, logits bitwise equal. But the 2-layer width-32 model
    (fp32) got slower, 0.68x at batch 1 (oneDNN's fixed cost per call outweighs packing a 32x64 weight),
    so the runtime keeps it only where it measured faster (Runtime._serving). Hooks (the LoRA bank's)
    still run and `weight` stays (the bank reads it); the reordered copy is a buffer, so a deepcopy that
    shares buffers (service/side.py) shares it too. Inference only: the packed copy does not follow later
    writes to `weight`, and autocast does not see the op (the runtime packs only models that compute in
    their weights' dtype).
    """
    ops = torch.ops.mkldnn
    if not (torch.backends.mkldnn.is_available() and hasattr(ops, "_linear_pointwise")):
        return []
    dtypes = {torch.float32} | ({torch.bfloat16} if ops._is_mkldnn_bf16_supported() else set())
    packed = []
    with torch.no_grad():
        for module in model.modules():
            if type(module) is not torch.nn.Linear:
                continue
            w = module.weight
            if w.device.type != "cpu" or w.dtype not in dtypes:
                continue
            module.register_buffer("packed_weight", ops._reorder_linear_weight(w.detach(), None), persistent=False)
            packed.append(module)
    use_packed(packed, True)
    return packed


def use_packed(linears: list[torch.nn.Linear], on: bool) -> None:
    """Switch prepacked Linears to their packed forward (on) or back to nn.Linear's own (off)."""
    for module in linears:
        if on:
            module.forward = types.MethodType(_packed_linear, module)
        else:
            module.__dict__.pop("forward", None)


def drop_packed(linears: list[torch.nn.Linear]) -> None:
    """Undo prepack_linears: nn.Linear's own forward, and the reordered copies freed."""
    use_packed(linears, False)
    for module in linears:
        del module.packed_weight


def _packed_linear(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


def release_freed_memory() -> None:
    """Give freed heap pages back to the OS after the set of adapters changed (glibc only; no-op elsewhere).

    A bank that grows frees its previous stacks, and a swap frees the adapter's file tensors, across the
    batcher and swap-worker threads' malloc arenas; glibc keeps those pages (with peft attaches, resident
    memory grew ~1.3 MB per added MiniLM adapter against ~0.3 MB of its fp32 tensors; 0.57 MB with this).
    Runs only when adapters change.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class Runtime:
    """Owns every model of one device; see the module docstring for the threading rule."""

    def __init__(self, store: Store, cfg: ServiceConfig, on_evict: Callable[[int], None] | None = None):
        self.store = store
        self.on_evict = on_evict or (lambda n: None)
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        # --precision auto: bf16 only where the hardware computes it natively (models/hardware.py)
        self.precision_choice: PrecisionChoice = resolve_precision(cfg.precision, cfg.device)
        self.precision = self.precision_choice.precision
        # bf16 on CPU: autocast keeps fp32 master weights (golden checks stay exact-ish) while
        # matmuls run in bf16 on avx512_bf16; "weights" casts the weights instead.
        self.weight_dtype = self.precision
        if self.precision == "bf16" and cfg.device == "cpu" and cfg.bf16_mode == "autocast":
            self.weight_dtype = "fp32"
        # auto on a CPU with native bf16: each torch model computes in bf16 only where that measured faster
        # for its architecture at its first load (models.hardware.faster_precision); an explicit
        # --precision is taken as is. Measured (2-core Xeon with AMX): MiniLM keeps bf16 (~2x fp32); the
        # 2-layer width-32 model computes in fp32: ceiling c=32 1,326 -> 1,486 req/s, c=1 p50 4.7 -> 3.7 ms.
        self.per_model = cfg.precision == "auto" and self.device.type == "cpu" and self.precision == "bf16"
        self.model_precision: dict[str, dict[str, Any]] = {}  # model_key -> faster_precision's measurement
        self.model_prepack: dict[str, bool] = {}  # model_key:dtype -> whether prepacked Linears measured faster
        # per model, torch models load in fp32 and become bf16 (weights or autocast) where bf16 won
        self.load_dtype = "fp32" if self.per_model else self.weight_dtype
        if self.per_model:
            c = self.precision_choice
            why = "; per model: bf16 only where it measured faster at load (each variant's precision in /v1/models)"
            self.precision_choice = PrecisionChoice(c.precision, c.reason + why, c.requested)
        self.version = 0  # bumped whenever the set of servable variants changes (front-ends cache it)
        self.entries: dict[str, Entry] = {}
        # `entries` and the bank's slots change under this lock: the batcher holds it while it picks a
        # batch and while it loads/evicts between batches; the swap worker while it commits an adapter
        # beside a running batch (commit_beside). Versions replaced there are freed by `settle`.
        self.lock = threading.RLock()
        self._retired: list[Entry] = []
        self._fresh: set[str] = set()
        self.refused: dict[str, str] = {}  # name -> last refusal reason (shown in /v1/models)
        self._last_op: dict[str, int] = {}  # name -> seq of the last load/unload applied (see _commit)
        self.base: Any = None  # the plain classifier every LoRA adapter runs over (through self.bank)
        self.base_tokenizer: Any = None
        self.base_fingerprint: str | None = None
        self.base_manifest: Manifest | None = None
        self.base_tok_lock = threading.Lock()  # shared by every LoRA entry: one tokenizer object
        self.base_tok_json: str | None = None
        # per truncation length: LoRA entries share the base's tokenizer, and front-ends truncate to the
        # max_length the engine answers for a key, so each length is a key of its own (hashing takes ~8 ms)
        self._lora_tok_keys: dict[int, str] = {}
        self._base_tok_model: dict[str, Any] | None = None  # tokenizer_model of the base tokenizer served
        self._tok_matches: set[str] = set()  # sha256 of adapters' tokenizer.json files found equal to it
        self._adapter_ids = itertools.count()
        self.bank: LoraBank | None = None  # every resident adapter's weights, stacked (service/lora_bank.py)
        self.side: SideModel | None = None  # where new adapters are golden-checked beside the serving base
        # CUDA graphs (service/graphs.py): "capture" on CUDA unless --cuda-graphs off; "off" runs eagerly,
        # padded to the longest row (tests run graphs.GraphedForward's padded path with capture=False).
        self.graph_mode = "capture" if cfg.device == "cuda" and cfg.cuda_graphs != "off" else "off"
        self.graph_pool: Any = torch.cuda.graph_pool_handle() if self.graph_mode == "capture" else None
        self.gpu_lock = threading.Lock()  # the swap worker's GPU work vs a graph capture
        self.lora_graphed: GraphedForward | None = None
        self._costs: dict[str, tuple[float, float]] = {}  # model -> (fixed s, s per token) of a forward (_cost)

    # ---- precision -------------------------------------------------------------------------
    def autocast(self, precision: str | None = None) -> contextlib.AbstractContextManager:
        """The context for a forward computing in `precision` (a model's precision_of; None: the service's)."""
        if self._autocasts(precision):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _autocasts(self, precision: str | None = None) -> bool:
        autocasting = self.precision == "bf16" and self.weight_dtype == "fp32"  # else bf16 is in the weights
        return autocasting and (precision or self.precision) == "bf16"

    def _serving(self, model: Any, pad_id: int) -> Any:
        """`model` as it serves: on CPU with --cpu-prepack, its Linears prepacked (prepack_linears) where that
        measured faster for its architecture (once, at its first load) and it does not compute under autocast."""
        if not (
            self.cfg.cpu_prepack
            and self.device.type == "cpu"
            and isinstance(model, torch.nn.Module)
            and not self._autocasts(self.precision_of(model))
        ):
            return model
        key = f"{model_key(model)}:{next(model.parameters()).dtype}"
        if self.model_prepack.get(key) is False:  # measured slower for this architecture: nothing to reorder
            return model
        linears = prepack_linears(model)
        if linears and key not in self.model_prepack:

            def forward(packed: bool, ids: torch.Tensor, mask: torch.Tensor) -> Any:
                use_packed(linears, packed)
                return model(input_ids=ids, attention_mask=mask)

            ms = probe_ms(forward, (False, True), pad_id)
            self.model_prepack[key] = ms[True] < ms[False]
            log.info(
                "%s: prepacked Linears %s (probe %.1f ms, plain %.1f ms)",
                key,
                ms[True] < ms[False],
                ms[True],
                ms[False],
            )
        if linears and self.model_prepack[key]:
            use_packed(linears, True)  # the probe may have left them on the plain forward
        elif linears:
            drop_packed(linears)
        return model

    def precision_of(self, model: Any) -> str:
        """What torch `model` computes in: the service's precision, unless measured per model (see __init__)."""
        if self.per_model and isinstance(model, torch.nn.Module):
            measured = self.model_precision.get(model_key(model))
            if measured is not None:
                return measured["precision"]
        return self.precision

    def entry_precision(self, entry: Entry) -> str:
        """What a loaded variant computes in, as /v1/models shows it."""
        if entry.kind in ONNX_KINDS:
            return "onnxruntime (fp32 graph)" if entry.kind == "onnx" else "onnxruntime (int8 graph)"
        return self.precision_of(self._computes(entry))

    def _computes(self, entry: Entry) -> Any:
        """The model a forward of `entry` runs: the shared base for an adapter (through the bank)."""
        return self.base if entry.kind == "lora" else entry.model

    def precision_state(self) -> dict[str, Any]:
        """The service's precision choice, and what each architecture measured (auto, CPU with native bf16)."""
        return {**self.precision_choice.as_dict(), "per_model": dict(self.model_precision) if self.per_model else None}

    def _choose_precision(self, model: Any, pad_id: int) -> Any:
        """The fp32-loaded `model` as it will serve: bf16 where bf16 measured faster for its architecture
        (measured once per architecture; see __init__). Other models and modes pass through."""
        if not self.per_model or not isinstance(model, torch.nn.Module):
            return model
        key = model_key(model)
        cast = self.weight_dtype == "bf16"  # --bf16-mode weights: bf16 is a bf16 copy of the weights
        bf16_model = None
        if key not in self.model_precision:
            # a bf16 copy to time, freed again if fp32 wins: 1.5x the fp32 weights while the first model of
            # an architecture loads (the memo hands deepcopy bf16 parameters, never a second fp32 set)
            bf16_model = bf16_copy(model) if cast else model

            def forward(precision: str, ids: torch.Tensor, mask: torch.Tensor) -> Any:
                if precision == "fp32":
                    return model(input_ids=ids, attention_mask=mask)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not cast):
                    return bf16_model(input_ids=ids, attention_mask=mask)

            self.model_precision[key] = m = faster_precision(forward, pad_id)
            log.info("%s computes in %s (%s)", key, m["precision"], m["reason"])
        if not cast:  # autocast mode: the same fp32 weights either way (autocast follows precision_of)
            return model
        if self.model_precision[key]["precision"] == "fp32":
            if bf16_model is not None:
                bf16_model = forward = None  # the timing copy goes now
                release_freed_memory()
            return model
        return bf16_model if bf16_model is not None else model.to(torch.bfloat16)

    # ---- base ------------------------------------------------------------------------------
    def choose_base(self) -> Manifest | None:
        """The LoRA base to load: --base if given, else the one most LoRA variants were built on."""
        loras = [i.manifest for i in self.store.list() if i.manifest and i.manifest.kind == "lora"]
        if self.cfg.base:
            loras = [m for m in loras if m.base_fingerprint.startswith(self.cfg.base)]
        if not loras:
            return None
        top_fp, _ = Counter(m.base_fingerprint for m in loras).most_common(1)[0]
        return next(m for m in loras if m.base_fingerprint == top_fp)

    def load_base(self) -> None:
        self.store.require()  # a typo or the wrong CWD: say so instead of serving nothing, "ready"
        m = self.choose_base()
        if m is None:
            if self.cfg.base:
                bases = sorted(
                    {
                        i.manifest.base_fingerprint[:12]
                        for i in self.store.list()
                        if i.manifest and i.manifest.kind == "lora"
                    }
                )
                raise ValueError(
                    f"--base {self.cfg.base} matches no LoRA variant's base; the store's LoRA bases: "
                    f"{', '.join(bases) or 'none'}"
                )
            log.info("no LoRA variants in %s; serving full/merged/ONNX variants only", self.store.root)
            return
        t0 = time.perf_counter()
        self.base, self.base_tokenizer, self.base_fingerprint = load_base(
            self.store, m, dtype=self.load_dtype, device=self.cfg.device
        )
        self.base_manifest = m
        self.base_tok_json = self.base_tokenizer.backend_tokenizer.to_str()
        self._lora_tok_keys = {}
        self._base_tok_model, self._tok_matches = tokenizer_model(self.base_tok_json), set()
        pad_id = self.base_tokenizer.pad_token_id or 0
        self.base = self._serving(self._choose_precision(self.base.eval(), pad_id), pad_id)
        # on CUDA the slots double as they run out: captured graphs survive most hot-swaps (lora_bank.py)
        self.bank = LoraBank(self.base, doubling=self.graph_mode == "capture")
        self.side = SideModel(self.base)
        log.info("base %s (%s…) loaded in %.2fs", m.base_model, m.base_fingerprint[:12], time.perf_counter() - t0)

    # ---- load / unload (batcher thread only) -----------------------------------------------
    def load(self, name: str, seq: int = 0) -> Entry:
        """Load or replace `name` from the store; the old version keeps serving unless this succeeds."""
        entry = self._refusals(name, self.cfg.golden_check_texts)
        entry.seq = seq
        return self.commit(entry)

    def prepare(self, name: str) -> Entry:
        """Verify and load `name` without touching any serving model (the swap worker thread calls this).

        Full/merged/ONNX variants are new objects anyway; a LoRA adapter is read as tensors and
        golden-checked in the side model's bank; `commit` then copies it into a serving bank slot.
        """
        with self.gpu_lock if self.graph_mode == "capture" else contextlib.nullcontext():
            return self._refusals(name, self.cfg.swap_check_texts)

    def _build_lora(self, name: str, check_texts: int) -> Entry:
        if self.base is None:
            raise VariantRefused(name, ["no LoRA base is loaded; start the server with --base set to its base"])
        m = self.store.verify(name, expected_base_fingerprint=self.base_fingerprint)
        path = self.store.path(name)
        self._check_tokenizer(name, m)
        weights = self._read(name)
        # verified first, read second: the bytes parsed must be the ones verify hashed (as ensure_resident
        # checks), else a writer's files would serve under this manifest's hashes, golden set and labels
        if any(m.files.get(f) != d for f, d in weights.digests.items()):
            raise VariantRefused(name, ["its files were replaced while it was loaded; PUT it again"])
        if m.max_length not in self._lora_tok_keys:
            self._lora_tok_keys[m.max_length] = tokenizer_key(
                self.base_tok_json, m.max_length, truncation_side(self.base_tokenizer)
            )
        tok_key = self._lora_tok_keys[m.max_length]
        entry = Entry(
            name,
            m,
            self.base_tokenizer,
            dir_bytes(path),
            tok_lock=self.base_tok_lock,
            lora=weights,
            _tok_key=tok_key,
        )
        view = self.side.add(weights)
        try:
            self._check_golden(entry, check_texts, model=view)
        finally:
            self.side.remove(view)
        return entry

    def _check_tokenizer(self, name: str, m: Manifest) -> None:
        """An adapter is served with the base's tokenizer (the base snapshot's, or the Hub's), which no checksum
        covers (the base fingerprint hashes weights): it must tokenise as the adapter's own tokenizer.json, which
        its manifest hashes (verified above). Once per distinct file."""
        # tokenizer.json does not say which end a long text is cut at: tokenizer_config.json's truncation_side does
        # (training, eval and the adapter's own tokenizer honour it; the service truncates as the base's says)
        config = self.store.path(name) / "tokenizer_config.json"
        if "tokenizer_config.json" in m.files and config.is_file():
            side = json.loads(config.read_text()).get("truncation_side") or "right"
            if side != truncation_side(self.base_tokenizer):
                raise VariantRefused(
                    name,
                    [
                        f"its tokenizer truncates long texts on the {side} (tokenizer_config.json truncation_side), "
                        f"the base's on the {truncation_side(self.base_tokenizer)}; train the adapter with the base's "
                        "tokenizer, or restore the base snapshot's tokenizer files"
                    ],
                )
        digest = m.files.get("tokenizer.json")
        if digest is None or digest in self._tok_matches:  # none saved (a slow tokenizer's files): nothing to compare
            return
        raw = (self.store.path(name) / "tokenizer.json").read_bytes()
        if hashlib.sha256(raw).hexdigest() != digest:
            raise VariantRefused(name, ["its tokenizer.json is missing or changed since it was verified; rewrite it"])
        if tokenizer_model(raw.decode()) != self._base_tok_model:
            raise VariantRefused(
                name,
                [
                    "the base's tokenizer does not tokenise as the adapter's own tokenizer.json; train the adapter "
                    "with the base's tokenizer, or restore the base snapshot's tokenizer files"
                ],
            )
        self._tok_matches.add(digest)

    def _read(self, name: str) -> LoraWeights:
        """The stored adapter's tensors, cast to the serving dtype and device (models.lora_weights)."""
        w = read_lora(name, self.store.path(name), self.base)
        return w.to(next(self.base.parameters()).dtype, self.device)  # the base's (per-model precision)

    def _refusals(self, name: str, check_texts: int) -> Entry:
        """`_build`, with the store's errors turned into the service's (and refusals remembered)."""
        try:
            return self._build(name, check_texts)
        except VariantNotFound as e:
            raise ModelNotFound(f"{e}; write it into the store first") from e
        except VariantRefused as e:
            self.refused[name] = "; ".join(e.reasons)
            raise Refused(f"{e}; the previous version (if any) keeps serving") from e
        except ServiceError:
            raise
        except Exception as e:  # a variant the loaders do not handle: refused like a bad one, never the engine down
            log.exception("loading %s failed", name)
            self.refused[name] = f"loading it failed: {type(e).__name__}: {e}"
            raise Refused(
                f"variant '{name}' refused: {self.refused[name]}; the previous version (if any) keeps serving"
            ) from e

    def commit(self, entry: Entry) -> Entry:
        """Give a loaded entry its name (batcher thread, between batches): attach a prepared adapter, swap."""
        with self.lock:
            return self._commit(entry, beside=False)

    def commit_beside(self, entry: Entry) -> bool:
        """Commit a prepared adapter from the swap worker while a batch may be running; False when only
        the batcher thread can (not an adapter, or the bank must reallocate its stacks to take it).

        A running forward reads the bank's stacks and the slots of the entries it was formed with: the
        new version goes into a free slot (which no running row reads) and takes the name in one dict
        assignment; the old version keeps its slot until `settle`, after the batches that may use it.
        Measured (MiniLM fp32, 2-core Xeon, 4 clients): waiting for the batch boundary instead cost
        ~22 ms of a replacement's p50.
        """
        if entry.kind != "lora" or self.bank is None or entry.lora is None:
            return False
        # its copy into the bank is GPU work on this thread: not while the batcher captures a CUDA graph
        # (work on another stream during a capture can break it; graphs.GraphedForward takes gpu_lock to capture)
        with self.gpu_lock if self.graph_mode == "capture" else contextlib.nullcontext(), self.lock:
            if not self.bank.fits(entry.lora):
                return False
            self._commit(entry, beside=True)
            return True

    def _commit(self, entry: Entry, *, beside: bool) -> Entry:
        name = entry.name
        if entry.seq < self._last_op.get(name, 0):  # a later PUT/DELETE of the name landed first: superseded
            entry.lora = None
            return entry
        self._last_op[name] = entry.seq
        # the golden set (~20 KiB of texts and logits per variant) was needed for the check only; a
        # service holding hundreds of adapters keeps the rest of each manifest
        entry.manifest = entry.manifest.model_copy(update={"golden": NO_GOLDEN})
        if entry.kind == "lora" and entry.adapter is None:
            entry.adapter = self._attach(entry.lora)
            entry.lora = None  # the bank holds the only copy
        old = self.entries.get(name)
        self.entries[name] = entry  # the swap: one dict assignment
        self.version += 1
        self.refused.pop(name, None)
        if old is not None:
            entry.usage = old.usage  # its name's history (LRU), shared: batches still running on `old` count too
            if beside:
                self._retired.append(old)
            else:
                self._release(old)
        if entry.kind == "lora":
            if beside:
                self._fresh.add(name)
            else:
                self.evict_over_cap({name})
        return entry

    def unsettled(self) -> bool:
        """Whether `settle` has versions to free or fresh adapters to count against the cap."""
        return bool(self._retired or self._fresh)

    def settle(self) -> None:
        """Batcher thread, no batch running: free versions replaced beside a batch, evict over the cap."""
        if not self.unsettled():
            return
        with self.lock:
            retired, self._retired = self._retired, []
            fresh, self._fresh = self._fresh, set()
            for old in retired:
                self._release(old)
            self.evict_over_cap(fresh)

    def unload(self, name: str, seq: int = 0) -> None:
        with self.lock:
            if seq < self._last_op.get(name, 0):  # a later PUT of the name landed first: this DELETE came before it
                return
            entry = self.entries.pop(name, None)
            if entry is None:
                raise ModelNotFound(f"'{name}' is not loaded; loaded: {', '.join(sorted(self.entries)) or 'none'}")
            self._last_op[name] = seq
            self.version += 1
            self._release(entry)

    def ensure_resident(self, entry: Entry, protect: set[str]) -> bool:
        """Reload `entry`, an LRU-evicted adapter, into the bank; True when it did (a cold load). False when
        it is resident, or when a hot-swap (commit_beside, on the swap worker) gave its name to another
        version while its files were read: the caller serves that version, and this one stays out."""
        name = entry.name
        if entry.resident:
            return False
        # read first, verify after: a writer replacing the variant before or while it is read changes the
        # hashes verify then sees (verify first, read second would attach whatever was renamed in between)
        weights = self._read(name)
        on_disk = self.store.verify(name, expected_base_fingerprint=self.base_fingerprint)
        if on_disk.files != entry.manifest.files:  # reload exactly the version that was serving
            if self.entries.get(name) is not entry:  # the files changed because a replacement took the name
                return False
            raise VariantRefused(
                name,
                [
                    f"the store's '{name}' changed since it was loaded; load the new version with PUT /v1/adapters/{name}"
                ],
            )
        with self.lock:
            if self.entries.get(name) is not entry:
                return False
            entry.adapter = self._attach(weights)
            entry.resident = True
            self.evict_over_cap(protect | {name})
        return True

    def evict_over_cap(self, protect: set[str]) -> list[str]:
        """Evict least-recently-used adapters beyond --max-adapters (never those in `protect`)."""
        with self.lock:
            resident = sorted(
                (e for e in self.entries.values() if e.kind == "lora" and e.resident), key=lambda e: e.usage.last_used
            )
            evicted = []
            for e in resident:
                if len(resident) - len(evicted) <= self.cfg.max_adapters:
                    break
                if e.name in protect:
                    continue
                self._detach(e.adapter)
                e.adapter, e.resident = None, False
                evicted.append(e.name)
        if evicted:
            log.info("evicted %s (over --max-adapters %d)", ", ".join(evicted), self.cfg.max_adapters)
            self.on_evict(len(evicted))
        return evicted

    def over_cap(self) -> bool:
        """More adapters in the bank than --max-adapters: a batch needed them all at once, or replaced
        versions wait for `settle`. One length per batcher loop, not a walk over every entry."""
        return self.bank is not None and len(self.bank.index) > self.cfg.max_adapters

    def resident_adapters(self) -> int:
        # a snapshot (one C call): the swap worker counts while the batcher may load or unload
        return sum(1 for e in list(self.entries.values()) if e.kind == "lora" and e.resident)

    def _build(self, name: str, check_texts: int) -> Entry:
        """Verify, load and golden-check `name` on `check_texts` of its golden texts."""
        if self._is_lora(name):
            return self._build_lora(name, check_texts)
        # verify hashes the files, the loaders read them afterwards (by path, where the LoRA path hashes the bytes
        # it parsed): a writer renaming a new version in between would be loaded under the old manifest — its
        # golden check comparing new weights with old logits (a misleading "re-export"), or passing and serving
        # them under the old labels. So the directory loaded must be the one verified: the same directory before
        # verify and after the load, holding the same manifest. A replacement caught mid-load is loaded again
        # (it is what the store now holds); one that keeps landing is refused.
        for _ in range(2):
            held = self.store.identity(name)
            m = self.store.verify(name)
            # full, merged, onnx, onnx-int8 through models.load_variant (ONNX: always CPU fp32, onnxruntime)
            v = load_variant(
                self.store,
                name,
                dtype=self.load_dtype,
                device=self.cfg.device,
                manifest=m,
                # ONNX sessions keep their threads for life: sized for a lone request (--lone-threads), and
                # with sleeping workers so that under load they leave the front-ends' cores alone. Measured
                # here (MiniLM fp32 store, 1 front-end; one session thread spinning -> two sleeping): 800
                # test texts scored one 32-text request at a time 17.4 -> 8.9 s (onnx); wrk c=32 one-sentence
                # body onnx-int8 658 / 816 -> 786-930 req/s, onnx 320 / 348 -> 386-425; c=1 p50 4.3 -> 4.0-4.2 ms.
                threads=self.cfg.lone_threads,
                onnx_spin=self.cfg.lone_threads <= self.cfg.threads,
            )
            if self.store.identity(name) == held and self.store.manifest(name) == m:
                break
            log.info("%s was replaced while it was loaded; loading it again", name)
        else:
            raise VariantRefused(name, ["its files were replaced while it was loaded, twice; PUT it again"])
        pad_id = v.tokenizer.pad_token_id or 0
        model = self._serving(self._choose_precision(v.runner, pad_id), pad_id)
        entry = Entry(name, m, v.tokenizer, dir_bytes(self.store.path(name)), model=model)
        self._check_golden(entry, check_texts)
        _ = entry.tok_key  # hashed here, on the swap worker, not by the first state request after the swap
        return entry

    def _is_lora(self, name: str) -> bool:
        try:
            return self.store.manifest(name).kind == "lora"
        except Exception:  # unreadable manifests are reported by verify with the full reason
            return False

    def _attach(self, weights: LoraWeights | None) -> str:
        """Copy a checked adapter into a free slot of the serving bank (under `lock`)."""
        assert weights is not None and self.bank is not None
        adapter = f"a{next(self._adapter_ids)}"  # a replacement gets a new slot before the old one is freed
        generation = self.bank.generation
        self.bank.add(adapter, weights)
        if self.bank.generation != generation:  # the stacks were reallocated: give the old ones back
            release_freed_memory()
        return adapter

    def _detach(self, adapter: str | None) -> None:
        if adapter is not None and self.bank is not None:
            self.bank.remove(adapter)
            release_freed_memory()

    def _release(self, entry: Entry) -> None:
        if entry.kind == "lora":
            self._detach(entry.adapter)
        entry.model = entry.graphed = entry.lora = None

    def _check_golden(self, entry: Entry, texts: int, model: Any = None) -> None:
        """Re-run golden texts through models.golden: subset, int8 one-per-batch scoring and tolerances live there.

        `model` overrides where it runs (a LoRA adapter: its view in the side model's bank)."""
        view = LoadedVariant.wrap(
            entry.manifest, self.store.path(entry.name), entry.tokenizer, model if model is not None else entry.model
        )
        computes = self._computes(entry)  # what decides its precision (once a load: not a hot path)
        with entry.tok_lock, self.autocast(self.precision_of(computes)):
            result = check_golden(view, subset=texts, precision=self.precision_of(computes))
        if not result.passed:
            raise VariantRefused(entry.name, [result.reason or "golden-set check failed"])

    # ---- inference (batcher thread only) ---------------------------------------------------
    @torch.inference_mode()
    def forward(self, entries: list[Entry], rows: list[list[int]]) -> torch.Tensor:
        """fp32 logits for pre-tokenised `rows`, all in one group (one LoRA mix or one variant)."""
        first = entries[0]
        if self.graph_mode != "off":
            if first.kind == "lora":
                return self._graphed_lora()(rows, self.bank.slots_of([e.adapter for e in entries]))
            if first.kind not in ONNX_KINDS:
                return self._graphed_model(first)(rows)
            return self._eager(entries, rows)
        # Eager (CPU): one padded forward, or several over rows of similar length when the padding
        # saved outweighs the extra forwards' fixed cost (measured per model: _overhead_tokens).
        # Measured (MiniLM bf16, 2-core Xeon with AMX): 64 random AG News texts pad to 128 tokens
        # against a 53-token mean; 4 length chunks carry ~half the tokens of one padded forward.
        lens = [len(r) for r in rows]
        if len(rows) > 1:
            overhead = self._overhead_tokens(first)
            if len(rows) * max(lens) - sum(lens) > overhead:
                chunks = length_chunks(lens, overhead)
                if len(chunks) > 1:
                    parts = [self._eager([entries[i] for i in c], [rows[i] for i in c]) for c in chunks]
                    out = torch.empty(len(rows), parts[0].shape[-1], dtype=parts[0].dtype)
                    for c, part in zip(chunks, parts, strict=True):
                        out[torch.from_numpy(c)] = part
                    return out
        return self._eager(entries, rows)

    def _eager(self, entries: list[Entry], rows: list[list[int]]) -> torch.Tensor:
        """One padded forward of `rows` (ONNX, or torch without graphs)."""
        first = entries[0]
        if first.kind in ONNX_KINDS:
            ids, mask = pad_rows(rows, first.tokenizer.pad_token_id or 0)
            return onnx_logits(
                first.model, {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
            )
        lora = first.kind == "lora"
        model = self._computes(first)
        precision = self.precision_of(model)  # once a batch: it decides the padding and the autocast
        multiple = width_multiple(self.device.type, precision)  # 16 for bf16 on CPU
        width = padded_width(max(len(r) for r in rows), multiple, first.manifest.max_length)
        ids, mask = pad_rows(rows, first.tokenizer.pad_token_id or 0, width=width)
        ids, mask = ids.to(self.device), mask.to(self.device)
        mask = self._mask(model)(mask)
        with self.autocast(precision):
            if lora:
                out = self.bank.forward([e.adapter for e in entries], input_ids=ids, attention_mask=mask)
            else:
                out = model(input_ids=ids, attention_mask=mask)
        return out.logits.float().cpu()

    def lane_parallel(self, entry: Entry, *, by_cost: bool = True) -> bool:
        """Whether batches of `entry` may run on CPU lanes beside each other (service/batcher.py): any CPU
        model (torch, or an ONNX session: onnxruntime's `run` may be called from several threads at once)
        and, `by_cost`, one whose typical row (64 tokens, in a batch of 16) costs over LANE_ROW_S. A light
        model's rows cost less than the front-end's share of them, so its batches run one at a time and
        leave the front-ends a core (measured, 2-core Xeon, 1 thread: MiniLM ~7 ms a row bf16 / ~15 ms
        fp32, the 2-layer model ~0.3 ms).
        ONNX on lanes: one session at a time left its 2-thread pool idle while this process answered a
        batch and formed the next. Measured, 2-core AMD EPYC family 25 model 17, MiniLM onnx-int8,
        `benchmarks ceiling --shape minilm --scenarios onnx-int8 --concurrency [1,]32 --duration 8 --rounds 2
        --no-naive`, 4 interleaved pairs, c=32: 197 / 207 / 195 / 216 -> 239 / 248 / 263 / 186 req/s (means
        204 -> 234), service / in-process 0.80 / 0.86 / 0.71 / 0.89 -> 0.91 / 1.05 / 0.99 / 0.91; c=1
        unchanged (112-113 vs 108-117 req/s: a lone request runs on the batcher thread)."""
        return self.device.type == "cpu" and (not by_cost or self._row_cost_s(entry) > LANE_ROW_S)

    def _row_cost_s(self, entry: Entry) -> float:
        fixed, per_token = self._cost(entry)
        return fixed / 16 + 64 * per_token

    def _overhead_tokens(self, entry: Entry) -> float:
        """Fixed cost of one forward of `entry`'s model in token-equivalents (inf: never worth a split)."""
        fixed, per_token = self._cost(entry)
        return fixed / per_token if per_token > 0 else math.inf

    def batch_cost_s(self, entries: list[Entry], rows: list[list[int]]) -> float:
        """Estimated seconds of one padded forward of `rows` (before any split by length)."""
        fixed, per_token = self._cost(entries[0])
        return fixed + per_token * len(rows) * max(len(r) for r in rows)

    def _cost(self, entry: Entry) -> tuple[float, float]:
        """(fixed seconds, seconds per token) of a forward of `entry`'s model, measured once per model.

        Two timed forwards, 1 x 8 and 4 x 64 tokens (best of 3 each), at the threads of the moment.
        A 2-layer model's fixed cost is worth thousands of tokens (never split); MiniLM's ~100.
        """
        key = "lora-base" if entry.kind == "lora" else entry.name
        if key not in self._costs:
            pad = entry.tokenizer.pad_token_id or 0
            times = []
            for h, w in ((1, 8), (4, 64)):
                rows = [[pad] * w for _ in range(h)]
                best = math.inf
                for _ in range(3):
                    t0 = time.perf_counter()
                    self._eager([entry] * h, rows)
                    best = min(best, time.perf_counter() - t0)
                times.append(best)
            per_token = max(0.0, (times[1] - times[0]) / (4 * 64 - 8))
            self._costs[key] = (max(0.0, times[0] - 8 * per_token), per_token)
            log.info("%s: a forward costs %.2f ms + %.1f us per token", key, self._costs[key][0] * 1e3, per_token * 1e6)
        return self._costs[key]

    def _mask(self, model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        """On CUDA, the mask in the form that needs no host read (models.loading.model_mask); on CPU as is."""
        return model_mask(model) if self.device.type == "cuda" else (lambda m: m)

    def _graphed_model(self, entry: Entry) -> GraphedForward:
        if entry.graphed is None:
            model, mask = entry.model, self._mask(entry.model)

            def fn(ids: torch.Tensor, attention: torch.Tensor, _: Any) -> torch.Tensor:
                with self.autocast():
                    return model(input_ids=ids, attention_mask=mask(attention)).logits

            entry.graphed = self._graph_runner(fn, entry.tokenizer.pad_token_id or 0, with_slots=False, model=model)
        return entry.graphed

    def _graphed_lora(self) -> GraphedForward:
        if self.lora_graphed is None:
            mask = self._mask(self.base)

            def fn(ids: torch.Tensor, attention: torch.Tensor, slots: Any) -> torch.Tensor:
                with self.autocast():
                    return self.bank.forward_slots(slots, input_ids=ids, attention_mask=mask(attention)).logits

            self.lora_graphed = self._graph_runner(
                fn,
                self.base_tokenizer.pad_token_id or 0,
                with_slots=True,
                key=lambda: (id(self.bank), self.bank.generation if self.bank else -1),
                model=self.base,
            )
        return self.lora_graphed

    def _graph_runner(self, fn: Any, pad_id: int, *, with_slots: bool, model: Any, key: Any = None) -> GraphedForward:
        return GraphedForward(
            fn,
            device=self.device,
            pad_id=pad_id,
            with_slots=with_slots,
            capture=self.graph_mode == "capture",
            pool=self.graph_pool,
            key=key or (lambda: 0),
            capture_lock=self.gpu_lock,
            tolerance=load_tolerance("full", self.precision),  # a bucket's first replay vs the plain forward
            max_width=getattr(getattr(model, "config", None), "max_position_embeddings", None),
        )

    def graph_state(self) -> dict[str, Any]:
        """What /v1/models shows about CUDA graphs: the mode and, per model, the captured buckets."""
        # a snapshot (one C call): the socket thread asks while the batcher or swap worker add/remove names
        # read each `graphed` once: the batcher may release it (None) between a test and a use
        per = {e.name: g.state() for e in list(self.entries.values()) if (g := e.graphed) is not None}
        if (g := self.lora_graphed) is not None:
            per[LORA_GROUP] = g.state()
        return {"mode": self.graph_mode, "models": per}
