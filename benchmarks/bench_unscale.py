"""unscale_and_check against torch's kernels on the same gradients.

For 1, 100 and 1000 leaves and 1e5 to 1e7 float32 elements in total, prints the median time of

* ``polprec``: ``pp.unscale_and_check(grads, StaticLossScale(1024))`` (pure: new tensors);
* ``fused_inplace``: ``torch._amp_foreach_non_finite_check_and_unscale_`` on the gradients
  in place, which is what ``GradScaler.unscale_`` runs;
* ``foreach_mul``: an out-of-place ``torch._foreach_mul`` of the same gradients, the floor for
  any function that returns new tensors;
* ``copy``: a plain copy of the same bytes (the memory-bandwidth floor),

and the ratios of polprec to each. Run: ``python benchmarks/bench_unscale.py``.
"""

from __future__ import annotations

import argparse

import torch
from _timing import header, measure, parse_args, table

import polprec as pp


def run(leaf_counts: list[int], sizes: list[int], repeats: int) -> list[list[str]]:
    rows = []
    state = pp.StaticLossScale(1024.0)
    inv = torch.reciprocal(state.loss_scale)
    one = torch.ones(())
    for total in sizes:
        for n in leaf_counts:
            gen = torch.Generator().manual_seed(0)
            grads = [torch.randn(max(total // n, 1), generator=gen) for _ in range(n)]
            found_inf = torch.zeros(1)

            def fused_inplace(
                grads: list[torch.Tensor] = grads, found_inf: torch.Tensor = found_inf
            ) -> None:
                # inv_scale 1.0 keeps the values stable across repeats; the work is the same.
                torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, one)

            times = measure(
                {
                    "polprec": lambda grads=grads: pp.unscale_and_check(grads, state),
                    "fused_inplace": fused_inplace,
                    "foreach_mul": lambda grads=grads: torch._foreach_mul(grads, inv),
                    "copy": lambda grads=grads: [g.clone() for g in grads],
                },
                repeats=repeats,
            )
            rows.append(
                [
                    f"{total:.0e}",
                    str(n),
                    f"{times['polprec'] * 1e6:.0f}",
                    f"{times['fused_inplace'] * 1e6:.0f}",
                    f"{times['foreach_mul'] * 1e6:.0f}",
                    f"{times['copy'] * 1e6:.0f}",
                    f"{times['polprec'] / times['foreach_mul']:.2f}",
                    f"{times['polprec'] / times['copy']:.2f}",
                    f"{times['polprec'] / times['fused_inplace']:.2f}",
                ]
            )
            print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leaves", type=int, nargs="+", default=[1, 100, 1000])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e5, 1e6, 1e7])
    parser.add_argument("--repeats", type=int, default=40)
    args = parse_args(parser, argv)
    rows = run(args.leaves, [int(s) for s in args.sizes], args.repeats)
    print(header())
    print(
        table(
            rows,
            [
                "elements",
                "leaves",
                "polprec us",
                "fused in-place us",
                "foreach_mul us",
                "copy us",
                "vs foreach_mul",
                "vs copy",
                "vs fused in-place",
            ],
        )
    )


if __name__ == "__main__":
    main()
