"""The support matrix: tiny random models of many Hugging Face architectures and what the toolkit does
with each (exact, or refused with `UnsupportedModelError` for the reason given). docs/models.md's table is
this list; `test_support_matrix.py` checks both."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from packaging.version import Version
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from circuits.testing import tiny_tokenizer

SEQUENTIAL = "pre-norm blocks"
PARALLEL_SHARED = "parallel attention and MLP, one shared norm"
PARALLEL_TWO = "parallel attention and MLP, a norm each"
SANDWICH = "post-norm (sandwich) blocks: one attention source `a{l}` per layer, per-head q/k/v inputs"
SCALED = "residual multiplier: head and MLP outputs as scaled into the residual"
HEADS_NORM = "q/k norm over all heads: each head's input patched and differentiated past it"
MIXERS = (
    "hybrid: a mixer layer's token mixer (state space, convolution, linear attention) is one node `mix{l}`"
)
HYBRID = ["linear_attention", "full_attention"]
GATED = "hybrid (`mix{l}` linear-attention layers); a head's q input also computes its output gate"
SSM = "state-space blocks (a norm and a mixer, no MLP): one node `mix{l}` per layer"
BLOCKS = "one node `mix{l}` per block (a Mamba-2 mixer, an attention, an MLP or a mixture of experts each)"
MIXED_OUTPUTS = (
    "a norm over all heads' outputs before W_O: one attention source `a{l}` per layer, per-head q/k/v"
)


@dataclass(frozen=True)
class Architecture:
    model_type: str
    options: dict[str, Any] = field(default_factory=dict)
    how: str = SEQUENTIAL  # for supported architectures: the block layout the graph reads
    refusal: str = ""  # for refused ones: a fragment of the UnsupportedModelError message
    why: str = ""  # for refused ones: the reason in words (docs/models.md's column)
    label: str = ""  # docs/models.md's name when one model type appears in several styles
    exact_since: str = ""  # the transformers version from which it is exact; refused as above before it
    layer_scalars: tuple[float, ...] = ()  # learned values a checkpoint has and a config cannot set (Gemma-4)

    @property
    def name(self) -> str:
        return self.label or self.model_type

    @property
    def refused(self) -> bool:
        """Refused with the installed transformers."""
        return bool(self.refusal) and not (
            self.exact_since and Version(transformers.__version__) >= Version(self.exact_since)
        )

    @property
    def exact_with_newest_transformers(self) -> bool:
        """Exact with the newest transformers (docs/models.md's column)."""
        return not self.refusal or bool(self.exact_since)

    def build(self) -> PreTrainedModel:
        """The tiny random model: 2 layers, 4 heads, d_model 64, weights drawn with std 0.1 (large enough
        that edge scores stand well above float32 rounding)."""
        sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
        init = dict(initializer_range=0.1, init_std=0.1)
        config = AutoConfig.for_model(
            self.model_type, vocab_size=len(tiny_tokenizer()), **sizes, **init, **self.options
        )
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        scaled = [m for m in model.modules() if "layer_scalar" in m._buffers]
        for module, scalar in zip(scaled, self.layer_scalars, strict=bool(self.layer_scalars)):
            module.layer_scalar.fill_(scalar)
        return model


GQA = dict(num_key_value_heads=2)
GQA16 = dict(num_key_value_heads=2, head_dim=16)
PAD = dict(pad_token_id=0)
QWEN_HYBRID_MOE = dict(  # Qwen3-Next and Qwen3.5-MoE: a linear-attention layer, then attention; experts
    **GQA16,
    layer_types=HYBRID,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
)
MULTIPLIERS = dict(
    residual_multiplier=0.5, embedding_multiplier=3.0, attention_multiplier=0.2, logits_scaling=2.0
)
# RelP's identity and half rules need hooks at an MLP's activation; the bridge fuses these experts
RELP_WITHOUT_MLP_RULES = {
    "mixtral",
    "phimoe",
    "qwen2_moe",
    "qwen3_moe",
    "gpt_oss",
    "granitemoe",
    "olmoe",
    "flex_olmo",
    "minimax_m2",
    "bitnet",  # a norm between the activation and the down projection
    "jamba",
    "qwen3_next",
    "ernie4_5_moe",
    "glm4_moe",
    "lfm2_moe",
    "llama4_text",
    "qwen3_5_moe_text",
    "modernbert-decoder",  # a gated MLP whose gate and up halves come from one fused projection
    "deepseek_v2",
    "deepseek_v3",
    "glm4_moe_lite",
    "afmoe",
}
# AtP*'s QK fix needs the pattern to be the softmax of scores linear in q/k after their norms
NO_PATTERN = "the attention pattern hook does not feed"
ATP_STAR_REFUSALS = {
    "gpt_neo": NO_PATTERN,
    "gptj": NO_PATTERN,
    "opt": NO_PATTERN,
    "phimoe": NO_PATTERN,
    "xglm": NO_PATTERN,
    "gpt_oss": "not the softmax of its scores",
    "hunyuan_v1_dense": "through its norm alone",
    "gemma2": "soft-capping",
    "helium": NO_PATTERN,
    "gemma4_text (learned layer scalars, no per-layer inputs)": "rescale the residual stream",
    "persimmon": NO_PATTERN,
    "biogpt": NO_PATTERN,
    "afmoe": NO_PATTERN,
    "laguna": NO_PATTERN,
    "vaultgemma": "soft-capping",
    "modernbert-decoder": NO_PATTERN,
    "llama4_text": NO_PATTERN,
    "lfm2 (hybrid)": "every layer is attention",
    "bamba": "every layer is attention",
    "jamba": "every layer is attention",
    "mamba": "every layer is attention",
    "mamba2": "every layer is attention",
    "falcon_mamba": "every layer is attention",
    "nemotron_h": "every layer is attention",
    "qwen3_5_text": "every layer is attention",
    "qwen3_next": "every layer is attention",
    "lfm2_moe": "every layer is attention",
    "olmo_hybrid": "every layer is attention",
    "falcon_h1": "every layer is attention",
    "granitemoehybrid (dense)": "every layer is attention",
    "qwen3_5_moe_text": "every layer is attention",
    **dict.fromkeys(
        ["deepseek_v2", "deepseek_v3", "glm4_moe_lite", "glm_moe_dsa", "youtu"], "latent attention"
    ),
}
BRIDGE = "the TransformerLens 4.3 adapter fails to run the model"
# multi-head latent attention: every head its own key and value; q/k (16 wide) and v (12) widths differ
LATENT_DIMS = dict(
    num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12
)
DEEPSEEK = dict(
    **LATENT_DIMS,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    n_shared_experts=1,
    first_k_dense_replace=1,
)
LATENT = (
    "multi-head latent attention: each head's q, k and v (one rotary key part shared by all) recomputed from "
    "the patched residual through the latent projections and the rotary embedding"
)
GATE_PROJ = (
    "a per-head output gate from a projection of its own: head h's q input is the residual its query and "
    "its gate are computed from"
)
PER_LAYER_INPUTS = (
    "per-layer inputs (a second token embedding entering every layer): no node for them yet; and "
    "full-attention layers with another head width than the sliding ones (`global_head_dim`): the graph has "
    "one head width"
)
PARALLEL_MIXERS = (
    "attention heads and a Mamba mixer `mix{l}` side by side in each layer, reading one norm; the layers' "
    "multipliers folded into the linear maps next to them (`circuits.models.folding`)"
)
GRANITE_HYBRID = dict(  # Granite-4.0-H: Mamba-2 and attention layers, a shared MLP, Granite's multipliers
    **GQA,
    **PAD,
    **MULTIPLIERS,
    layer_types=["linear_attention", "full_attention"],
    shared_intermediate_size=128,
    mamba_d_state=16,
    mamba_n_heads=8,
    mamba_chunk_size=8,
)
FALCON_H1_MULTIPLIERS = dict(  # muP multipliers as the checkpoints have them (none of them 1)
    attention_in_multiplier=0.5,
    attention_out_multiplier=0.7,
    ssm_out_multiplier=1.3,
    ssm_in_multiplier=1.2,
    key_multiplier=0.9,
    embedding_multiplier=2.0,
    lm_head_multiplier=0.8,
    mlp_multipliers=[1.1, 0.6],
)
OWN_ADAPTER = "pre-norm blocks, through this toolkit's TransformerLens adapter (`circuits.models.adapters`)"

ARCHITECTURES = [
    Architecture("gpt2"),
    Architecture("gpt_neo", dict(attention_types=[[["global"], 2]], max_position_embeddings=128)),
    Architecture("gpt_neox", how=PARALLEL_TWO),
    Architecture("gpt_neox", dict(use_parallel_residual=False), label="gpt_neox (sequential)"),
    Architecture("gpt_bigcode"),
    Architecture("gptj", dict(rotary_dim=8), how=PARALLEL_SHARED),
    Architecture("llama", GQA),
    Architecture("mistral", GQA),
    Architecture("mixtral", dict(num_local_experts=4, **GQA)),
    Architecture("phimoe", dict(num_local_experts=4, num_experts_per_tok=2, **GQA)),
    Architecture("qwen2", GQA),
    Architecture(
        "qwen2_moe", dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32, **GQA)
    ),
    Architecture("qwen3", GQA16),
    Architecture("gemma", GQA16),
    Architecture("phi", how=PARALLEL_SHARED),
    Architecture("phi3", dict(**GQA, **PAD)),
    Architecture("stablelm", dict(num_key_value_heads=4)),
    Architecture(
        "stablelm",
        dict(num_key_value_heads=4, use_parallel_residual=True),
        PARALLEL_SHARED,
        label="stablelm (parallel)",
    ),
    Architecture("starcoder2", GQA),
    Architecture("bloom"),
    Architecture("mpt"),
    Architecture("olmo"),
    Architecture("opt", dict(ffn_dim=128, word_embed_proj_dim=64)),
    Architecture("xglm"),
    Architecture("cohere", GQA, how=PARALLEL_SHARED),
    Architecture("cohere2", GQA, how=PARALLEL_SHARED),
    Architecture(
        "falcon",
        dict(alibi=False, new_decoder_architecture=False, parallel_attn=True, multi_query=True),
        PARALLEL_SHARED,
        label="falcon (7b style)",
    ),
    Architecture(
        "falcon",
        dict(alibi=True, new_decoder_architecture=False, parallel_attn=False, multi_query=False),
        refusal="bridge's logits differ",
        why="before transformers 5.25 the bridge's logits differ from the model's (alibi is not applied as "
        "Falcon does); from 5.25 on Falcon adds alibi to the attention mask, and the model is exact",
        label="falcon (rw style, alibi)",
        exact_since="5.25",
    ),
    Architecture("nemotron", GQA16),
    Architecture("gpt_oss", dict(num_local_experts=4, **GQA16)),
    Architecture("glm", dict(**GQA16, **PAD)),
    Architecture("smollm3", dict(**GQA, **PAD)),
    Architecture("arcee", GQA),
    Architecture("seed_oss", GQA16),
    Architecture("apertus", GQA),
    Architecture("hunyuan_v1_dense", GQA16),
    Architecture("ernie4_5", GQA16),
    Architecture("lfm2", GQA),
    Architecture("codegen", dict(rotary_dim=8), how=PARALLEL_SHARED),
    Architecture("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, **GQA16)),
    Architecture("gemma2", GQA16, how=SANDWICH),
    Architecture("gemma3_text", GQA16, how=SANDWICH),
    Architecture("glm4", dict(**GQA16, **PAD), how=SANDWICH),
    Architecture("exaone4", GQA16, how=SANDWICH),
    Architecture("granite", dict(**GQA, **MULTIPLIERS), how=SCALED),
    Architecture("granitemoe", dict(num_local_experts=4, **GQA, **MULTIPLIERS), how=SCALED),
    Architecture("olmo2", GQA, how=HEADS_NORM),
    Architecture("olmo3", how=HEADS_NORM),
    Architecture("olmoe", dict(num_experts=4, num_experts_per_tok=2), how=HEADS_NORM),
    Architecture("flex_olmo", dict(num_experts=4, num_experts_per_tok=2, **PAD), how=HEADS_NORM),
    Architecture("minimax_m2", dict(num_local_experts=4, num_experts_per_tok=2, **GQA16), how=HEADS_NORM),
    Architecture("bitnet", GQA, how=MIXED_OUTPUTS),
    Architecture(
        "lfm2", dict(**GQA, layer_types=["conv", "full_attention"]), how=MIXERS, label="lfm2 (hybrid)"
    ),
    Architecture("bamba", dict(**GQA, attn_layer_indices=[1], mamba_chunk_size=8), how=MIXERS),
    Architecture(
        "jamba",
        dict(
            **GQA,
            attn_layer_period=2,
            attn_layer_offset=1,
            expert_layer_period=2,
            expert_layer_offset=1,
            num_experts=2,
            use_mamba_kernels=False,
        ),
        how=MIXERS,
    ),
    Architecture("qwen3_5_text", dict(**GQA16, layer_types=HYBRID), how=GATED),
    Architecture(
        "qwen3_next",
        QWEN_HYBRID_MOE,
        how=GATED,
    ),
    Architecture("ernie4_5_moe", dict(**GQA, **PAD)),
    Architecture("jais2", dict(**GQA, **PAD)),
    Architecture("ministral3", dict(**GQA, **PAD)),
    Architecture(
        "glm4_moe",
        dict(
            **GQA16,
            **PAD,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
        ),
    ),
    Architecture(
        "lfm2_moe",
        dict(
            **GQA,
            **PAD,
            layer_types=["conv", "full_attention"],
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            num_dense_layers=1,
        ),
        how=MIXERS,
    ),
    Architecture("llama4_text", dict(**GQA16, **PAD, num_local_experts=2, interleave_moe_layer_step=2)),
    Architecture("modernbert-decoder", PAD),
    Architecture("olmo_hybrid", dict(**GQA, **PAD), how=MIXERS),
    Architecture(
        "qwen3_5_moe_text",
        dict(**QWEN_HYBRID_MOE, **PAD),
        how=GATED,
    ),
    Architecture("vaultgemma", dict(**GQA16, **PAD)),
    Architecture("mamba", how=SSM),
    Architecture("mamba2", dict(num_heads=4, head_dim=32, n_groups=1, expand=2, chunk_size=8), how=SSM),
    Architecture("falcon_mamba", how=SSM),
    Architecture("nemotron_h", dict(num_key_value_heads=2, chunk_size=8), how=BLOCKS),
    Architecture(
        "gemma4_text",
        dict(
            **GQA16,
            hidden_size_per_layer_input=0,
            global_head_dim=16,
            layer_types=["sliding_attention", "full_attention"],
        ),
        how=f"{SANDWICH}; learned layer scalars rescale each edge by the scalars between its ends",
        label="gemma4_text (learned layer scalars, no per-layer inputs)",
        layer_scalars=(0.6, 1.7),
    ),
    Architecture("helium", GQA16, how=OWN_ADAPTER),
    Architecture("persimmon", how=OWN_ADAPTER),
    Architecture("biogpt", how=OWN_ADAPTER),
    Architecture("deepseek_v2", DEEPSEEK | dict(q_lora_rank=None), how=LATENT),
    Architecture("deepseek_v3", DEEPSEEK | dict(q_lora_rank=24, n_group=1, topk_group=1), how=LATENT),
    Architecture("glm4_moe_lite", dict(**LATENT_DIMS, q_lora_rank=24, **PAD), how=LATENT),
    Architecture("glm_moe_dsa", dict(**LATENT_DIMS, q_lora_rank=24, **PAD), how=LATENT),
    Architecture("youtu", dict(**LATENT_DIMS, q_lora_rank=24, **PAD), how=LATENT),
    Architecture("afmoe", GQA16, how=f"{SANDWICH}; {GATE_PROJ}"),
    Architecture("laguna", dict(**GQA16, mlp_layer_types=["dense", "dense"]), how=GATE_PROJ),
    Architecture(
        "falcon_h1",
        dict(
            **GQA,
            **FALCON_H1_MULTIPLIERS,
            mamba_d_ssm=64,
            mamba_n_heads=8,
            mamba_d_state=16,
            mamba_chunk_size=8,
        ),
        how=PARALLEL_MIXERS,
    ),
    # ------------------------------------------------------------------------------------ refused
    Architecture("gemma4_text", GQA16, refusal="per-layer inputs", why=PER_LAYER_INPUTS, label="gemma4_text"),
    Architecture(
        "granitemoehybrid",
        dict(**GRANITE_HYBRID, num_local_experts=0),
        how=f"{MIXERS}; {SCALED}, the mixers' applied by the graph (the bridge hooks them unscaled)",
        label="granitemoehybrid (dense)",
    ),
    Architecture(
        "granitemoehybrid",
        GRANITE_HYBRID,
        refusal="no hook point 'blocks.0.hook_mlp_out'",
        why="with experts, the bridge has no hook on the MLP's output (the experts' sum plus the shared MLP)",
    ),
    Architecture(
        "hrm_text", dict(**GQA, **PAD), refusal="no layer blocks", why="the adapter maps no layer blocks"
    ),
    Architecture(
        "deepseek_v4",
        dict(**GQA, **PAD),
        refusal="no hook point 'blocks.0.hook_resid_pre'",
        why="the adapter hooks no residual stream around its blocks",
    ),
    Architecture(
        "nanochat",
        dict(**GQA, **PAD),
        refusal="run more than once in a forward pass (ln_final.hook_in: 2 times",
        why="its final norm module also normalises the embeddings: the logits' input hook runs twice",
    ),
    Architecture(
        "zamba2", dict(**GQA, **PAD, layer_types=["mamba", "hybrid"]), refusal="fails to run", why=BRIDGE
    ),
    Architecture(
        "rwkv",
        PAD,
        refusal="no hook point 'blocks.0.hook_attn_out'",
        why="RWKV's time and channel mixing (both mix tokens) are no attention and MLP",
    ),
    Architecture("recurrent_gemma", refusal="load-time checks cannot run", why=BRIDGE),
    Architecture(
        "jetmoe", GQA, refusal="no hook point 'blocks.0.attn.o.hook_in'", why="mixture-of-attention heads"
    ),
    Architecture(
        "openai-gpt", refusal="no hook point 'ln_final.hook_in'", why="post-norm blocks, no final norm"
    ),
]

# The families' best-known checkpoints (docs/models.md's table); none where this toolkit names none.
CHECKPOINTS = {
    "gpt2": "openai-community/gpt2",
    "gpt_neo": "EleutherAI/gpt-neo-125m",
    "gpt_neox": "EleutherAI/pythia-160m",
    "gpt_bigcode": "bigcode/starcoderbase-1b",
    "gptj": "EleutherAI/gpt-j-6b",
    "llama": "meta-llama/Llama-3.1-8B",
    "mistral": "mistralai/Mistral-7B-v0.1",
    "mixtral": "mistralai/Mixtral-8x7B-v0.1",
    "phimoe": "microsoft/Phi-3.5-MoE-instruct",
    "qwen2": "Qwen/Qwen2.5-0.5B",
    "qwen2_moe": "Qwen/Qwen1.5-MoE-A2.7B",
    "qwen3": "Qwen/Qwen3-0.6B",
    "gemma": "google/gemma-2b",
    "phi": "microsoft/phi-2",
    "phi3": "microsoft/Phi-3-mini-4k-instruct",
    "stablelm": "stabilityai/stablelm-2-1_6b",
    "starcoder2": "bigcode/starcoder2-3b",
    "bloom": "bigscience/bloom-560m",
    "mpt": "mosaicml/mpt-7b",
    "olmo": "allenai/OLMo-1B-hf",
    "opt": "facebook/opt-125m",
    "xglm": "facebook/xglm-564M",
    "cohere": "CohereForAI/c4ai-command-r-v01",
    "falcon (7b style)": "tiiuae/falcon-7b",
    "falcon (rw style, alibi)": "tiiuae/falcon-rw-1b",
    "gpt_oss": "openai/gpt-oss-20b",
    "smollm3": "HuggingFaceTB/SmolLM3-3B",
    "codegen": "Salesforce/codegen-350M-mono",
    "qwen3_moe": "Qwen/Qwen3-30B-A3B",
    "gemma2": "google/gemma-2-2b",
    "gemma3_text": "google/gemma-3-270m",
    "granite": "ibm-granite/granite-3.3-2b-base",
    "olmo2": "allenai/OLMo-2-0425-1B",
    "olmoe": "allenai/OLMoE-1B-7B-0924",
    "minimax_m2": "MiniMaxAI/MiniMax-M2",
    "bitnet": "microsoft/bitnet-b1.58-2B-4T-bf16",
    "lfm2 (hybrid)": "LiquidAI/LFM2-1.2B",
    "bamba": "ibm-ai-platform/Bamba-9B",
    "jamba": "ai21labs/AI21-Jamba-Mini-1.5",
    "glm4_moe": "zai-org/GLM-4.5-Air",
    "llama4_text": "meta-llama/Llama-4-Scout-17B-16E",
    "qwen3_next": "Qwen/Qwen3-Next-80B-A3B-Instruct",
    "vaultgemma": "google/vaultgemma-1b",
    "mamba": "state-spaces/mamba-130m-hf",
    "mamba2": "mistralai/Mamba-Codestral-7B-v0.1",
    "falcon_mamba": "tiiuae/falcon-mamba-7b",
    "nemotron_h": "nvidia/NVIDIA-Nemotron-Nano-9B-v2",
    "helium": "kyutai/helium-1-2b",
    "persimmon": "adept/persimmon-8b-base",
    "biogpt": "microsoft/biogpt",
    "falcon_h1": "tiiuae/Falcon-H1-1.5B-Base",
    "deepseek_v2": "deepseek-ai/DeepSeek-V2-Lite",
    "deepseek_v3": "deepseek-ai/DeepSeek-V3",
    "glm4_moe_lite": "zai-org/GLM-4.7-Flash",
    "glm_moe_dsa": "zai-org/GLM-5",
    "youtu": "tencent/Youtu-LLM-2B",
    "granitemoehybrid": "ibm-granite/granite-4.0-h-tiny",
    "granitemoehybrid (dense)": "ibm-granite/granite-4.0-h-micro",
    "zamba2": "Zyphra/Zamba2-1.2B",
    "rwkv": "RWKV/rwkv-4-169m-pile",
    "recurrent_gemma": "google/recurrentgemma-2b",
    "jetmoe": "jetmoe/jetmoe-8b",
    "openai-gpt": "openai-community/openai-gpt",
}
