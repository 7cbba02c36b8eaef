"""Can SEUF do better where it loses? Variants of GradDiff+SEUF in the matched-forgetting bench.

Runs ``run_benchmark`` with the baseline, GradDiff+SEUF and variants of it registered under extra names
(a heavier retain loss, two experts instead of one, no router anchor; and, as the control, the all-experts
baseline with the heavier retain loss), everything else as ``hf-moe-unlearn bench``:

    python benchmarks/seuf_variants.py --size full --seeds 0,1,2 --output runs/seuf-variants

Prints the bench's table and one line per method; results.md / results.json / tradeoff.png go to ``--output``
(point it at a bench output to reuse its pre-trained pair).
"""

from __future__ import annotations

import argparse
import dataclasses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="full", choices=["small", "full", "concentrated"])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--output", default="runs/seuf-variants")
    parser.add_argument("--methods", default=None, help="comma list of the names above (default: all)")
    parser.add_argument("--variants_only", action="store_true",
                        help="skip the GradDiff and GradDiff+SEUF rows (compare with a bench run on the same pair)")
    args = parser.parse_args()

    import datasets
    import torch

    from hf_moe_unlearn.bench.run import METHODS, run_benchmark

    datasets.disable_progress_bars()
    torch.set_num_threads(1)
    seuf = METHODS["GradDiff+SEUF"]
    variants = {
        "GradDiff+SEUF retain x5": dataclasses.replace(seuf, retain_loss_weight=5.0),
        "GradDiff+SEUF top-2": dataclasses.replace(seuf, seuf_top_m=2),
        "GradDiff+SEUF no anchor": dataclasses.replace(seuf, anchor_loss_weight=0.0),
        # the control: does the heavier retain loss help the all-experts baseline as much?
        "GradDiff retain x5": dataclasses.replace(METHODS["GradDiff"], retain_loss_weight=5.0),
    }
    METHODS.update(variants)  # this process only: run_benchmark looks methods up by name
    names = [*variants] if args.variants_only else ["GradDiff", "GradDiff+SEUF", *variants]
    if args.methods:
        names = args.methods.split(",")
    result = run_benchmark(names, [int(s) for s in args.seeds.split(",")],
                           size=args.size, workdir=args.output)
    print(result["table"])
    print("\n".join(result["summary"]))


if __name__ == "__main__":
    main()
