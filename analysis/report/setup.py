"""The setup card: what this run was made of, every value resolved from the artifacts themselves.

Data (name, images, classes, split sizes), backbone (name, recipe, width), SAE (input width, latents, k, live and
dead latents, held-out FVU), neighbourhood size and the TTT protocol. A setting left to its default (``None`` on
the command line) is shown as the value the run used, read from the stage that used it, never as ``null``.
"""

from __future__ import annotations

from pathlib import Path

from analysis.stats import format_measure
from artifacts import ArtifactError, read_json


def _json(path: Path) -> dict:
    try:
        found = read_json(path)
    except (ArtifactError, OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def resolve_settings(settings: dict, results: dict) -> dict:
    """``settings`` with each ``None`` replaced by the value the run used (the SAE's width and k from the SAE
    stage, ...); a setting that has no recorded value keeps a sentence saying what it defaulted to."""
    sae = results["sae"].result if "sae" in results else {}
    known = {"sae_k": sae.get("k"), "sae_n_latents": sae.get("n_latents"),
             "sae": sae.get("imported_from") or ("trained in this run" if sae else None)}
    out = {}
    for key, value in settings.items():
        if value is None:
            value = known.get(key)
            value = f"the default ({key} was not recorded by any stage)" if value is None else value
        out[key] = value
    return out


def _split(store: dict) -> str:
    split = store.get("split") or {}
    names = {"train": "train", "val": "validation", "test": "test"}
    return " · ".join(f"{names.get(k, k)} {v}" for k, v in split.items()) or "no split"


def _data_rows(data: dict, results: dict) -> list[tuple[str, str]]:
    store = results["store"].result if "store" in results else {}
    meta = _json(Path(results["store"].dir) / "meta.json") if "store" in results else {}
    source = meta.get("source") or {}
    classes = data.get("classes") or (read_json_list(Path(results["store"].dir) / "classes.json")
                                      if "store" in results else None)
    rows = [("data set", data["name"]),
            ("the paper's data?", ("yes: " if data.get("paper_data") else "no: ") + str(data.get("evidence")))]
    if store:
        rows.append(("images", f"{store.get('n')} ({_split(store)})"))
    if classes:
        shown = ", ".join(str(c) for c in classes[:10]) + (" …" if len(classes) > 10 else "")
        rows.append(("classes", f"{len(classes)}: {shown}"))
    elif source.get("n_classes"):
        rows.append(("classes", str(source["n_classes"])))
    return rows


def read_json_list(path: Path) -> list:
    try:
        found = read_json(path)
    except (ArtifactError, OSError, ValueError):
        return []
    return found if isinstance(found, list) else []


def _backbone_rows(results: dict) -> list[tuple[str, str]]:
    if "store" not in results:
        return []
    meta = _json(Path(results["store"].dir) / "meta.json")
    info = meta.get("backbone_info") or {}
    recipe = (info.get("recipe") or {}).get("name") if isinstance(info.get("recipe"), dict) else info.get("recipe")
    pre = meta.get("preprocessing") or {}
    size = "×".join(str(s) for s in (pre.get("input_size") or [])[1:]) or "?"
    rows = [("backbone", str(meta.get("backbone") or info.get("name") or "unknown")),
            ("recipe", str(recipe or f"{'grey' if pre.get('grayscale') else 'colour'} {size} input, "
                                     f"{pre.get('interpolation', '?')} resize, the model's mean and std")),
            ("embedding width",
             f"{meta.get('d') or results['store'].result.get('d')} ({meta.get('output_kind', '?')})")]
    if "backbone" in results:
        b, s = results["backbone"].result, results["backbone"].settings
        rows.append(("trained here", f"CNN of width {s.get('width')} ({b.get('n_parameters')} parameters), "
                                     f"{s.get('epochs')} epochs; its own head: "
                                     f"{100 * (b.get('test_accuracy') or 0):.2f} % on the test split"))
    return rows


def _sae_rows(report: dict, results: dict) -> list[tuple[str, str]]:
    if "sae" not in results:
        return []
    sae = results["sae"].result
    cfg = _json(Path(results["sae"].dir) / "config.json")
    plan = ((cfg.get("train") or {}).get("plan") or {})
    n_latents, k = sae.get("n_latents"), sae.get("k")
    rows = [("input width", str(cfg.get("d_in", "?"))), ("latents (concepts)", str(n_latents)),
            ("active per image, k", str(k))]
    dead = (report.get("sae") or {}).get("dead_fraction")
    if isinstance(dead, dict) and dead.get("value") is not None and n_latents:
        n_dead = round(dead["value"] * dead["n"])
        rows.append(("live / dead latents", f"{n_latents - n_dead} fire on some image / {n_dead} never fire"))
    fvu = (report.get("sae") or {}).get("fvu")
    if isinstance(fvu, dict):
        rows.append(("held-out FVU", f"{format_measure(fvu, with_n=False)} over {fvu.get('n')} test images"))
    if plan:
        rows.append(("training", f"{plan.get('n_steps')} steps of batch {plan.get('batch_size')} "
                                 f"({(cfg.get('train') or {}).get('n_epochs')} epochs)"))
    if sae.get("imported_from"):
        rows.append(("imported from", str(sae["imported_from"])))
    return rows


def _ttt_rows(results: dict) -> list[tuple[str, str]]:
    rows = []
    for name in ("concepts", "ttt"):
        if name in results and results[name].settings.get("n_neighbours"):
            rows.append(("neighbourhood size", f"{results[name].settings['n_neighbours']} nearest training images"))
            break
    if "ttt" not in results:
        return rows
    s, m = results["ttt"].settings, (results["ttt"].result.get("metrics") or {}).get("ttt") or {}
    steps = (f"{s.get('steps')} full-batch Adam steps (ERM) at lr {s.get('lr')}" if s.get("mode") == "erm"
             else f"one Adam step per neighbour, nearest first, at lr {s.get('lr')}")
    rows += [("TTT protocol", f"copy the global head, train its last layer on the neighbours: {steps}; predict, "
                              f"discard"),
             ("neighbours found", f"exact {str(s.get('metric', '')).upper()} search in the {s.get('space')}"),
             ("global head", f"{s.get('head')} head, {s.get('head_epochs')} epochs, Adam lr {s.get('head_lr')}"),
             ("test queries", str(m.get("n_queries") or s.get("n_queries") or "the whole test split"))]
    return rows


def _theory_rows(report: dict) -> list[tuple[str, str]]:
    """The simulated model and protocol of the theory preset, as the study resolved them."""
    config = (report.get("theory") or {}).get("config") or {}
    model, ttt = config.get("model") or {}, (config.get("predictor") or {}).get("ttt") or {}
    if not model:
        return []
    return [("concepts d1, features d2, active s", f"{model.get('d1')}, {model.get('d2')}, {model.get('s')}"),
            ("data", f"{model.get('n_train')} train and {model.get('n_test')} test points, noise σ = "
                     f"{model.get('noise')}, {'locally sparse' if model.get('local_sparsity') else 'isotropic'} "
                     f"concepts in {model.get('n_clusters')} clusters, {model.get('task')}"),
            ("TTT protocol", f"{ttt.get('n_neighbours')} neighbours ({str(ttt.get('metric', '')).upper()}), "
                             f"{ttt.get('steps')} Adam steps at lr {ttt.get('lr')}"),
            ("swept", f"d2 {config.get('d2_values')}, n_neighbours {config.get('n_neighbours_values')}, "
                      f"s {config.get('s_values')}, σ {config.get('noise_values')}; seeds {config.get('seeds')}")]


def setup_card(report: dict, results: dict, data: dict) -> list[dict]:
    """The card as ``[{"title", "rows": [[label, value], ...]}]`` (sections without rows are left out)."""
    sections = [("Data", _data_rows(data, results)), ("Backbone", _backbone_rows(results)),
                ("Sparse autoencoder", _sae_rows(report, results)), ("Neighbourhoods and TTT", _ttt_rows(results)),
                ("Simulated model (Section 2)", _theory_rows(report))]
    return [{"title": title, "rows": [[k, v] for k, v in rows]} for title, rows in sections if rows]


def sae_history(results: dict) -> dict | None:
    """The SAE's training curve and held-out latent-frequency histogram from its ``metrics.json`` (None for an
    SAE without one, e.g. an imported SAE)."""
    if "sae" not in results:
        return None
    metrics = _json(Path(results["sae"].dir) / "metrics.json")
    history = [h for h in metrics.get("history") or [] if isinstance(h, dict) and "step" in h and "fvu" in h]
    heldout = (metrics.get("final") or {}).get("heldout") or {}
    if not history and not heldout.get("freq_hist"):
        return None
    return {"history": history, "val_history": metrics.get("val_history") or [], "heldout": heldout}
