"""Attribute a forget set to experts on a tiny random Qwen3-MoE, end to end, with no download.

Builds a tiny model and a word-level tokenizer, writes forget/retain text files that use disjoint vocabularies
(so forget tokens route differently), then runs the same code path as `hf-moe-unlearn attribute`.
"""

import argparse
import os
import random

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hf_moe_unlearn.cli import main
from hf_moe_unlearn.moe import tiny_moe_model


def build(workdir: str) -> tuple[str, str, str]:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i + 4 for i in range(124)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                        bos_token="<s>", unk_token="<unk>")
    model_dir = os.path.join(workdir, "model")
    tiny_moe_model("qwen3_moe", num_hidden_layers=4, num_experts=8).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rng = random.Random(0)
    forget = [" ".join(f"w{rng.randrange(0, 30)}" for _ in range(20)) for _ in range(64)]
    retain = [" ".join(f"w{rng.randrange(30, 124)}" for _ in range(20)) for _ in range(64)]
    paths = []
    for name, lines in (("forget", forget), ("retain", retain)):
        path = os.path.join(workdir, f"{name}.txt")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        paths.append(path)
    return model_dir, paths[0], paths[1]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", default="out/attribution")
    parser.add_argument("--method", default="trace", choices=["seuf", "trace"])
    args = parser.parse_args()
    os.makedirs(args.output, exist_ok=True)
    model_dir, forget, retain = build(args.output)
    raise SystemExit(main(["attribute", "--model", model_dir, "--forget", forget, "--retain", retain,
                           "--method", args.method, "--output", args.output]))
