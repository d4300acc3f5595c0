"""The query's contact sheet: every requested neighbour and concept shown or the cut stated, a neighbour x
concept grid, and text from the data (class names, ids) drawn as plain text whatever it holds."""

import dataclasses
import io

import pytest

from analysis.concepts.query import QueryEngine
from analysis.concepts.query_text import format_text, plain
from analysis.concepts.sheet import contact_sheet, draw_sheet
from embeddings.store import EmbeddingStore
from sae.checkpoint import load_sae
from sae.codes import CodeStore
from synthetic_concepts import planted_artifacts


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return planted_artifacts(tmp_path_factory.mktemp("sheet"), source={"kind": "digits", "size": 32})


def _sheet_texts(fig):
    from matplotlib.text import Text

    return [t for t in fig.findobj(Text) if t.get_text()]


def test_the_sheet_shows_every_neighbour_and_concept_or_states_its_cuts(planted, tmp_path):
    store_dir, sae_dir, codes_dir = planted
    store = EmbeddingStore.open(store_dir)
    engine = QueryEngine(store, load_sae(sae_dir), CodeStore.open(codes_dir), index_dir=None)
    small = engine.query(4, 12)
    fig, plan = draw_sheet(small, store, engine.namer)
    assert plan["cuts"] == [] and plan["shown"]["neighbours"] == [12, 12]
    texts = [t.get_text() for t in _sheet_texts(fig)]
    assert sum(t.startswith("#") for t in texts) == 12  # one tile per neighbour
    assert plan["grid"][: len(small["concepts"])] == [c["latent"] for c in small["concepts"]]
    assert any(t.startswith("Tiles: #rank") for t in texts) and any("activation" == t for t in texts)
    big = engine.query(4, 40)
    result = contact_sheet(big, store, engine.namer, tmp_path / "big.png", max_neighbours=30, n_concepts=2)
    assert result["shown"]["neighbours"] == [30, 40] and result["shown"]["concept_strips"] == [2, 3]
    assert result["cuts"] == ["showing 30 of 40 neighbours", "showing 2 of 3 concepts as strips (the strongest)"]
    fig, _ = draw_sheet(big, store, engine.namer, max_neighbours=30, n_concepts=2)
    header = next(t.get_text() for t in _sheet_texts(fig) if "neighbours:" in t.get_text())
    assert "showing 30 of 40 neighbours" in header


HOSTILE = ["$\\frac$ and $x^$", "L" * 200, "abc\u202edef", "tab\there"]


def test_hostile_class_names_and_null_ids_are_drawn_as_plain_text(planted, tmp_path):
    import dataclasses
    import io

    from analysis.concepts.query_text import format_text
    store_dir, sae_dir, codes_dir = planted
    store = EmbeddingStore.open(store_dir)
    hostile = dataclasses.replace(store, classes=HOSTILE, ids=[None] * store.n)
    engine = QueryEngine(hostile, load_sae(sae_dir), CodeStore.open(codes_dir), index_dir=None)
    for row in (0, 40, 80, 120):  # one query of each class: its name is in the title, the tiles and the strips
        answer = engine.query(row, 10)
        assert answer["query"]["label"] == HOSTILE[row // 40]
        fig, _ = draw_sheet(answer, hostile, engine.namer)
        fig.savefig(io.BytesIO(), format="png")  # math text would fail here on "$\frac$"
        for text in _sheet_texts(fig):
            assert "$" not in text.get_text() or not text.get_parse_math(), text.get_text()
            assert "\u202e" not in text.get_text() and "\t" not in text.get_text()
            assert max(len(line) for line in text.get_text().splitlines()) <= 200
        assert "\u202e" not in format_text(answer)
    assert "abc<U+202E>def" in format_text(engine.query(80, 10))
    result = contact_sheet(answer, hostile, engine.namer, tmp_path / "hostile.png")
    assert (tmp_path / "hostile.png").read_bytes()[:4] == b"\x89PNG" and result["images_available"]


def test_plain_text_of_data_strings():
    assert plain(None) == "-" and plain(7) == "7"
    assert plain("abc\u202edef") == "abc<U+202E>def" and plain("a\nb") == "a<U+000A>b"
    assert plain("L" * 200, 14) == "L" * 13 + "…" and plain("$\\frac$") == "$\\frac$"
