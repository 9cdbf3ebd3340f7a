"""The paper's scaling laws from the command line (megatron_ds/scaling.py does the math).

    # a compute budget -> model shape (Eq. 4), batch size and LR (Eq. 1), multi-step milestones
    python tools/scaling_laws.py propose --compute 4.5e23
    # a model and a token count -> batch size, LR and schedule for C = M * D
    python tools/scaling_laws.py propose --model deepseek-7b --tokens 2e12
    # fit an IsoFLOP profile from a CSV with columns budget,M,D,loss; draw it beside the paper's lines
    python tools/scaling_laws.py fit --csv runs.csv --plot isoflop.png
    # write a synthetic IsoFLOP CSV (to try the fit, or as a template)
    python tools/scaling_laws.py synth --csv runs.csv --model-exp 0.55

Coefficient flags (--lr-coef, --model-exp, ...) replace the paper's fits, e.g. with your own
from ``fit``. Bad input ends in one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import sys

import numpy as np

from megatron_ds import scaling
from megatron_ds.config import PRESETS, ConfigError, model_preset


class UsageError(ValueError):
    pass


def _coefficients(args) -> scaling.ScalingCoefficients:
    k = scaling.ScalingCoefficients()
    for f in dataclasses.fields(k):
        v = getattr(args, f.name, None)
        if v is not None:
            setattr(k, f.name, v)
    return k


def _add_coefficient_flags(p: argparse.ArgumentParser) -> None:
    docs = scaling.ScalingCoefficients()
    for f in dataclasses.fields(docs):
        p.add_argument("--" + f.name.replace("_", "-"), type=float, default=None,
                       help=f"default {getattr(docs, f.name)} (the paper's fit)")


def cmd_propose(args) -> None:
    k = _coefficients(args)
    milestones = tuple(float(x) for x in args.milestones.split(","))
    factors = tuple(float(x) for x in args.factors.split(","))
    if len(milestones) != len(factors):
        raise UsageError(f"--milestones {args.milestones} and --factors {args.factors} differ in length")
    if args.model is not None:
        if args.tokens is None:
            raise UsageError("--model needs --tokens (the training token count D)")
        try:
            cfg = model_preset(args.model)
        except ConfigError as e:
            raise UsageError(str(e)) from None
        p = scaling.propose(model_config=cfg, tokens=args.tokens, seq_length=args.seq_length, coefficients=k,
                            warmup_iters=args.warmup_iters, milestones=milestones, factors=factors, preset=args.model)
    elif args.compute is not None:
        p = scaling.propose(args.compute, seq_length=args.seq_length, coefficients=k, warmup_iters=args.warmup_iters,
                            milestones=milestones, factors=factors, aspect=args.aspect)
    else:
        raise UsageError("give --compute FLOPS, or --model NAME and --tokens D")
    print(f"compute C          {p.compute:.4g} FLOPs")
    print(f"model scale M      {p.model_scale:.4g} FLOPs/token  (Eq. 4 optimum {scaling.optimal_model_scale(p.compute, k):.4g})")
    print(f"tokens D           {p.tokens:.4g}  (Eq. 4 optimum {scaling.optimal_tokens(p.compute, k):.4g})")
    print(f"shape              {p.num_layers} layers x d {p.hidden_size}, ffn {p.ffn_hidden_size}, "
          f"{p.num_attention_heads} heads")
    print(f"batch (Eq. 1)      {p.batch_tokens:.4g} tokens -> {p.global_batch_size} x {p.seq_length}")
    print(f"peak LR (Eq. 1)    {p.lr:.4g}")
    steps = ", ".join(f"x{f} from step {m}" for m, f in zip(p.milestones, p.factors))
    print(f"schedule           {p.train_iters} steps, warmup {p.lr_warmup_iters}, multi-step: {steps}")
    print("flags              " + " ".join(p.flags()))
    print("                   (--global-batch-size must be a multiple of --micro-batch-size x data-parallel "
          "size: round it for your layout)")


def _read_csv(path: str):
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise UsageError(f"--csv {path}: {e.strerror}") from None
    need = ("budget", "M", "D", "loss")
    if not rows or any(c not in rows[0] for c in need):
        raise UsageError(f"--csv {path}: needs a header with columns {','.join(need)}")
    try:
        return [np.array([float(r[c]) for r in rows]) for c in need]
    except ValueError as e:
        raise UsageError(f"--csv {path}: {e}") from None


def plot_fit(fit: scaling.IsoFlopFit, budget, m, loss, path: str, k: scaling.ScalingCoefficients) -> None:
    """IsoFLOP curves (left) and M_opt(C) against the paper's Eq. 4 (right), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for c, (a2, a1, a0) in zip(fit.budgets, fit.parabolas):
        sel = budget == c
        ax1.scatter(m[sel], loss[sel], s=12)
        xs = np.linspace(np.log(m[sel]).min(), np.log(m[sel]).max(), 100)
        ax1.plot(np.exp(xs), a2 * xs**2 + a1 * xs + a0, label=f"C={c:.0e}")
    ax1.scatter(fit.m_opt, fit.loss_opt, marker="*", c="k", s=60, zorder=3)
    ax1.set(xscale="log", xlabel="M (non-embedding FLOPs/token)", ylabel="loss", title="IsoFLOP profiles")
    ax1.legend(fontsize=7)
    cs = np.logspace(np.log10(fit.budgets.min()) - 0.5, np.log10(fit.budgets.max()) + 3, 100)
    ax2.scatter(fit.budgets, fit.m_opt, c="k", label="per-budget optimum")
    ax2.plot(cs, fit.model_coef * cs**fit.model_exp, label=f"fit: {fit.model_coef:.4g} C^{fit.model_exp:.4f}")
    ax2.plot(cs, k.model_coef * cs**k.model_exp, "--", label=f"paper: {k.model_coef} C^{k.model_exp}")
    ax2.set(xscale="log", yscale="log", xlabel="C (FLOPs)", ylabel="M_opt", title="Optimal model scale")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_fit(args) -> None:
    budget, m, d, loss = _read_csv(args.csv)
    try:
        fit = scaling.fit_isoflop(budget, m, d, loss)
    except ValueError as e:
        raise UsageError(f"--csv {args.csv}: {e}") from None
    k = _coefficients(args)
    print(f"{'budget':>10} {'M_opt':>11} {'D_opt':>11} {'loss':>8}")
    for c, mo, do, lo in zip(fit.budgets, fit.m_opt, fit.d_opt, fit.loss_opt):
        print(f"{c:10.3g} {mo:11.4g} {do:11.4g} {lo:8.4f}")
    print(f"M_opt = {fit.model_coef:.4g} * C^{fit.model_exp:.4f}   (paper: {k.model_coef} * C^{k.model_exp})")
    print(f"D_opt = {fit.data_coef:.4g} * C^{fit.data_exp:.4f}   (paper: {k.data_coef} * C^{k.data_exp})")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("error: --plot needs matplotlib (pip install matplotlib); the fit above does not", file=sys.stderr)
            sys.exit(2)
        plot_fit(fit, budget, m, loss, args.plot, k)
        print(f"wrote {args.plot}")


def cmd_synth(args) -> None:
    budget, m, d, loss = scaling.synthetic_isoflop(model_coef=args.model_coef_true, model_exp=args.model_exp_true,
                                                   noise=args.noise, seed=args.seed)
    with open(args.csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["budget", "M", "D", "loss"])
        for row in zip(budget, m, d, loss):
            w.writerow([f"{x:.8g}" for x in row])
    print(f"wrote {len(budget)} runs to {args.csv}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scaling_laws.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("propose", help="model shape, batch, LR and schedule for a compute budget or a model + tokens")
    p.add_argument("--compute", type=float, help="compute budget C in FLOPs (e.g. 4.5e23)")
    p.add_argument("--model", choices=sorted(PRESETS), help="an architecture preset (with --tokens)")
    p.add_argument("--tokens", type=float, help="training tokens D (with --model)")
    p.add_argument("--seq-length", type=int, default=4096, help="l_seq (default 4096)")
    p.add_argument("--warmup-iters", type=int, default=2000, help="warmup steps (the paper's 2000; capped at 10%%)")
    p.add_argument("--milestones", default="0.8,0.9", help="multi-step milestones as fractions of training")
    p.add_argument("--factors", default="0.316,0.1", help="LR multipliers from each milestone on")
    p.add_argument("--aspect", type=float, default=100.0, help="target d_model / n_layer for a proposed shape")
    _add_coefficient_flags(p)
    p.set_defaults(fn=cmd_propose)
    f = sub.add_parser("fit", help="fit M_opt(C), D_opt(C) from IsoFLOP runs in a CSV (budget,M,D,loss)")
    f.add_argument("--csv", required=True)
    f.add_argument("--plot", help="write a PNG of the profiles and the fitted vs the paper's line (needs matplotlib)")
    _add_coefficient_flags(f)
    f.set_defaults(fn=cmd_fit)
    s = sub.add_parser("synth", help="write synthetic IsoFLOP runs with a known optimum law")
    s.add_argument("--csv", required=True)
    s.add_argument("--model-coef-true", type=float, default=scaling.PAPER.model_coef)
    s.add_argument("--model-exp-true", type=float, default=scaling.PAPER.model_exp)
    s.add_argument("--noise", type=float, default=0.0, help="std of Gaussian noise added to each loss")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_synth)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
