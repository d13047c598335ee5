"""The interactive circuit page and the circuit-tracer export: the page's data is the circuit, the page
references nothing outside itself, the export's fields are circuit-tracer's and it reads back exactly;
and, in a real headless Chromium, the page renders without script errors, its slider changes the
number of visible edges and hovering shows scores."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from circuits import Graph, attribute
from circuits.cli import main
from circuits.pictures.drawing import draw_circuit
from circuits.pictures.viewer import SHOWN, page_data, page_html, show, write_page
from circuits.pictures.viewer.circuit_tracer import (
    circuit_tracer_graph,
    from_circuit_tracer,
    to_circuit_tracer,
)
from tests.pairs import make_pairs


@pytest.fixture(scope="module")
def circuit(llama) -> Graph:
    graph = Graph.from_model(llama)
    attribute(llama, graph, make_pairs(llama), method="eap", quiet=True)
    return graph.top_n(80)


def test_the_page_holds_the_circuits_edges_largest_first(circuit):
    data = page_data(circuit)
    names = [e["name"] for e in data["edges"]]
    assert sorted(names) == sorted(circuit.edge_names(circuit.in_graph & circuit.valid))
    magnitudes = [abs(e["score"]) for e in data["edges"]]
    assert magnitudes == sorted(magnitudes, reverse=True)
    for edge in data["edges"][:10]:
        r, c = circuit.edge_index(edge["name"])
        assert edge["score"] == pytest.approx(float(circuit.scores[r, c]))
    assert data["shown"] == min(SHOWN, circuit.n_in_graph)
    drawn = {n["id"] for n in data["nodes"]}
    assert {"input", "logits"} <= drawn
    assert all(e["source"] in drawn and set(e["targets"]) <= drawn for e in data["edges"])
    k_edge = next(e for e in data["edges"] if e["input"] == "k")
    assert len(k_edge["targets"]) == 2  # tiny llama: 4 query heads share 2 key/value heads


def test_the_page_is_self_contained(circuit, tmp_path):
    page = page_html(circuit, prompts=["a </script><script>alert(1)</script> b"], faithfulness=0.5)
    assert "http" not in page and "src=" not in page  # nothing fetched, not even a namespace URL
    assert page.count("</script>") == 2  # the data block and the script: the prompt cannot close either
    block = re.search(r"<script type='application/json' id='circuit-data'>(.*?)</script>", page, re.S)
    assert block is not None and json.loads(block.group(1))["prompts"][0].startswith("a </script>")
    path = draw_circuit(circuit, tmp_path / "c.html")  # the drawing entry point writes the same page
    assert path.read_text() == page_html(circuit)
    frame = show(circuit)._repr_html_()
    assert frame.startswith("<iframe srcdoc=") and "&lt;script" in frame


def test_cli_view_writes_the_page_and_the_export(circuit, tmp_path, capsys):
    circuit.to_json(tmp_path / "circuit.json")
    out, export = tmp_path / "circuit.html", tmp_path / "graph.json"
    args = ["view", str(tmp_path / "circuit.json"), "--out", str(out), "--circuit-tracer", str(export)]
    assert main(args) == 0
    assert "KB" in capsys.readouterr().out and out.exists()
    assert from_circuit_tracer(export).n_in_graph == circuit.n_in_graph
    assert main(["view", str(tmp_path / "circuit.json"), "--out", str(tmp_path / "x.svg")]) != 0


# circuit-tracer's frontend/graph_models.py: the fields of each record and their JSON types
FIELDS: dict[str, dict[str, type]] = {
    "metadata": {"slug": str, "scan": str, "transcoder_list": list, "prompt_tokens": list, "prompt": str},
    "qParams": {"pinnedIds": list, "supernodes": list, "linkType": str, "clickedId": str, "sg_pos": str},
    "node": {
        "node_id": str,
        "feature": int,
        "layer": str,
        "ctx_idx": int,
        "feature_type": str,
        "token_prob": float,
        "is_target_logit": bool,
        "run_idx": int,
        "reverse_ctx_idx": int,
        "jsNodeId": str,
        "clerp": str,
    },
    "link": {"source": str, "target": str, "weight": float},
}


def _has_fields(record: dict, kind: str) -> None:
    for name, kind_of in FIELDS[kind].items():
        assert isinstance(record[name], kind_of), (kind, name, record[name])


def test_circuit_tracer_export_has_the_formats_fields(circuit):
    graph = circuit_tracer_graph(circuit, slug="ioi")
    _has_fields(graph["metadata"], "metadata")
    _has_fields(graph["qParams"], "qParams")
    for node in graph["nodes"]:
        _has_fields(node, "node")
    ids = [n["node_id"] for n in graph["nodes"]]
    assert len(set(ids)) == len(ids) and len({n["jsNodeId"] for n in graph["nodes"]}) == len(ids)
    assert [n["feature_type"] for n in graph["nodes"] if n["clerp"] in ("input", "logits")] == [
        "embedding",
        "logit",
    ]
    for link in graph["links"]:
        _has_fields(link, "link")
        assert link["source"] in ids and link["target"] in ids
        assert link["weight"] == pytest.approx(-sum(link["circuits_edges"].values()))  # + helps the metric


def test_circuit_tracer_export_reads_back(circuit, tmp_path):
    back = from_circuit_tracer(to_circuit_tracer(circuit, tmp_path / "graph.json"))
    assert torch.equal(back.in_graph, circuit.in_graph & circuit.valid)
    kept = circuit.in_graph & circuit.valid
    torch.testing.assert_close(back.scores[kept], circuit.scores[kept], rtol=0, atol=1e-6)
    assert back.node_scores is not None and circuit.node_scores is not None
    shown = {n["id"] for n in page_data(circuit)["nodes"]} - {"input", "logits"}
    for name in shown:
        i = circuit.src_index[name]
        assert float(back.node_scores[i]) == pytest.approx(float(circuit.node_scores[i]), abs=1e-6)


# ------------------------------------------------------------------------------- in a real browser
def _into_logits(edges: list[dict]) -> set[int]:
    """Indices of the edges on a path that ends at the logits."""
    reach = {"logits"}
    while True:
        more = {e["source"] for e in edges if reach & set(e["targets"])} - reach
        if not more:
            return {i for i, e in enumerate(edges) if e["source"] in reach and reach & set(e["targets"])}
        reach |= more


def _browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip(
            "no Chromium / ChromeDriver here (Debian packages chromium and chromium-driver; `make test` "
            "installs them where it may): the page was not opened in a browser"
        )
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


@pytest.mark.slow
def test_the_page_in_a_headless_browser(circuit, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    path = write_page(circuit, tmp_path / "circuit.html", title="tiny circuit")
    browser = _browser()
    try:
        browser.get(path.as_uri())
        visible = lambda: len(browser.find_elements(By.CSS_SELECTOR, "g.edge:not(.hidden)"))  # noqa: E731
        assert visible() == min(SHOWN, circuit.n_in_graph)
        slider = browser.find_element(By.ID, "edge-count")
        browser.execute_script(
            "arguments[0].value = 5; arguments[0].dispatchEvent(new Event('input'))", slider
        )
        assert visible() == 5
        assert browser.find_element(By.ID, "edge-count-label").text.startswith(f"5 of {circuit.n_in_graph}")
        node = browser.find_element(By.CSS_SELECTOR, "g.node:not(.hidden)[data-id='logits']")
        ActionChains(browser).move_to_element(node).perform()  # a real hover
        tooltip = browser.find_element(By.ID, "tooltip")
        assert tooltip.is_displayed() and "logits" in tooltip.text and "shown edges in" in tooltip.text
        top = page_data(circuit)["edges"][0]
        edge = browser.find_element(By.CSS_SELECTOR, "g.edge[data-index='0'] path")
        ActionChains(browser).move_to_element(edge).perform()
        browser.execute_script(
            "arguments[0].dispatchEvent(new MouseEvent('mouseover', {bubbles: true}))", edge
        )
        assert top["name"] in tooltip.text and f"{top['score']:.4f}" in tooltip.text
        node.click()  # lights the shown edges on a path into the logits
        lit = {
            int(g.get_attribute("data-index")) for g in browser.find_elements(By.CSS_SELECTOR, "g.edge.lit")
        }
        assert lit == _into_logits(page_data(circuit)["edges"][:5])
        browser.find_element(By.ID, "clear").click()
        search = browser.find_element(By.ID, "search")
        search.send_keys("a1.h")
        matches = browser.find_elements(By.CSS_SELECTOR, "g.node.match:not(.hidden)")
        assert matches and all(m.get_attribute("data-id").startswith("a1.h") for m in matches)
        listed = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#top-edges li")]
        assert [t.split()[0] for t in listed] == [e["name"] for e in page_data(circuit)["edges"][:5]]
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        browser.quit()


@pytest.fixture(scope="module")
def span_circuit(llama):
    from circuits.span_graph import SpanGraph
    from circuits.spans import Spans

    pairs = make_pairs(llama)
    spans = Spans.from_differences(pairs)
    graph = SpanGraph.from_model(llama, spans)
    attribute(llama, graph, pairs, method="eap", spans=spans, quiet=True)
    return graph.top_n(60), spans.tokens(llama, pairs, 0)


def _data(page: str) -> dict:
    block = re.search(r"<script type='application/json' id='circuit-data'>(.*?)</script>", page, re.S)
    assert block is not None
    return json.loads(block.group(1))


def test_the_span_page_holds_every_span_and_crossing_edge_by_span(span_circuit, tmp_path):
    from circuits.pictures.span_drawing import draw_span_circuit

    circuit, tokens = span_circuit
    path = draw_span_circuit(circuit, tmp_path / "spans.html", tokens=tokens)  # .html: the page
    data = _data(path.read_text())
    assert len(data["edges"]) == circuit.n_in_graph and bool(circuit.in_crossing.any())
    scores = [abs(e["score"]) for e in data["edges"]]
    assert scores == sorted(scores, reverse=True)
    ids = {n["id"] for n in data["nodes"]}
    assert all(e["source"] in ids and set(e["targets"]) <= ids for e in data["edges"])
    assert [c["label"] for c in data["columns"]] == list(circuit.names)
    assert data["columns"][0]["text"] == "".join(tokens[0]).strip()[:24]
    for e in data["edges"]:  # a node sits in its span's column
        for node in (e["source"], *e["targets"]):
            span = circuit.names.index(node.rsplit("@", 1)[1])
            x = next(n["x"] for n in data["nodes"] if n["id"] == node)
            left = data["columns"][span - 1]["x"] if span else -1e9
            right = data["columns"][span + 1]["x"] if span + 1 < len(circuit.names) else 1e9
            assert left < x < right
    crossing = [
        e for e in data["edges"] if e["source"].rsplit("@", 1)[1] != e["targets"][0].rsplit("@", 1)[1]
    ]
    assert crossing and all(e["name"].split("->")[1] == e["targets"][0] for e in crossing)


@pytest.mark.slow
def test_the_span_page_in_a_headless_browser(span_circuit, tmp_path):
    from selenium.webdriver.common.by import By

    from circuits.pictures.span_drawing import write_span_page

    circuit, tokens = span_circuit
    path = write_span_page(circuit, tmp_path / "spans.html", tokens=tokens, title="by span")
    browser = _browser()
    try:
        browser.get(path.as_uri())
        visible = lambda: len(browser.find_elements(By.CSS_SELECTOR, "g.edge:not(.hidden)"))  # noqa: E731
        assert visible() == min(SHOWN, circuit.n_in_graph)
        labels = {t.text for t in browser.find_elements(By.CSS_SELECTOR, "text.row-label")}
        assert set(circuit.names) <= labels
        node = browser.find_elements(By.CSS_SELECTOR, "g.node:not(.hidden)")[0]
        node.click()
        assert browser.find_elements(By.CSS_SELECTOR, "g.edge.lit")
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        browser.quit()
