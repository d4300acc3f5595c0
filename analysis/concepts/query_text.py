"""The human-readable form of a query answer, and ``plain``: text from the data made safe to show.

Class names, ids and paths come from the user's data. ``plain`` shows them as they are, with three exceptions a
reader must never be fooled by: ``None`` is shown as ``-``, control and bidirectional-format characters (a
right-to-left override U+202E would reverse everything after it) are shown as their code point, and an
overlong name is cut with an ellipsis. The contact sheet draws the same strings with math text off.
"""

from __future__ import annotations

import unicodedata


def plain(value, width: int | None = None) -> str:
    """``value`` as one line of safe text, at most ``width`` characters (see the module docstring)."""
    text = "-" if value is None else str(value)
    text = "".join(f"<U+{ord(ch):04X}>" if unicodedata.category(ch) in ("Cc", "Cf") else ch for ch in text)
    if width is not None and len(text) > width:
        text = text[: max(width - 1, 0)] + "…"
    return text


def index_line(index: dict) -> str:
    """How the neighbours were searched: exact, or approximate with the recall measured when it was built."""
    if index["exact"]:
        how = f"exact ({index['factory']})"
    else:
        recall = ", ".join(f"recall@{n} {r:.3f}" for n, r in index["recall"].items())
        how = (f"approximate {index['factory']} nprobe {index['nprobe']} ({recall} against exact on "
               f"{index['recall_sample']} store rows; --exact for an exact scan)")
    where = f"; saved at {index['path']}" + (" (reused)" if index["reused"] else " (built now)") \
        if index["path"] else ""
    return f"index: {how}{where}" + (f"; {index['note']}" if index["note"] else "")


def _neighbour_lines(answer: dict) -> list[str]:
    lines = [f"nearest {answer['n_neighbours']} neighbours in {answer['space']} (cosine):"]
    for nb in answer["neighbours"]:
        lines.append(f"  #{nb['rank']:<3} row {nb['row']:>7}  id {plain(nb['id'], 40):<20} "
                     f"label {plain(nb['label'], 40):<10} similarity {nb['similarity']:.4f}")
    counts = ", ".join(f"{plain(c['label'], 40)} x{c['n']}" for c in answer["label_counts"])
    lines.append(f"neighbour labels: {counts}")
    near = answer["nearest"]
    lines.append(f"nearest similarity {near['similarity']:.3f}: higher than that of {near['store_percentile']:.1f}% "
                 f"of the store's own rows (their median {near['store_median']:.3f}, 1st percentile "
                 f"{near['store_p1']:.3f}, over {near['store_sample']} rows); the neighbourhood shares "
                 f"{near['query_concepts_shared']} of the query's {near['query_concepts']} concepts")
    return lines


def prediction_lines(prediction: dict | None) -> list[str]:
    """What the global head, local TTT and the kNN vote predict (or how to ask for it)."""
    if prediction is None:
        return ["predictions: not asked (--predict trains a linear head on the store's train split once and "
                "keeps it beside the index; --head HEAD_DIR uses a saved head)"]
    head = prediction["head"]
    lines = [f"predictions ({'head trained on the train split' if head['trained'] else 'head'} at "
             f"{head['path']}, reused {head['reused']}):"]
    for name, what in (("global", "global head"), ("ttt", "local TTT"), ("knn", "kNN vote")):
        p = prediction[name]
        prob = f" (probability {p['probability']:.2f})" if p.get("probability") is not None else ""
        lines.append(f"  {what:<12} {plain(p['label'], 40)}{prob}")
    lines.append(f"  (TTT: {prediction['ttt']['steps']} Adam steps at lr {prediction['ttt']['lr']} on the "
                 f"{prediction['n_labelled_neighbours']} labelled neighbours shown above)")
    return lines


def format_text(answer: dict, n_shared: int = 10) -> str:
    """The human-readable form of a query answer."""
    q = answer["query"]
    who = f"row {q['row']} (id {plain(q['id'], 60)}, label {plain(q['label'], 60)}, split {q['split']})" \
        if q["row"] is not None else f"image {plain(q['image_path'])}"
    lines = [f"query: {who}", *(f"WARNING: {w}" for w in answer["warnings"]),
             f"active concepts ({len(answer['concepts'])} of k={answer['sae']['k']}):"]
    for c in answer["concepts"]:
        lines.append(f"  concept {c['latent']:>5}  activation {c['activation']:.3f}  {plain(c['description'])}")
    lines += _neighbour_lines(answer)
    u = answer["union"]
    lines.append(f"the neighbourhood uses {u['size']} distinct concepts (bounds {u['min']}..{u['max']}); random "
                 f"neighbourhoods of the same size use {u['random_mean']:.1f} ± {u['random_se']:.1f} "
                 f"(n={u['random_n']}): percentile {u['percentile']:.0f} (share of random ones using more)")
    shared = answer["shared_concepts"]
    lines.append(f"concepts shared by two or more neighbours ({len(shared)}; top {min(n_shared, len(shared))}):")
    for c in shared[:n_shared]:
        mark = "*" if c["in_query"] else " "
        lines.append(f" {mark}concept {c['latent']:>5}  used by {c['n_neighbours_using']:>3} neighbours  summed "
                     f"activation {c['summed_activation']:.3f}  {plain(c['description'])}")
    if any(c["in_query"] for c in shared[:n_shared]):
        lines.append("  (* also active in the query)")
    lines += prediction_lines(answer["prediction"])
    lines.append(index_line(answer["index"]))
    for note in answer["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)
