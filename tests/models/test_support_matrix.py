"""Every architecture of the support matrix is exact against the independent brute force in
`tests/brute_force.py` (every edge, exact patching and EAP), or refused with `UnsupportedModelError`."""

import re
from pathlib import Path

import pytest

from circuits import Graph, load_model
from circuits.attribution import attribute
from circuits.errors import UnsupportedModelError
from circuits.testing import tiny_tokenizer
from tests import brute_force
from tests.architectures import ARCHITECTURES, Architecture
from tests.pairs import make_pairs

pytestmark = pytest.mark.slow  # runs SmolLM2, the notebooks or many model builds; `make test` runs it

SUPPORTED = [a for a in ARCHITECTURES if not a.refusal]
REFUSED = [a for a in ARCHITECTURES if a.refusal]


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


@pytest.mark.parametrize("arch", REFUSED, ids=lambda a: a.name)
def test_unsupported_architecture_is_refused_with_the_typed_error(arch: Architecture):
    hf = arch.build()
    with pytest.raises(UnsupportedModelError, match=re.escape(arch.refusal)) as refusal:
        load_model(hf, tiny_tokenizer())
    assert type(hf).__name__ in str(refusal.value)


def test_readme_table_is_the_matrix():
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    rows = dict(re.findall(r"^\| `([^`]+)` \| (yes|no) \|", readme, re.M))
    assert rows == {a.name: "no" if a.refusal else "yes" for a in ARCHITECTURES}
