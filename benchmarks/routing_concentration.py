"""How concentrated the forget set's routing is on each benchmark preset's pre-trained target model.

    python benchmarks/routing_concentration.py --sizes small,full,concentrated --forget_setting domain \\
        --output runs/routing-concentration

For each size: pre-trains its target/retrain pair (or loads it from ``OUTPUT/pretrain-cache``, the cache of
:func:`hf_moe_unlearn.bench.pretrain.pretrain_models`), then prints, per MoE layer of the *target*, the forget
set's most-used expert e* with f_forget(e*), f_retain(e*) and their ratio (f: share of tokens whose top-k holds
the expert, :func:`hf_moe_unlearn.routing.forget_concentration`; forget/retain texts = the benchmark's
``forget_text``/``retain_text`` passages, as ``run_benchmark`` measures it), how many layers reach the 2x
ratio, the mean top-k forget/retain shares, and the forget and utility (retain) MCQ accuracy of both models
(``mode="choices"``, the first 160 questions of each split). Writes
``OUTPUT/routing_concentration_<forget_setting>.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from hf_moe_unlearn.bench.pretrain import PretrainSettings, model_kwargs_for, pretrain_models
from hf_moe_unlearn.bench.synthetic import BenchmarkSpec, make_benchmark
from hf_moe_unlearn.evaluation import mcq_accuracy
from hf_moe_unlearn.routing import attribute_experts, forget_concentration

N_MCQ = 160


def measure(size: str, forget_setting: str, output: Path, seed: int, device: str | None) -> dict:
    benchmark = make_benchmark(BenchmarkSpec.preset(size, seed=seed, forget=forget_setting))
    start = time.perf_counter()
    pair = pretrain_models(benchmark, output / "pretrain-cache", model_config=model_kwargs_for(size),
                           settings=PretrainSettings.preset(size), device=device)
    wall = time.perf_counter() - start
    stats = [attribute_experts(pair.target, list(getattr(benchmark, f"{split}_text")["text"]), pair.tokenizer,
                               show_progress=False, name=f"{split} set") for split in ("forget", "retain")]
    concentration = forget_concentration(*stats)
    accuracy = {
        name: {split: mcq_accuracy(model, pair.tokenizer, list(getattr(benchmark, f"{split}_mcq"))[:N_MCQ],
                                   mode="choices", add_special_tokens=True)["accuracy"]
               for split in ("forget", "retain")}
        for name, model in (("target", pair.target), ("retrain", pair.retrain))}
    config = pair.target.config
    return {"size": size, "forget_setting": forget_setting, "key": pair.key, "reused": pair.reused,
            "wall_seconds": round(wall, 1), "experts": config.num_experts, "top_k": config.num_experts_per_tok,
            "pretrain_seconds": {n: r["seconds"] for n, r in pair.info["models"].items()},
            "final_loss": {n: r["last_logged_loss"] for n, r in pair.info["models"].items()},
            "concentration": concentration, "mcq_accuracy": accuracy}


def format_result(r: dict) -> str:
    c = r["concentration"]
    lines = [f"== {r['size']} ({r['forget_setting']}): {r['experts']} experts, top-{r['top_k']}, key {r['key']} "
             f"({'cached' if r['reused'] else 'trained'}; pre-training s: target {r['pretrain_seconds']['target']}, "
             f"retrain {r['pretrain_seconds']['retrain']}; last loss: target {r['final_loss']['target']}, "
             f"retrain {r['final_loss']['retrain']})",
             "layer  e*  f_forget(e*)  f_retain(e*)  ratio   >=2x"]
    for t in c["top_expert"]:
        ratio = "inf" if t["ratio"] is None else f"{t['ratio']:.2f}"
        lines.append(f"{t['layer']:>5}  {t['expert']:>2}  {t['f_forget']:>12.3f}  {t['f_retain']:>12.3f}  "
                     f"{ratio:>5}   {'yes' if t['at_ratio'] else 'no'}")
    acc = r["mcq_accuracy"]
    lines += [f"layers_at_ratio: {c['layers_at_ratio']}/{c['num_layers']}",
              f"mean top-{r['top_k']} share: forget {c['mean_forget_share']:.3f}, retain {c['mean_retain_share']:.3f} "
              f"(uniform {c['uniform']:.3f})",
              f"MCQ accuracy (first {N_MCQ}): target forget {acc['target']['forget']:.3f} utility "
              f"{acc['target']['retain']:.3f}; retrain forget {acc['retrain']['forget']:.3f} utility "
              f"{acc['retrain']['retain']:.3f} (chance 0.25)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="small,full,concentrated", help="comma-separated benchmark sizes")
    parser.add_argument("--forget_setting", default="domain", choices=["domain", "entities"])
    parser.add_argument("--output", default="runs/routing-concentration")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is fastest for these tiny models on a busy machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    results = []
    for size in [s.strip() for s in args.sizes.split(",") if s.strip()]:
        results.append(measure(size, args.forget_setting, output, args.seed, args.device))
        print(format_result(results[-1]), flush=True)
    path = output / f"routing_concentration_{args.forget_setting}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"written: {path}")
    return results


if __name__ == "__main__":
    main()
