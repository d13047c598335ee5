"""Every architecture of the support matrix is exact against the independent brute force in
`tests/brute_force.py` (every edge, exact patching and EAP), or refused with `UnsupportedModelError`."""

import re
from pathlib import Path

import pytest

from circuits import Graph, load_model
from circuits.attribution import RelPRules, attribute
from circuits.errors import UnsupportedModelError
from circuits.testing import tiny_tokenizer
from tests import brute_force
from tests.architectures import ARCHITECTURES, ATP_STAR_REFUSALS, RELP_WITHOUT_MLP_RULES, Architecture
from tests.pairs import make_pairs

pytestmark = pytest.mark.slow  # runs SmolLM2, the notebooks or many model builds; `make test` runs it

SUPPORTED = [a for a in ARCHITECTURES if not a.refused]
REFUSED = [a for a in ARCHITECTURES if a.refused]


def test_the_matrix_covers_thirty_model_types():
    assert len({a.model_type for a in SUPPORTED}) >= 30
    assert len({a.name for a in ARCHITECTURES}) == len(ARCHITECTURES)


@pytest.mark.parametrize("arch", SUPPORTED, ids=lambda a: a.name)
def test_supported_architecture_is_exact(arch: Architecture):
    model = load_model(arch.build(), tiny_tokenizer())
    pairs, graph = make_pairs(model), Graph.from_model(model)
    for method, reference in (("exact", brute_force.exact_scores), ("eap", brute_force.eap_scores)):
        ours = attribute(model, graph, pairs, method=method, quiet=True).edge_scores
        want = reference(model, graph, pairs)
        assert ours is not None
        err = (ours.double() - want).abs().max().item()
        assert err <= 1e-4 * want.abs().max().item(), f"{method}: max error {err:.3g}"
        assert want.abs().max() > 1e-3  # scores well above float32 rounding, so the check can fail
        if method == "eap":
            _check_relp(model, graph, pairs, ours, arch)
            recomputed = attribute(model, graph, pairs, method="eap", recompute=True, quiet=True).edge_scores
            assert recomputed is not None and bool((recomputed == ours).all()), "recompute changed scores"
    _check_atp_star(model, graph, pairs, arch)


def _check_atp_star(model, graph, pairs, arch: Architecture) -> None:
    """AtP*'s q/k edges equal the brute-force QK fix, or the fix is refused for its named reason."""
    if arch.name in ATP_STAR_REFUSALS:
        with pytest.raises(UnsupportedModelError, match=re.escape(ATP_STAR_REFUSALS[arch.name])):
            attribute(model, graph, pairs, method="atp*", quiet=True)
        return
    ours = attribute(model, graph, pairs, method="atp*", quiet=True).edge_scores
    assert ours is not None
    reference = brute_force.qk_fix_scores(model, graph, pairs)
    scale = max(abs(v) for v in reference.values())
    err = max(abs(float(ours[graph.edge_index(e)]) - v) for e, v in reference.items())
    assert err <= 1e-4 * scale, f"atp*: max error {err:.3g} of {scale:.3g}"
    nodes = attribute(model, graph, pairs, method="atp*", level="node", quiet=True).node_scores
    assert nodes is not None and bool(nodes.isfinite().all()) and bool((nodes >= 0).all())


def _check_relp(model, graph, pairs, eap, arch: Architecture) -> None:
    """RelP with every rule off is EAP; with the paper's rules it runs and changes the scores, or (mixtures
    of experts) refuses the MLP rules it cannot place and runs without them."""
    off = RelPRules(ln=False, identity=False, half=False)
    plain = attribute(model, graph, pairs, method="relp", rules=off, quiet=True).edge_scores
    assert plain is not None and (plain - eap).abs().max() <= 1e-6 * eap.abs().max()
    rules = RelPRules()
    if arch.name in RELP_WITHOUT_MLP_RULES:
        with pytest.raises(UnsupportedModelError, match="identity / half rules cannot be placed"):
            attribute(model, graph, pairs, method="relp", quiet=True)
        rules = RelPRules(identity=False, half=False)
    relp = attribute(model, graph, pairs, method="relp", rules=rules, quiet=True).edge_scores
    assert relp is not None and bool(relp.isfinite().all())
    assert (relp - eap).abs().max() > 1e-4 * eap.abs().max()


@pytest.mark.parametrize("arch", REFUSED, ids=lambda a: a.name)
def test_unsupported_architecture_is_refused_with_the_typed_error(arch: Architecture):
    hf = arch.build()
    with pytest.raises(UnsupportedModelError, match=re.escape(arch.refusal)) as refusal:
        load_model(hf, tiny_tokenizer())
    assert type(hf).__name__ in str(refusal.value)


def test_the_documented_table_is_the_matrix():
    page = (Path(__file__).parents[2] / "docs" / "models.md").read_text()
    rows = dict(re.findall(r"^\| `([^`]+)` \| (yes|no) \|", page, re.M))
    assert rows == {a.name: "yes" if a.exact_with_newest_transformers else "no" for a in ARCHITECTURES}
