"""``fusion-seg plan``: before spending GPU hours, which way of training is fastest here, and does it fit?

For a training store (or a dataset still to extract, with ``--views K``) and ``--epochs E``, it
projects the wall time and peak memory of the whole schedule for:

- the cache in each tier (``--cache-mode device``, ``ram``, ``stream``) and, for the resident tiers,
  in each resident format (``--resident-dtype``: float16, uint8, float8, int4, with the bytes a view
  and whether it fits), extraction and the one-off load included;
- online-frozen training (``train-decoder --online``: the frozen encoder runs every step);
- full fine-tuning (encoder and decoder trained).

The rates come from a few steps it probes itself on the device (the bench's own measurements,
:mod:`fusion_seg.reports.bench.training`), or from a ``fusion-seg bench --json`` file, scaled to the
planned batch and view size by pixels per step. An epoch is one pass over the images, for every
method: the cache's epoch reads one of the K views of each image. It recommends the fastest that
fits (a resident tier in the most precise format that fits, as ``--resident-dtype auto`` picks it)
and says why; when online-frozen training wins on this hardware, it says so.

It also plans for a machine that is not this one: ``--device-memory`` and ``--host-memory`` give the
free memory to plan for, ``--images N`` the training images of a dataset that is not here (the view
shapes come from the encoder at ``--size``, without data). Without rates for that device (no
``--bench-json`` of it, and it cannot be probed here) the plan is of memory alone: what fits where,
in which format, and no wall time.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from fusion_seg.errors import UserError
from fusion_seg.progress import format_duration

METHODS = ("cache-device", "cache-ram", "cache-stream", "online", "finetune")
LABELS = {"cache-device": "cache, --cache-mode device", "cache-ram": "cache, --cache-mode ram",
          "cache-stream": "cache, --cache-mode stream", "online": "online-frozen (--online)",
          "finetune": "full fine-tuning"}


@dataclass(frozen=True)
class Rates:
    """Measured costs at one (batch, view size): seconds per training step of each way of training,
    extraction and bare-forward views/s, the resident tiers' one-off load per view, and peak memory."""

    batch: int
    size: tuple[int, int]
    step_s: dict                       # memory, device, ram, stream, online, finetune -> s
    extract_views_per_s: float | None  # None: not measured (the store exists already)
    load_s_per_view: dict              # device, ram -> s
    step_MiB: dict                     # the step's own peak memory of each method (resident store apart)
    memory_kind: str                   # cuda_max_allocated or process_max_rss
    device: str
    source: str                        # "probe" or the bench JSON file

    def step_for(self, tier: str, fmt: str | None) -> float:
        """The step of a resident tier in a format: measured (``device-int4``), else the tier's own."""
        return self.step_s.get(f"{tier}-{fmt}", self.step_s[tier])

    def load_for(self, tier: str, fmt: str | None) -> float:
        return self.load_s_per_view.get(f"{tier}-{fmt}", self.load_s_per_view[tier])

    def scaled(self, batch: int, size: tuple[int, int]) -> "Rates":
        """These rates at another batch and view size: step time and step memory grow with pixels per step."""
        f = (batch * size[0] * size[1]) / (self.batch * self.size[0] * self.size[1])
        per_view = (size[0] * size[1]) / (self.size[0] * self.size[1])
        return replace(self, batch=batch, size=tuple(size), step_s={k: v * f for k, v in self.step_s.items()},
                       step_MiB={k: v * f for k, v in self.step_MiB.items()},
                       load_s_per_view={k: v * per_view for k, v in self.load_s_per_view.items()},
                       extract_views_per_s=(self.extract_views_per_s / per_view
                                            if self.extract_views_per_s else None))


@dataclass(frozen=True)
class Workload:
    """What is to be trained: N images, K cached views each, E passes over the images at batch B."""

    images: int
    views: int
    epochs: int
    batch: int
    size: tuple[int, int]
    resident_bytes: int | dict  # the K·N views the decoder reads, in memory: {format: bytes}, most precise first
    #                            (resident.format_bytes), or one size (the store's own format)
    extracted: bool            # the store exists already: extraction is not charged
    free: dict                 # {"device": bytes, "ram": bytes} free where each tier would live

    @property
    def steps(self) -> int:
        return max(1, self.images // self.batch) * self.epochs


@dataclass
class Projection:
    method: str
    seconds: float | None         # None: no rates for the device (a plan of memory alone)
    peak_MiB: float | None       # on the device (CUDA) or the process (CPU), resident store included
    resident_MiB: float
    fits: bool
    note: str = ""
    parts: dict = field(default_factory=dict)
    format: str | None = None     # the resident format of a resident tier's row
    view_bytes: float | None = None  # its bytes a view (features, scales and offsets, labels)


def label(method: str) -> str:
    """A method's name in plan's table: ``cache, --cache-mode device --resident-dtype int4`` for ``cache-device-int4``."""
    if method in LABELS:
        return LABELS[method]
    _, tier, fmt = method.split("-", 2)
    return f"cache, --cache-mode {tier} --resident-dtype {fmt}"


def project(w: Workload, r: Rates | None, device: str | None = None) -> list[Projection]:
    """The whole schedule of each method, from the rates: pure arithmetic (tested). Without rates (``r`` None:
    a plan of memory alone for ``device``), the resident rows say only what fits, and the other methods
    have no row."""
    from fusion_seg.cache.resident import choose_tier

    device = _torch_device(r.device if r is not None else device)
    sizes = w.resident_bytes if isinstance(w.resident_bytes, dict) else {None: w.resident_bytes}
    extract = 0.0 if w.extracted or r is None else (w.images * w.views / r.extract_views_per_s)
    views = w.images * w.views
    out = []
    for tier in ("device", "ram"):
        for fmt, nbytes in sizes.items():
            try:
                choose_tier(tier, {fmt: nbytes}, 0, device, free=w.free, resident=fmt or "auto")
                fits, note = True, ""
            except UserError as exc:
                fits, note = False, str(exc).split(". Use ")[0]
            mib = nbytes / 2**20
            # On CUDA only the device tier holds the store in device memory; on CPU every tier is RAM.
            on_peak = mib if (tier == "device" or device.type != "cuda") else 0.0
            method = f"cache-{tier}" if fmt is None else f"cache-{tier}-{fmt}"
            if r is None:  # no rates: no step memory either; the resident size is the row's figure
                out.append(Projection(method, None, None, mib, fits, note, {}, fmt, nbytes / views))
                continue
            load = views * r.load_for(tier, fmt)
            train = w.steps * r.step_for(tier, fmt)
            out.append(Projection(method, extract + load + train, r.step_MiB[tier] + on_peak, mib, fits, note,
                                  {"extract_s": extract, "load_s": load, "train_s": train}, fmt, nbytes / views))
    if r is None:
        return out
    train = w.steps * r.step_s["stream"]
    out.append(Projection("cache-stream", extract + train, r.step_MiB["stream"], 0.0, True, "",
                          {"extract_s": extract, "train_s": train}))
    for method in ("online", "finetune"):
        train = w.steps * r.step_s[method]
        out.append(Projection(method, train, r.step_MiB[method], 0.0, True, "", {"train_s": train}))
    return out


def recommend(rows: list[Projection]) -> tuple[Projection, str]:
    """The fastest method that fits, and the reason in one sentence. A resident tier competes in the most precise
    format that fits in it (what ``--resident-dtype auto`` takes); a plan of memory alone recommends the device
    tier in that format, else the ram tier, else streaming."""
    candidates, seen = [], set()
    for p in rows:  # rows come in precision order within each tier
        tier = p.method.split("-")[1] if p.method.startswith("cache-") and p.method != "cache-stream" else None
        if tier is None:
            candidates.append(p)
        elif p.fits and tier not in seen:
            seen.add(tier)
            candidates.append(p)
    unfit = [p for p in rows if not p.fits]
    if all(p.seconds is None for p in rows):
        best = next((p for p in candidates if p.fits), None)
        if best is None:
            return Projection("cache-stream", None, None, 0.0, True), (
                "memory alone (no rates for this device): no resident format fits; stream from the store.")
        return best, (f"memory alone (no rates for this device): {label(best.method)} is the most precise format "
                      f"that fits ({best.resident_MiB / 1024:.1f} GiB, {best.view_bytes / 2**20:.2f} MiB a view).")
    fitting = sorted((p for p in candidates if p.fits), key=lambda p: p.seconds)
    best, runner = fitting[0], fitting[1]
    by = {p.method: p for p in rows}
    why = f"{label(best.method)} is fastest: {hms(best.seconds)}, {runner.seconds / best.seconds:.2f}x faster than " \
          f"the next, {label(runner.method)} ({hms(runner.seconds)})."
    if best.method == "online":
        why += (" Online-frozen training wins on this hardware: running the encoder every step costs less than "
                "extracting and reading back its features, so the cache does not pay here.")
    elif best.method.startswith("cache") and by["online"].seconds < by["cache-stream"].seconds:
        why += (f" Note: streamed from the store the cache would lose to online training "
                f"({hms(by['cache-stream'].seconds)} vs {hms(by['online'].seconds)}); it wins only held in memory.")
    if unfit:
        why += " Not fitting: " + "; ".join(f"{label(p.method)} ({p.note})" for p in unfit) + "."
    return best, why


def hms(seconds: float) -> str:
    """A projected wall time as plan shows it: :func:`~fusion_seg.progress.format_duration` with the
    seconds past an hour kept (``42s``, ``55m43s``, ``1h15m46s``)."""
    return format_duration(seconds, exact=True)


# --------------------------------------------------------------------------- the request and its rates
@dataclass(frozen=True)
class PlanRequest:
    """``fusion-seg plan``'s inputs: a store, or a dataset to extract (``dataset`` with ``size``)."""

    store: str | None = None
    dataset: str | None = None
    root: str | None = None
    split: str = "train"
    dataset_options: dict = field(default_factory=dict)
    size: tuple[int, int] | None = None   # view size (HxW) when planning from a dataset
    views: int | None = None              # K (default: the store's views per image, or 2)
    epochs: int = 100
    batch_size: int = 8
    device: str = "auto"
    decoder: str = "reverse-hrnet"
    decoder_config: dict = field(default_factory=dict)
    encoder: str = "resnet50"
    weights: str | None = None
    bench_json: str | None = None         # rates from `fusion-seg bench --json` instead of probing
    repeats: int = 2                      # probe repetitions (median)
    images: int | None = None             # [dataset] its training images, without reading it (data not here)
    device_memory: float | None = None    # GiB free on the device to plan for (default: this machine's)
    host_memory: float | None = None      # GiB of host RAM to plan for (default: this machine's)


@dataclass
class Plan:
    request: dict
    workload: dict
    rates: dict
    rows: list[dict]
    recommended: str
    reason: str
    notes: list[str]


def plan(req: PlanRequest, echo=print) -> Plan:
    """Measure (or read) the rates, project every method and recommend one (of memory alone for a device that
    is not here and has no ``--bench-json``)."""
    from fusion_seg.cache.resident import available_memory, format_bytes

    _check(req)
    device, here = _target_device(req.device)
    notes = []
    rates = rates_from_bench(req.bench_json) if req.bench_json else None
    if rates is not None:
        notes.append(f"rates from {req.bench_json} ({rates.device}, batch {rates.batch}, "
                     f"{rates.size[1]}x{rates.size[0]}), scaled by pixels per step")
        other = _other_decoder(req)
        if other:
            notes.append(f"{req.bench_json} timed {other}, not the decoder planned ({req.decoder} "
                         f"{req.decoder_config or ''}); a decoder's step sets every wall time above and can differ "
                         "several-fold: plan without --bench-json to probe this decoder")
    with tempfile.TemporaryDirectory(prefix="fusion-seg-plan-") as tmp:
        extracted = bool(req.store)
        store, extract_rate = req.store, None
        if not extracted and here and rates is None:  # a sample to probe: the dataset's, or shapes alone (--images)
            store, extract_rate = _sample_store(req, device, Path(tmp), echo)
        spec, names, images, views = _facts(req, store)
        if rates is None and here:
            echo(f"plan: probing {req.repeats} timed steps of each method on {device} (a few minutes on a CPU)")
            rates = probe(req, store, device, extract_rate=extract_rate)
    size = tuple(spec.label_shape)
    if rates is not None:
        rates = rates.scaled(req.batch_size, size)
        if not extracted and rates.extract_views_per_s is None:
            raise UserError("the bench JSON has no extraction section: run `fusion-seg bench --sections "
                            "extraction,training --json FILE`, or plan without --bench-json to probe.")
    else:
        notes.append(f"memory alone: {device} is not here and no --bench-json of it was given, so no wall time is "
                     f"projected; run `fusion-seg bench --device {device.type} --json FILE` there for the rates")
    free = _free(req, device, here, available_memory)
    w = Workload(images=images, views=views, epochs=req.epochs, batch=req.batch_size, size=size,
                 resident_bytes=format_bytes(spec, names, images * views), extracted=extracted, free=free)
    rows = project(w, rates, str(device))
    if device.type != "cuda":  # the device is the CPU: the two resident tiers are one memory, one row each
        rows = [r for r in rows if not r.method.startswith("cache-ram")]
        notes.append("on a CPU --cache-mode ram and device hold the views in the same RAM: one row per format")
    best, why = recommend(rows)
    notes.append("an epoch is one pass over the images for every method (the cache reads one of the K views of "
                 f"each image): train-decoder --epochs {max(1, round(req.epochs / views))} with {views} views gives "
                 f"as many steps")
    if device.type == "cpu":
        notes.append("measured on the CPU: on a GPU the encoder is hundreds of times faster and the balance can flip; "
                     "run `fusion-seg plan --device cuda` on the machine you will train on")
    return Plan(request=_jsonable(asdict(req)), workload=_jsonable(asdict(w)) | {"steps": w.steps},
                rates=_jsonable(asdict(rates)) if rates is not None else {"device": str(device), "source": "none"},
                rows=[_jsonable(asdict(p)) for p in rows], recommended=best.method, reason=why, notes=notes)


def _target_device(name: str):
    """``(torch.device, here)``: the device planned for, and whether this machine has it (to probe)."""
    import torch

    from fusion_seg.device import resolve_device

    if name.startswith("cuda") and not torch.cuda.is_available():
        return torch.device(name), False
    return resolve_device(name), True


def _free(req: PlanRequest, device, here: bool, available_memory) -> dict:
    """Free memory per tier to plan for: --device-memory / --host-memory, else this machine's."""
    measured = available_memory(device) if here else {}
    free = {"device": req.device_memory * 2**30 if req.device_memory is not None else measured.get("device"),
            "ram": req.host_memory * 2**30 if req.host_memory is not None else measured.get("ram")}
    if device.type != "cuda":  # on a CPU the device tier is the host RAM
        free["device"] = free["ram"] if req.host_memory is not None else free["device"]
    missing = [o for o, k in (("--device-memory", "device"), ("--host-memory", "ram")) if free[k] is None]
    if missing:
        raise UserError(f"--device {req.device} is not on this machine: pass {' and '.join(missing)} GIB, the memory of "
                        "the machine to plan for (e.g. --device-memory 141 --host-memory 1000).")
    return {k: int(v) for k, v in free.items()}


def _check(req: PlanRequest) -> None:
    if bool(req.store) == bool(req.dataset):
        raise UserError("plan needs either STORE (an extracted training store) or --dataset with --size, not both.")
    if req.dataset and not req.size:
        raise UserError("--dataset needs --size HxW, the size of each cached view (the crop of augmented views).")
    for name, value in (("--epochs", req.epochs), ("--batch-size", req.batch_size), ("--repeats", req.repeats)):
        if value < 1:
            raise UserError(f"{name} {value}: must be at least 1.")
    if req.views is not None and req.views < 1:
        raise UserError(f"--views {req.views}: must be at least 1.")
    if req.bench_json and not Path(req.bench_json).is_file():
        raise UserError(f"--bench-json {req.bench_json}: no such file; write one with `fusion-seg bench --json FILE`.")
    if req.images is not None and (req.store or req.images < 1):
        raise UserError(f"--images {req.images}: the training images of a --dataset that is not here, at least 1 "
                        "(a STORE counts its own).")
    for name, value in (("--device-memory", req.device_memory), ("--host-memory", req.host_memory)):
        if value is not None and not value > 0:
            raise UserError(f"{name} {value}: the GiB of memory to plan for, a number > 0.")


def _facts(req: PlanRequest, store: str | None):
    """``(spec, names, images, K)``: the store's (or the sample's) spec, or, with neither, the shapes the encoder
    gives at ``--size`` (:func:`_shapes_alone`); the maps the planned decoder reads; the training images
    (the store's, ``--images``, or the dataset's) and K."""
    if store is None:
        spec, names = _shapes_alone(req)
    else:
        from fusion_seg.cache.store import FeatureStore
        from fusion_seg.reports.bench.common import BenchConfig, decoder_for_store

        spec = FeatureStore.open(store).spec
        _, names = decoder_for_store(BenchConfig(decoder=req.decoder, decoder_config=_decoder_config(req)), store)
    k = req.views or (spec.views_per_image if req.store else 2)
    if req.store and k > spec.views_per_image:
        raise UserError(f"--views {k}: {store} holds {spec.views_per_image} views per image.")
    images = len(spec.image_ids) if req.store else req.images or _dataset_size(req)
    return spec, names, images, k


def _shapes_alone(req: PlanRequest):
    """The view's shapes with no store and no data: the labels at ``--size`` and the encoder's maps (its feature
    info, on the ``meta`` device), float16; and the maps the decoder reads (built on ``meta``)."""
    from types import SimpleNamespace

    import torch

    from fusion_seg.decoders import build_decoder
    from fusion_seg.encoder.identity import DEFAULT_STRIDES
    from fusion_seg.pipeline.stage_checks import encoder_shapes

    shapes = encoder_shapes(req.encoder, DEFAULT_STRIDES)
    with torch.device("meta"):
        names = build_decoder(req.decoder, shapes, 2, **_decoder_config(req)).in_features
    h, w = req.size
    feature_shapes = {n: [s.channels, -(-h // s.stride), -(-w // s.stride)] for n, s in shapes.items()}
    return SimpleNamespace(label_shape=(h, w), feature_shapes=feature_shapes, dtype="float16"), list(names)


def _decoder_config(req: PlanRequest) -> dict:
    if req.decoder_config or req.decoder != "reverse-hrnet":
        return dict(req.decoder_config)
    return {"preset": "small", "streams": 4}  # train-decoder's default reverse HRNet


def _dataset_size(req: PlanRequest) -> int:
    from fusion_seg.data.datasets import build_dataset

    return len(build_dataset(req.dataset, root=req.root, split=req.split, **req.dataset_options))


def _sample_store(req: PlanRequest, device, tmp: Path, echo) -> tuple[str, float]:
    """A store of a few images of the dataset at the planned view size (its shapes), and the extraction rate."""
    from fusion_seg.requests import Augment, DatasetRef, EncoderSpec, ExtractRun, Resize
    from fusion_seg.extract.local import extract

    synthetic = req.dataset == "synthetic" or req.images is not None  # --images: the dataset is not here
    echo(f"plan: extracting 8 {'synthetic ' if synthetic else ''}images{'' if synthetic else ' of ' + req.dataset} at "
         f"{req.size[1]}x{req.size[0]} to measure extraction")
    out = tmp / "sample.zarr"
    options = ({**req.dataset_options, "limit": 8} if not synthetic else {"num_images": 8, "size": list(req.size)})
    r = extract(out, DatasetRef("synthetic" if synthetic else req.dataset, "train" if synthetic else req.split,
                                None if synthetic else req.root, options),
                EncoderSpec(req.encoder, weights_file=req.weights, random_init=req.weights is None, seed=0),
                views=1, augment=Augment(enabled=False), resize=Resize(size=tuple(req.size)),
                run=ExtractRun(device=str(device), batch_size=4), progress=False)
    return str(out), r.views_per_second


def probe(req: PlanRequest, store: str, device, extract_rate: float | None = None) -> Rates:
    """A few steps of each method on ``device``, each in its own process (the bench's measure_mode)."""
    from fusion_seg.reports.bench.common import BenchConfig
    from fusion_seg.reports.bench.training import compact_modes, run_modes
    from fusion_seg.cache.store import FeatureStore

    spec = FeatureStore.open(store).spec
    size = tuple(spec.label_shape)
    # The store's own encoder (random-init weights: only its cost matters here).
    cfg = BenchConfig(device=str(device), encoder=spec.encoder.get("tag", req.encoder), decoder=req.decoder,
                      decoder_config=_decoder_config(req), batch_size=req.batch_size, size=size, camvid=None,
                      repeats=req.repeats, warmup=1)
    # On a CPU the device is host RAM: the two resident tiers are one, measured once.
    tiers = ("device", "ram") if device.type == "cuda" else ("device",)
    modes = run_modes(cfg, size, req.batch_size, store,
                      modes=("memory", *tiers, *compact_modes(str(device)), "cache", "online", "finetune"))
    modes.setdefault("ram", modes["device"])
    return _rates(modes, req.batch_size, size, extract_rate, str(device), "probe")


# The bench's measure_mode names, by this module's names (the bench calls the stream tier "cache").
BENCH_MODES = {"memory": "memory", "device": "device", "ram": "ram", "stream": "cache", "online": "online",
               "finetune": "finetune"}


def _rates(modes: dict, batch: int, size, extract_rate: float | None, device: str, source: str) -> Rates:
    """Rates from the bench's per-mode measurements (``measure_mode`` results, probed or from a JSON file)."""
    from fusion_seg.reports.bench.training import step_memory_MiB

    compact = [m for m in modes if "-" in m and m.split("-")[0] in ("device", "ram")]  # device-int4 ...
    return Rates(batch=batch, size=tuple(size), step_s={**{n: modes[k]["step_s"] for n, k in BENCH_MODES.items()},
                                                        **{m: modes[m]["step_s"] for m in compact}},
                 extract_views_per_s=extract_rate,
                 load_s_per_view={t: modes[t]["load_s"] / modes[t]["resident_views"] for t in ("device", "ram",
                                                                                            *compact)},
                 step_MiB={n: step_memory_MiB(modes[k]) for n, k in BENCH_MODES.items()},
                 memory_kind=modes["memory"]["kind"], device=device, source=source)


def _other_decoder(req: PlanRequest) -> str | None:
    """The bench file's decoder, as "name {options}", when it is not the one planned (another name, or an option
    the plan sets to another value); None when it is."""
    config = json.loads(Path(req.bench_json).read_text()).get("config", {})
    name, options = config.get("decoder"), config.get("decoder_config") or {}
    if name is None:
        return None
    if name != req.decoder or any(options.get(k) != v for k, v in req.decoder_config.items()):
        return f"{name} {options}"
    return None


def rates_from_bench(path: str) -> Rates:
    """The rates of a ``fusion-seg bench --json`` file (its training section; extraction if present)."""
    try:
        data = json.loads(Path(path).read_text())
        t = data["sections"]["training"]
        modes = t["modes"]
        missing = [k for k in BENCH_MODES.values() if k not in modes]
        if missing:
            raise UserError(f"--bench-json {path} lacks the training modes {', '.join(missing)}: it was written by an "
                            "older fusion-seg bench. Re-run `fusion-seg bench --sections extraction,training --json FILE`.")
        ext = data["sections"].get("extraction")
        return _rates(modes, t["batch"], t["size"], ext["extract_views_per_s"] if ext else None,
                      data["config"]["device"], str(path))
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"--bench-json {path} is not a `fusion-seg bench --json` file ({type(exc).__name__}: {exc}).")


def _torch_device(name: str):
    import torch

    return torch.device(name)


def _jsonable(d):
    return json.loads(json.dumps(d, default=list))


def to_text(p: Plan) -> str:
    w, r = p.workload, p.rates
    sizes = w["resident_bytes"] if isinstance(w["resident_bytes"], dict) else {"as stored": w["resident_bytes"]}
    lines = [f"plan: {w['images']} images x {w['views']} views, {w['epochs']} epochs at batch {w['batch']} "
             f"({w['steps']} steps), views {w['size'][1]}x{w['size'][0]}, device {r['device']} "
             f"(rates: {r['source']})",
             "resident cache: " + ", ".join(f"{fmt} {b / 2**30:.2f} GiB" for fmt, b in sizes.items())
             + f"; free: device {w['free']['device'] / 2**30:.1f} GiB, host RAM {w['free']['ram'] / 2**30:.1f} GiB",
             "",
             f"  {'method':<50} {'a view':>10} {'resident':>11} {'wall time':>11} {'peak memory':>12}  fits",
             ]
    for row in p.rows:
        t = hms(row["seconds"]) if row["seconds"] is not None else "n/a"
        mem = f"{row['peak_MiB'] / 1024:.2f} GiB" if row["peak_MiB"] is not None else "n/a"
        view = f"{row['view_bytes'] / 2**20:.2f} MiB" if row.get("view_bytes") else ""
        held = f"{row['resident_MiB'] / 1024:.2f} GiB" if row["resident_MiB"] else ""
        mark = " <- recommended" if row["method"] == p.recommended else ""
        lines.append(f"  {label(row['method']):<50} {view:>10} {held:>11} {t:>11} {mem:>12}  "
                     f"{'yes' if row['fits'] else 'no'}{mark}")
    lines += ["", f"recommendation: {p.reason}"] + [f"note: {n}" for n in p.notes]
    return "\n".join(lines)
