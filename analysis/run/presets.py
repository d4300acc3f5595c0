"""The presets of the main job (``scripts/reproduce.py --preset NAME``) and how each chains its cached stages.

- ``digits`` (default): the bundled scikit-learn digits, the digits CNN, its SAE, the concept and TTT studies, the
  backbone-width sweep, the report. Under 5 minutes on 2 CPU cores.
- ``mnist``: the same study on MNIST-format IDX files on disk (MNIST, Fashion-MNIST, KMNIST), with the paper's
  50k/10k/10k split, compared with the paper's Section 4 numbers.
- ``imagenet-clip``: the paper's Section 3 setting: CLIP ViT-B/16 (QuickGELU) with the authors' preprocessing
  (``embeddings.recipes``), the paper's split, a 4096-latent k = 16 SAE (or the authors' imported one).
- ``theory``: the simulation of the paper's Section 2 (``analysis.theory.study``).

Every stage is cached in ``RUN_DIR`` by ``analysis.run.cache.StageCache``; the report is rebuilt on every run.
"""

from __future__ import annotations

import json
import math
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from analysis.run.chain import cnn_stage, codes_stage, imported_sae_stage, sae_stage, store_stage
from analysis.progress import bars_wanted, set_progress
from analysis.run.cache import StageCache
from analysis.ttt.scaling import WidthSweepConfig
from analysis.run.rundir import close_run_dir, open_run_dir
from analysis.run.study_stages import check_study_settings, chain_study_stage, theory_stage, width_stage
from artifacts import ArtifactError, write_json
from artifacts.flags import SETTINGS_FILE
from artifacts.typed import check_seed

PRESETS = ("digits", "mnist", "imagenet-clip", "theory")
IMAGENET_ONLY = ("backbone", "weights", "sae")
CNN_ONLY = ("cnn_width", "cnn_epochs", "widths")
UNUSED = {"digits": IMAGENET_ONLY + ("data",), "mnist": IMAGENET_ONLY, "imagenet-clip": CNN_ONLY}
"""Settings each image preset does not read: refused when given."""


@dataclass(frozen=True)
class ImageStudyConfig:
    """Settings of an image preset (digits, mnist, imagenet-clip); ``None`` means the preset's default."""

    data: str | None = None
    """The data folder (--data): IDX files for mnist, ``train/`` and ``val/`` class folders for imagenet-clip."""
    cnn_width: int = 8
    """Channels of the CNN backbone; its embedding width is 25 × this on 32×32 digits (--cnn-width)."""
    cnn_epochs: int = 20
    """Global training epochs of the CNN backbone and of every CNN of the width sweep (--cnn-epochs)."""
    sae_n_latents: int | None = None
    """SAE width; ``None``: the default for the embedding width and the training rows (--sae-n-latents)."""
    sae_k: int | None = None
    """Active latents per image; ``None``: the default for the width (--sae-k)."""
    sae_epochs: float = 200.0
    """SAE training epochs (--sae-epochs)."""
    n_neighbours: int = 50
    """Neighbourhood size of the concept and TTT studies (the paper's 50) (--n-neighbours)."""
    widths: tuple[int, ...] = (1, 2, 4, 8, 16)
    """CNN widths of the scaling sweep (--widths); empty: no sweep."""
    backbone: str = "paper-clip-vit-b16"
    """imagenet-clip: the backbone recipe (``RECIPE=MODEL`` puts another timm model in CLIP's place) (--backbone)."""
    weights: str = "hub"
    """imagenet-clip: ``hub`` or a local weights file (--weights)."""
    sae: str | None = None
    """imagenet-clip: an existing SAE directory (e.g. the authors', from scripts/import_paper_sae.py) (--sae)."""
    quick: bool = False
    """A smaller run that still exercises every stage (--quick)."""
    seed: int = 0
    """Seed of the split, the CNN, the SAE and the studies (--seed)."""
    study: dict = field(default_factory=dict)
    """Extra settings passed to the concept and TTT studies' own configs."""

    def __post_init__(self):
        for flag, value in (("--cnn-width", self.cnn_width), ("--cnn-epochs", self.cnn_epochs),
                            ("--n-neighbours", self.n_neighbours)):
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        for flag, value in (("--sae-n-latents", self.sae_n_latents), ("--sae-k", self.sae_k)):
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if not (math.isfinite(self.sae_epochs) and self.sae_epochs > 0):
            raise ValueError(f"--sae-epochs must be a finite number > 0, got {self.sae_epochs}")
        check_seed(self.seed)
        if any(w < 1 for w in self.widths):
            raise ValueError(f"--widths must be positive, got {self.widths}")


def preset_config(preset: str, **settings) -> ImageStudyConfig | dict:
    """The config of ``preset`` with its defaults, then ``settings`` (``None`` values keep the default)."""
    if preset not in PRESETS:
        raise ValueError(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    given = {k: v for k, v in settings.items() if v is not None}
    if preset == "theory":
        ignored = sorted(set(given) - {"quick", "study"})
        if ignored:  # the theory stage would run without them while the report recorded them as set
            raise ValueError(f"--preset theory does not use {', '.join('--' + k.replace('_', '-') for k in ignored)}; "
                             "its settings are --quick and --study-set (e.g. seeds=[0,1,2])")
        return given
    unused = sorted(set(given) & set(UNUSED[preset]))
    if unused:  # the run would go on without them while the report recorded them as set
        raise ValueError(f"--preset {preset} does not use {', '.join('--' + k.replace('_', '-') for k in unused)}")
    base = {"digits": {}, "mnist": {"cnn_epochs": 10, "sae_epochs": 50.0, "widths": (1, 2, 4, 8, 16, 32)},
            "imagenet-clip": {"sae_n_latents": 4096, "sae_k": 16, "sae_epochs": 100.0, "widths": ()}}[preset]
    if given.get("quick"):
        base = {**base, "cnn_epochs": 6, "sae_epochs": 40.0, "widths": (1, 4, 16)} if preset != "imagenet-clip" \
            else {**base, "sae_epochs": 5.0}
    config = ImageStudyConfig(**{**base, **given})
    if preset in ("mnist", "imagenet-clip") and not config.data:
        raise ValueError(f"--preset {preset} needs --data DIR (nothing is downloaded)")
    return config


def _study_settings(config: ImageStudyConfig) -> dict:
    # --quick: fewer queries, a smaller UMAP sample and shorter probes; every plot and number is still made.
    quick = {"n_queries": 200, "umap_max_points": 600, "probe_epochs": 20, "n_bootstrap": 20} if config.quick else {}
    return {"n_neighbours": config.n_neighbours, "seed": config.seed, **quick, **config.study}


def _chain(preset: str, config: ImageStudyConfig, data: dict | None, device: str) -> list:
    """The backbone → store → SAE → codes stages of an image preset (progress bars when stderr is a terminal);
    ``data``: the CNN data set (``_cnn_data``), None for imagenet-clip."""
    bars = bars_wanted()
    sae = sae_stage(config.sae_n_latents, config.sae_k, config.sae_epochs, config.seed, device, progress=bars)
    if preset == "imagenet-clip":
        from embeddings.fingerprints import folder_fingerprint

        # The folder's contents (every file's path, size and modification time, or SHA-256 on small folders) are
        # part of the key: images added or replaced in the same folder rerun the chain.
        store = store_stage(str(Path(config.data).resolve()), "imagenet", config.seed, device,
                            backbone=config.backbone, weights=config.weights, parents=(), batch_size=64,
                            progress=bars, source_key=folder_fingerprint(config.data))
        return [store, imported_sae_stage(config.sae) if config.sae else sae, codes_stage(device)]
    source, kind = ("digits", "digits") if preset == "digits" else (data["dir"], "idx")
    return [cnn_stage(data, config.cnn_width, config.cnn_epochs, config.seed, device),
            store_stage(source, kind, config.seed, device, progress=bars), sae, codes_stage(device)]


def _cnn_data(preset: str, config: ImageStudyConfig) -> dict:
    if preset == "digits":
        return {"kind": "digits", "seed": config.seed}
    from embeddings.idx import idx_fingerprint

    # The files' hashes are part of every key that reads them: new files in the same folder rerun the chain.
    return {"kind": "idx", "dir": str(Path(config.data).resolve()), "seed": config.seed,
            "sha256": idx_fingerprint(config.data)}


def run_image_preset(preset: str, config: ImageStudyConfig, cache: StageCache, device: str) -> dict[str, dict]:
    """Run the chain and the studies of an image preset; returns the section statuses."""
    # Computed once: for IDX files it hashes every file.
    data = None if preset == "imagenet-clip" else _cnn_data(preset, config)
    for stage in _chain(preset, config, data, device):
        cache.run(stage)
    if preset == "imagenet-clip":
        check_clip_sae(cache)
    check_neighbourhood(cache, config)
    sections: dict[str, dict] = {}
    studies = [("concepts", chain_study_stage("concepts", _study_settings(config), device)),
               ("ttt", chain_study_stage("ttt", _study_settings(config), device))]
    if preset != "imagenet-clip" and config.widths:
        sweep = WidthSweepConfig(widths=tuple(config.widths), cnn_epochs=config.cnn_epochs,
                                 n_neighbours=config.n_neighbours, seed=config.seed)
        studies.append(("width", width_stage(data, sweep, device, log=cache.log)))
    for name, stage in studies:
        sections[name] = run_section(cache, name, stage)
    return sections


def run_section(cache: StageCache, name: str, stage) -> dict:
    """Run one study stage; a missing or failing study becomes a section status with its reason."""
    if isinstance(stage, str):
        cache.log(f"{name}: skipped: {stage}")
        return {"status": "missing", "reason": stage}
    try:
        cache.run(stage)
    except (ArtifactError, ValueError, RuntimeError, TypeError, KeyError, AttributeError, IndexError) as e:
        trace = cache.records_dir / f"{name}.error.txt"
        trace.write_text(traceback.format_exc())
        cache.log(f"{name}: FAILED: {type(e).__name__}: {e} (traceback in {trace})")
        return {"status": "failed", "reason": f"{type(e).__name__}: {e} (traceback in {trace})"}
    return {"status": "ok", "reason": f"stage {name} (key {cache.results[name].key[:12]})"}


def check_clip_sae(cache: StageCache) -> list[str]:
    """Warn, naming both, when the SAE was made for embeddings of another recipe than the store's."""
    from artifacts import read_json

    store_meta = read_json(cache.results["store"].dir / "meta.json")
    store_recipe = ((store_meta.get("backbone_info") or {}).get("recipe") or {}).get("name") or store_meta.get("backbone")
    sae_cfg = read_json(cache.results["sae"].dir / "config.json")
    prov = sae_cfg.get("provenance") or {}
    sae_recipe = (prov.get("preprocessing") or {}).get("recipe") or prov.get("recipe") or prov.get("backbone")
    if sae_recipe is None or sae_recipe == store_recipe:
        return []
    message = (f"the SAE in {cache.results['sae'].dir} was made for embeddings of {sae_recipe!r}, but the store in "
               f"{cache.results['store'].dir} was made with {store_recipe!r}; its concepts may not mean the same here")
    warnings.warn(message, UserWarning, stacklevel=2)
    cache.log(f"warning: {message}")
    return [message]


def run_theory_preset(settings: dict, cache: StageCache) -> dict[str, dict]:
    """The theory simulation as one stage."""
    overrides = {**settings.get("study", {}), "quick": bool(settings.get("quick"))}
    return {"theory": run_section(cache, "theory", theory_stage(overrides))}




def settings_of(config, preset: str) -> dict:
    """A JSON-able record of a preset's config, without the settings that preset does not use."""
    if not hasattr(config, "__dataclass_fields__"):
        return dict(config)
    unused = CNN_ONLY if preset == "imagenet-clip" else IMAGENET_ONLY + (("data",) if preset == "digits" else ())
    return {k: v for k, v in asdict(config).items() if k not in unused}


SMALL_PRESETS = ("digits", "mnist", "theory")
"""Presets whose tensors are small: one torch thread is fastest. With two, torch's threads spin on every tiny
op; on two shared cores we measured an SAE run 15x slower (90 s against 6 s for 20 epochs on the digits)."""


def run_settings(preset: str, config, device: str, threads: int | None) -> dict:
    """Every setting of a run, resolved (a preset default as the value it takes), keyed as ``reproduce.py``'s
    flags, so that the file ``--config`` reads repeats the run."""
    resolved = dict(settings_of(config, preset))
    study = resolved.pop("study", None) or {}
    resolved = {k: list(v) if isinstance(v, tuple) else v for k, v in resolved.items()}
    return {"preset": preset, "device": device, "threads": threads, **resolved,
            "study_set": [f"{k}={json.dumps(v)}" for k, v in sorted(study.items())]}


def check_run(preset: str, config, device: str, threads: int | None) -> None:
    """Every setting checked before the run directory is touched: the device, the thread count and the studies'
    own settings (``--study-set``)."""
    from artifacts.ranks import Ranks, resolve_device

    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    try:
        resolve_device(device, Ranks())
    except RuntimeError as e:  # torch's own message lists every device type it knows
        raise ValueError(f"--device {device!r} is not a torch device; use cpu, cuda or cuda:N") from e
    if preset == "theory":
        check_study_settings(("theory",), config.get("study", {}), {"quick": bool(config.get("quick"))})
    else:
        check_study_settings(("concepts", "ttt"), config.study, _study_settings(config) | {"device": device})


def check_neighbourhood(cache: StageCache, config: ImageStudyConfig) -> None:
    """Refuse a neighbourhood size the store cannot give, before the studies (and their old results) are touched."""
    split = cache.results["store"].result.get("split") or {}
    n_pool = split.get("train") or cache.results["store"].result.get("n", 0)
    if config.n_neighbours >= n_pool:
        raise ValueError(f"--n-neighbours {config.n_neighbours} must be below the {n_pool} rows neighbours are drawn "
                         f"from (the store's train split in {cache.results['store'].dir})")


def reproduce(preset: str, out_dir: str | Path, device: str = "cpu", log=print, threads: int | None = None,
              show_progress: bool = True, **settings) -> dict:
    """Run (or finish) ``preset`` into ``out_dir`` and write its report; returns ``report.json``'s content.

    ``threads``: torch CPU threads for the run; ``None``: one for the small presets, torch's default otherwise.
    Every setting is checked before ``out_dir`` is touched (``check_run``); ``out_dir`` must be new, empty or a run
    directory (``analysis.run.rundir``). When a section fails, an existing report is kept as it is (it describes
    the stages still on disk, which a failed stage leaves in place)."""
    import torch

    from analysis.report.build import write_report

    config = preset_config(preset, **settings)
    check_run(preset, config, device, threads)
    out_dir = open_run_dir(out_dir, preset)
    set_progress(None if show_progress else False)
    t0 = time.perf_counter()
    before = torch.get_num_threads()
    if threads is not None or preset in SMALL_PRESETS:
        torch.set_num_threads(threads or 1)
    try:
        cache = StageCache(out_dir, log)
        if preset == "theory":
            sections = run_theory_preset(config, cache)
        else:
            sections = run_image_preset(preset, config, cache, device)
        failed = sorted(k for k, v in sections.items() if v["status"] == "failed")
        if failed and (out_dir / "report.json").is_file():
            log(f"report: kept as it was ({', '.join(failed)} failed; the previous results are still in place)")
            report = {"sections": sections, "comparisons": [], "kept": True}
        else:
            report = write_report(preset, settings_of(config, preset), cache, sections, log=log)
            # The settings of the run the report describes: --config of this file repeats it.
            write_json(out_dir / SETTINGS_FILE, run_settings(preset, config, device, threads))
    finally:
        torch.set_num_threads(before)
        close_run_dir(out_dir)
    log(f"{preset}: finished in {time.perf_counter() - t0:.1f} s (stages as computed: "
        + ", ".join(f"{n} {r.seconds:.1f} s{' (reused)' if r.reused else ''}" for n, r in cache.results.items()) + ")")
    return report
