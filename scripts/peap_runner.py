"""Run PEAP's own code (technion-cs-nlp/PEAP, `src/pos_aware_edge_attribution_patching.py`) on the pairs and
weights `scripts/peap_comparison.py` exported, and time it. Runs in an environment with PEAP's
dependencies (TransformerLens 2.x, transformers 4.x, pandas), not in this project's:

    PEAP_PYTHON src/... python scripts/peap_runner.py --peap path/to/PEAP --folder outputs/peap --device cpu

PEAP's files are read from the checkout and run unchanged but for their hard-coded device ("cuda" becomes
--device) and the model they load from the hub (`HookedTransformer.from_pretrained`, replaced by the GPT-2
weights in the folder). Writes peap_seconds and every edge's mean "sum" score as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig  # type: ignore[attr-defined]  # 2.x
from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast


def load_source(name: str, path: Path, device: str) -> types.ModuleType:
    """PEAP's module `name`, with its hard-coded "cuda" replaced by `device`."""
    module = types.ModuleType(name)
    module.__file__ = str(path)
    sys.modules[name] = module
    code = path.read_text().replace('"cuda"', repr(device))
    exec(compile(code, str(path), "exec"), module.__dict__)  # PEAP's own code, as published
    return module


def tokenizer(folder: Path) -> Any:
    """The exported tokenizer (its tokenizer.json and special tokens; transformers 5 saves a class name
    that transformers 4 does not know)."""
    config = json.loads((folder / "tokenizer_config.json").read_text())
    special = {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if config.get(k)}
    saved = folder.with_name("tokenizer-transformers4")  # re-saved so that TransformerLens can reload it
    PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), **special).save_pretrained(saved)
    return AutoTokenizer.from_pretrained(saved)


def gpt2(folder: Path, device: str) -> HookedTransformer:
    config = GPT2Config.from_dict(json.loads((folder / "config.json").read_text()))
    hf = GPT2LMHeadModel(config)
    hf.load_state_dict(torch.load(folder / "weights.pt"))
    cfg = HookedTransformerConfig(
        n_layers=config.n_layer,
        d_model=config.n_embd,
        d_head=config.n_embd // config.n_head,
        n_heads=config.n_head,
        d_mlp=4 * config.n_embd,
        d_vocab=config.vocab_size,
        n_ctx=config.n_positions,
        act_fn="gelu_new",
        normalization_type="LN",
        eps=config.layer_norm_epsilon,
        device=device,
        default_prepend_bos=json.loads((folder / "pairs.json").read_text())["prepend_bos"],
    )
    model = HookedTransformer(cfg, tokenizer=tokenizer(folder / "tokenizer"))
    model.load_and_process_state_dict(
        convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False, center_unembed=False
    )
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--peap", required=True, help="a checkout of technion-cs-nlp/PEAP")
    parser.add_argument("--folder", required=True, help="what scripts/peap_comparison.py exported")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    folder, src = Path(args.folder), Path(args.peap) / "src"
    exp = load_source("exp", src / "exp.py", args.device)
    peap = load_source(
        "pos_aware_edge_attribution_patching", src / "pos_aware_edge_attribution_patching.py", args.device
    )
    data = json.loads((folder / "pairs.json").read_text())
    model = gpt2(folder, args.device)
    peap.__dict__["HookedTransformer"] = types.SimpleNamespace(
        from_pretrained=lambda *_args, **_kwargs: model
    )
    clean = pd.DataFrame(data["clean"])
    counter = pd.DataFrame(data["corrupted"])

    class Pairs(exp.IOI):  # type: ignore[name-defined, misc]
        def create_datasets(self):  # PEAP's interface
            return clean, counter

    experiment = Pairs(
        exp_name="ioi",
        model_name="gpt2",
        model_path="gpt2",
        ablation_type="counterfactual",
        clean_dataset_path="exported",
        counter_dataset_path="exported",
        spans=data["spans"],
        metric=exp.logit_diff,
        seed=0,
    )
    start = time.perf_counter()
    peap.position_aware_edge_attribution_patching(experiment, len(clean), str(folder / "peap.pkl"))
    seconds = time.perf_counter() - start
    import pickle

    results = pickle.loads((folder / "peap.pkl").read_bytes())
    edges = []
    for edge, score in results.results.items():
        edges.append(
            {
                "up": [edge.upstream_type, edge.upstream_layer_idx, edge.upstream_head_idx],
                "down": [edge.downstream_type, edge.downstream_layer_idx, edge.downstream_head_idx],
                "spans": [edge.span_upstream, edge.span_downstream],
                "crossing": edge.is_crossing,
                "sum": [float(x) for x in torch.as_tensor(score.sum_score).reshape(-1).tolist()],
            }
        )
    (folder / "peap.json").write_text(json.dumps({"seconds": seconds, "edges": edges}))
    print(f"PEAP's own code: {seconds:.1f} s for {len(clean)} pairs on {args.device}")


if __name__ == "__main__":
    main()
